"""The `distill_*` metrics a run exports through `ray.util.metrics`, read back from Ray's Prometheus
endpoint (what a Prometheus server scrapes) while a real run trains."""

import re
import threading
import time
import urllib.request

import pytest
import ray

from conftest import tiny_overrides
from distillation.config import load_config

pytestmark = pytest.mark.slow
EXPECTED = {  # Ray prefixes every application metric with ray_
    "ray_distill_loss": {"component": {"loss", "ce", "logits_kl", "attention"}},
    "ray_distill_tokens_per_s": {}, "ray_distill_lr": {}, "ray_distill_grad_norm": {}, "ray_distill_data_wait_s": {},
    "ray_distill_nan_skipped": {}, "ray_distill_step": {}, "ray_distill_quant_mix": {},
    "ray_distill_mixture_weight": {"source": {"shakespeare", "python_code", "python_docs"}},
    "ray_distill_teacher_latency_s_count": {}, "ray_distill_teacher_tokens_total": {},
    "ray_distill_teacher_requests_in_flight": {},
}
SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? ([-+0-9.eE]+|NaN|[-+]Inf)$")


def _scrape(port: int) -> dict:
    """{metric name: [(labels, value)]} from one scrape."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = {}
    for line in body.splitlines():
        match = SAMPLE.match(line)
        if match and match.group(1).startswith("ray_distill_"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            found.setdefault(match.group(1), []).append((labels, float(match.group(3))))
    return found


def test_every_documented_metric_is_exported_with_plausible_values(tiny_teacher, ray_cluster, tmp_path):
    from distillation.run import run

    port = ray._private.worker.global_worker.node.metrics_export_port
    overrides = [o for o in tiny_overrides(tiny_teacher, tmp_path, steps=12) if not o.startswith("run.name")]
    done = threading.Event()
    thread = threading.Thread(target=lambda: (run(load_config(overrides + ["run.name=metrics"])), done.set()),
                              daemon=True)
    thread.start()
    seen = {}
    deadline = time.time() + 600
    while time.time() < deadline and not done.is_set():
        for name, samples in _scrape(port).items():
            seen.setdefault(name, []).extend(samples)
        if set(EXPECTED) <= set(seen) and max(v for _, v in seen["ray_distill_step"]) >= 2:
            break
        time.sleep(2)
    thread.join(timeout=600)
    assert done.is_set(), "the run did not finish"
    missing = set(EXPECTED) - set(seen)
    assert not missing, f"not exported: {sorted(missing)}; seen {sorted(seen)}"
    for name, tags in EXPECTED.items():
        for tag, values in tags.items():
            assert values <= {labels.get(tag) for labels, _ in seen[name]}, (name, tag, seen[name])
    values = {name: [v for _, v in samples] for name, samples in seen.items()}
    assert max(values["ray_distill_tokens_per_s"]) > 0 and max(values["ray_distill_step"]) >= 2
    assert all(0 <= w <= 1 for w in values["ray_distill_mixture_weight"])
    assert all(0 <= m <= 1 for m in values["ray_distill_quant_mix"])
    assert max(values["ray_distill_teacher_tokens_total"]) > 0 and max(values["ray_distill_teacher_latency_s_count"]) > 0
    assert all(v == v for v in values["ray_distill_loss"])  # no NaN
