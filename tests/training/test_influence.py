"""The influence estimator and the weight update, on a real (tiny) causal LM. Plain torch."""

import numpy as np
import pytest
import torch

from conftest import tiny_llama_config
from distillation.training.influence import alignment_scores, flat_gradient, move_weights, smooth


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=97))


def _batch(seed, length=12, full=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, length), generator=g)
    lengths = torch.full((3,), length) if full else torch.tensor([length, length - 4, 5])
    return ids, lengths


def test_a_source_whose_batch_is_the_probe_scores_one_and_others_less(model):
    probe = _batch(1)
    scores = alignment_scores(model, probe, {"same": probe, "other": _batch(2)})
    assert scores["same"] == pytest.approx(1.0, abs=1e-5)
    assert -1 <= scores["other"] < 0.99
    assert all(p.grad is None for p in model.parameters())  # .grad (and DDP's hooks) untouched


def test_padding_does_not_change_the_gradient(model):
    ids, lengths = _batch(3, full=False)
    padded = ids.clone()
    for row, n in enumerate(lengths.tolist()):
        padded[row, n:] = 0  # different padding ids: no label reads them, causal attention never sees them
    torch.testing.assert_close(flat_gradient(model, ids, lengths), flat_gradient(model, padded, lengths))


def test_weights_move_toward_aligned_sources_with_a_floor():
    w = move_weights([1 / 3] * 3, [0.8, 0.1, -0.2], eta=2.0, floor=0.05)
    raw = np.array([1 / 3] * 3) * np.exp(2.0 * np.array([0.8, 0.1, -0.2]))
    np.testing.assert_allclose(w, 0.85 * raw / raw.sum() + 0.05, rtol=1e-12)
    assert w.sum() == pytest.approx(1.0) and w[0] > w[1] > w[2] >= 0.05
    assert move_weights([0.999, 0.0005, 0.0005], [1, -1, -1], eta=50, floor=0.05).min() >= 0.05
    with pytest.raises(ValueError, match="within"):
        move_weights([0.5, 0.5], [0, 0], eta=1, floor=0.6)


def test_scores_are_smoothed_by_an_exponential_moving_average():
    assert smooth([], [0.2, 0.4], 0.5).tolist() == [0.2, 0.4]
    np.testing.assert_allclose(smooth([0.2, 0.4], [0.6, 0.0], 0.75), [0.3, 0.3])


@pytest.mark.slow
def test_on_real_text_the_shakespeare_weight_rises_toward_a_shakespeare_probe(ray_cluster, smollm2_dir, tmp_path):
    """Sources {Shakespeare, Python code, Python docs}, probe of held-out Shakespeare, the converted
    SmolLM2 student (2 layers, CE only so no teacher is needed), through the real pipeline."""
    from distillation.config import load_config
    from distillation.run import run

    summary = run(load_config([
        "distillation=ce_only", "student.num_layers=2", "data.seq_len=64",
        "training.batch_size=4", "training.max_steps=7", "influence.enabled=true", "influence.update_interval=2",
        "influence.delay_steps=1", "influence.probe_sequences=4", f"run.output_dir={tmp_path}", "run.name=influence",
        "run.progress=false"]))
    history = summary["mixture"]
    assert [e["computed_at"] for e in history] == [None, 2, 4]  # an update at 6 would take effect after the end
    start, end = history[0]["weights"], history[-1]["weights"]
    assert end[0] > start[0] + 0.05 and end[0] == max(end), history  # Shakespeare is source 0
    assert all(e["scores"][0] == max(e["scores"]) for e in history[1:])  # it aligns best at every update
    assert summary["teacher"] is None  # CE only: no teacher pool was deployed
