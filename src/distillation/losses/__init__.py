"""BitDistill losses in plain torch (no Ray): CE, logits KL (dense or sparse top-k + tail), Q/K/V relations."""

from distillation.losses.attention import attention_relation_loss
from distillation.losses.combined import LossOutput, LossWeights, bitdistill_loss
from distillation.losses.logits import IGNORE_INDEX, SparseTargets, cross_entropy, dense_kl, sparse_kl

__all__ = [
    "IGNORE_INDEX", "SparseTargets", "cross_entropy", "dense_kl", "sparse_kl",
    "attention_relation_loss", "LossOutput", "LossWeights", "bitdistill_loss",
]
