"""The Ray Data pipeline per training worker: draw rows from the mixture (which reads the sources
unit by unit, data/mixture.py) and attach teacher answers to them.

The teacher stage is a callable class holding a Serve DeploymentHandle; its async `__call__` lets
Ray Data keep several requests in flight while the trainer consumes earlier batches. It does not
care which teacher kind answers: every kind returns `TeacherOutput` columns.
"""

import asyncio
from typing import Dict, List, Optional

import numpy as np
import ray


def _retryable() -> tuple:
    from ray import exceptions as core
    from ray.serve import exceptions as serve_errors

    # A replica that died or is being replaced; the next attempt is routed to a live one.
    return (core.RayActorError, core.ActorUnavailableError, serve_errors.BackPressureError,
            serve_errors.ReplicaUnavailableError, serve_errors.DeploymentUnavailableError)


class DrawAndAnnotate:
    """Ray Data stage: turns sample ids into training rows drawn from the mixture, then appends the
    teacher's answer as columns (no teacher when the loss needs none, e.g. CE-only stage 2).

    Backpressure: at most `max_in_flight` batches per stage are awaiting the teacher (the actor pool's
    `max_tasks_in_flight_per_actor`). A failed replica costs a retry with exponential backoff, never a
    batch: after `max_attempts` the stage fails loudly rather than hand the trainer a batch without
    targets.
    """

    def __init__(self, mixture_name: str, app_name: Optional[str], deployment_name: str,
                 max_attempts: int = 4, backoff_s: float = 0.5):
        from ray import serve

        self.mixture = ray.get_actor(mixture_name)
        self.handle = serve.get_deployment_handle(deployment_name, app_name=app_name) if app_name else None
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.retryable = _retryable()

    async def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        rows = await self.mixture.draw.remote(batch["sample_id"])
        if self.handle is None:
            return rows
        ids = np.ascontiguousarray(rows["input_ids"])
        positions = rows.get("positions")  # packed rows: the teacher scores each document on its own
        for attempt in range(1, self.max_attempts + 1):
            try:
                answer = await self.handle.remote(ids, positions)
                return {**rows, **answer}
            except self.retryable as exc:
                if attempt == self.max_attempts:
                    raise RuntimeError(f"teacher pool failed {attempt} times for one batch: {exc}") from exc
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))


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
    blocks = []
    for start in range(0, len(sample_ids), rows_per_step):
        step = sample_ids[start:start + rows_per_step]
        blocks.extend(step[i:i + request_size] for i in range(0, len(step), request_size))
    return blocks


def worker_stream(sample_ids: np.ndarray, rows_per_step: int, mixture_name: str, app_name: Optional[str],
                  deployment_name: str, request_size: int, max_in_flight: int, max_attempts: int) -> "ray.data.Dataset":
    """This rank's rows with teacher columns, in sample-id order, one block per teacher request.

    Built inside the training worker, not split from one dataset by Ray Train: `streaming_split`
    hands blocks to whichever worker asks first, and exact resume needs the assignment fixed.
    Deadlock-free with scheduled weight updates because (1) blocks follow `step_blocks` and map one to
    one onto tasks (`from_blocks` keeps them, `batch_size=None` does not merge them); (2) Ray Data runs
    a pool actor's tasks out of order, so every task in flight gets its own call slot and a later
    step's draw waiting for an update cannot hold back an earlier step's; (3) the trainer reads it
    through `read_batches`, so it never waits for rows beyond its current step."""
    import pyarrow as pa

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # the driver shows one training progress bar instead
    blocks = [pa.table({"sample_id": ids}) for ids in step_blocks(sample_ids, rows_per_step, request_size)]
    return ray.data.from_blocks(blocks).map_batches(
        DrawAndAnnotate, fn_constructor_kwargs={"mixture_name": mixture_name, "app_name": app_name,
                                                "deployment_name": deployment_name, "max_attempts": max_attempts},
        batch_size=None, num_cpus=0,  # it only awaits the mixture and the teacher pool
        compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=max_in_flight,
                                           max_concurrent_calls_per_actor=max_in_flight))


def read_batches(stream: "ray.data.Dataset", batch_size: int, device="auto"):
    """The trainer's view of `worker_stream`: torch batches without local prefetch, which would wait
    for rows past the current step (and so for an update only this step can produce). Teacher
    requests still run ahead inside Ray Data."""
    return stream.iter_torch_batches(batch_size=batch_size, device=device, prefetch_batches=0)
