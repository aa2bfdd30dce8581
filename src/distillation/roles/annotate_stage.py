"""Role: the annotate stage, a Ray Data actor (one per training worker, no CPU booked) in the pipeline
each worker builds (`worker_stream`): it turns sample ids into rows drawn from the mixture actor
(roles/mixture.py) and attaches the teacher pool's answers (roles/teacher_replica.py). It accepts a
`FeedSpec` (specs.py).

The stage is a callable class holding a Serve DeploymentHandle; its async `__call__` lets Ray Data
keep several requests in flight while the trainer consumes earlier batches. It does not care which
teacher kind answers: every kind returns `TeacherOutput` columns.
"""

import asyncio
from typing import Dict

import numpy as np
import ray

from distillation.data.pipeline import step_blocks
from distillation.roles.teacher_replica import DEPLOYMENT_NAME
from distillation.specs import FeedSpec


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

    def __init__(self, feed: FeedSpec, backoff_s: float = 0.5):
        from ray import serve

        self.mixture = ray.get_actor(feed.mixture)
        self.handle = (serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=feed.app_name) if feed.app_name
                       else None)
        self.max_attempts, self.backoff_s = feed.max_attempts, backoff_s
        self.retryable = _retryable()

    async def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        rows: Dict[str, np.ndarray] = await self.mixture.draw.remote(batch["sample_id"])
        if self.handle is None:
            return rows
        ids = np.ascontiguousarray(rows["input_ids"])
        positions = rows.get("positions")  # packed rows: the teacher scores each document on its own
        attempt = 1
        while True:  # data.teacher_max_attempts >= 1 (the schema's `positive`)
            try:
                answer = await self.handle.remote(ids, positions)
                return {**rows, **answer}
            except self.retryable as exc:
                if attempt >= self.max_attempts:
                    raise RuntimeError(f"teacher pool failed {attempt} times for one batch: {exc}") from exc
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
                attempt += 1


def worker_stream(sample_ids: np.ndarray, rows_per_step: int, feed: FeedSpec) -> "ray.data.Dataset":
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
    blocks = [pa.table({"sample_id": ids}) for ids in step_blocks(sample_ids, rows_per_step, feed.teacher_batch_size)]
    return ray.data.from_blocks(blocks).map_batches(
        DrawAndAnnotate, fn_constructor_kwargs={"feed": feed},
        batch_size=None, num_cpus=0,  # it only awaits the mixture and the teacher pool
        compute=ray.data.ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=feed.max_in_flight,
                                           max_concurrent_calls_per_actor=feed.max_in_flight))
