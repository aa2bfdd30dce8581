"""Which samples each training worker streams, in which blocks, and how the trainer reads them. The
Ray Data pipeline itself (draw from the mixture, attach the teacher's answers) is
roles/annotate_stage.py.
"""

from typing import List

import numpy as np
import ray


def rank_sample_ids(rank: int, world: int, batch_size: int, grad_accum: int, start_step: int,
                    max_steps: int) -> np.ndarray:
    """The global sample ids this rank trains on, in order: micro-batch m of step s on rank r holds
    ids ((s * grad_accum + m) * world + r) * batch_size + [0, batch_size). Fixed by rank, so a resumed
    run gives every rank exactly the samples it would have had."""
    micro = np.arange(start_step * grad_accum, max_steps * grad_accum, dtype=np.int64)
    base = (micro * world + rank) * batch_size
    return (base[:, None] + np.arange(batch_size, dtype=np.int64)[None, :]).ravel()


def step_blocks(sample_ids: np.ndarray, rows_per_step: int, request_size: int) -> List[np.ndarray]:
    """This rank's ids cut into teacher requests of at most `request_size` that never span two optimizer
    steps. A draw may wait for a weight update computed after an earlier step (mixture.py), and a
    request's answer reaches the trainer only once all of it is done: a request holding rows of
    delay + 2 steps would wait for an update that needs its own first rows trained. Within one step,
    it never can."""
    blocks: List[np.ndarray] = []
    for start in range(0, len(sample_ids), rows_per_step):
        step = sample_ids[start:start + rows_per_step]
        blocks.extend(step[i:i + request_size] for i in range(0, len(step), request_size))
    return blocks


def read_batches(stream: "ray.data.Dataset", batch_size: int, device="auto"):
    """The trainer's view of `worker_stream`: torch batches without local prefetch, which would wait
    for rows past the current step (and so for an update only this step can produce). Teacher
    requests still run ahead inside Ray Data."""
    return stream.iter_torch_batches(batch_size=batch_size, device=device, prefetch_batches=0)
