"""The data pipeline: teacher requests within one step, each rank's sample ids, and the stream
while every step moves the mixture weights."""


import numpy as np
import pytest
import ray

from conftest import jsonl_mixture_inputs
from distillation.data.mixture import MixturePlan
from distillation.data.pipeline import rank_sample_ids, read_batches, step_blocks
from distillation.roles.annotate_stage import worker_stream
from distillation.roles.mixture import Mixture
from distillation.specs import FeedSpec, MixtureSpec


def test_teacher_requests_never_span_two_steps():
    blocks = step_blocks(np.arange(10, 20), rows_per_step=4, request_size=3)
    assert [b.tolist() for b in blocks] == [[10, 11, 12], [13], [14, 15, 16], [17], [18, 19]]


@pytest.mark.slow
@pytest.mark.timeout(300)  # passes in under a minute here; a deadlock fails here, not at the 20-minute limit
def test_the_stream_never_waits_on_its_own_rows_when_every_step_moves_the_weights(ray_cluster, smollm2_dir, tmp_path):
    """The tightest schedule: the consumer sends the update of step s only after reading step s, and
    step s + 1 draws with it (delay 1). Hundreds of one-row steps (a long run in miniature), several
    requests in flight, run out of order by Ray Data: a request holding rows of three steps, or one
    call slot for all requests, waits forever here."""
    steps = 450  # over 200 rows: what from_items would merge into blocks of three
    specs, recipe, pool = jsonl_mixture_inputs(tmp_path, smollm2_dir)
    plan = MixturePlan(["a", "b"], [len(specs[n].units) for n in "ab"], [0.5, 0.5], seed=0, samples_per_step=1,
                       update_steps=range(1, steps - 1), delay=1, window=2)
    mixture = Mixture.options(name="stream-mixture").remote(MixtureSpec(plan.state(), specs, recipe, pool, 2, 0.0))
    try:
        stream = worker_stream(np.arange(steps), 1, FeedSpec("stream-mixture", None, teacher_batch_size=1,
                                                             max_in_flight=4, max_attempts=1))
        seen = []
        for step, batch in enumerate(read_batches(stream, batch_size=1), start=1):  # as the trainer reads
            seen.extend(batch["sample_id"].tolist())
            if step in plan.update_steps:
                ray.get(mixture.set_weights.remote(step, [0.9, 0.1] if step % 2 else [0.1, 0.9]))
        assert seen == list(range(steps))
        assert len(ray.get(mixture.history.remote())) == steps - 1  # every update arrived and was used
    finally:
        ray.kill(mixture)


def test_rank_sample_ids_partition_the_run_and_start_at_the_resumed_step():
    parts = [rank_sample_ids(r, 2, batch_size=3, grad_accum=2, start_step=0, max_steps=4) for r in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(4 * 2 * 2 * 3))
    assert parts[0][:6].tolist() == [0, 1, 2, 6, 7, 8]  # micro-batch 0 of rank 0, then its micro-batch 1
    resumed = rank_sample_ids(1, 2, batch_size=3, grad_accum=2, start_step=2, max_steps=4)
    assert resumed.tolist() == parts[1][len(parts[1]) // 2:].tolist()
