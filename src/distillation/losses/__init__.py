"""BitDistill losses in plain torch (no Ray): CE, logits KL over dense / sparse / sampled teacher
targets (chunked over tokens), and MiniLMv2 Q/K/V relations."""

from distillation.losses.attention import QKV, attention_relation_loss
from distillation.losses.combined import LOSS_COMPONENTS, LossOutput, LossWeights, bitdistill_loss
from distillation.losses.logits import IGNORE_INDEX, cross_entropy, kl_per_token, logit_losses, logits_kl
from distillation.losses.student_logits import HeadInputs
from distillation.losses.targets import (
                                         DenseTargets,
                                         HiddenTargets,
                                         OutputHead,
                                         SampledTargets,
                                         SparseTargets,
                                         Targets,
                                         sampled_targets,
                                         sparse_targets,
)

__all__ = [
    "IGNORE_INDEX", "HeadInputs", "cross_entropy", "kl_per_token", "logits_kl", "logit_losses",
    "DenseTargets", "HiddenTargets", "OutputHead", "SparseTargets", "SampledTargets", "Targets", "sparse_targets", "sampled_targets",
    "QKV", "attention_relation_loss", "LOSS_COMPONENTS", "LossOutput", "LossWeights", "bitdistill_loss",
]
