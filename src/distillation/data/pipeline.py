"""The Ray Data pipeline: tokenize the sources, and attach teacher answers to every training row.

The teacher stage is a callable class holding a Serve DeploymentHandle; its async `__call__` lets
Ray Data keep several requests in flight per actor while the trainer consumes earlier batches.
It does not care which teacher kind answers: every kind returns `TeacherOutput` columns.
"""

import asyncio
from typing import Dict, List

import numpy as np
import ray

from distillation.data.sources import Document


class Tokenize:
    def __init__(self, tokenizer_dir: str):
        from distillation.models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        encoded = self.tokenizer(list(batch["text"]), add_special_tokens=False)["input_ids"]
        ragged = np.empty(len(encoded), dtype=object)
        ragged[:] = [np.asarray(ids, dtype=np.int32) for ids in encoded]
        return {"source": batch["source"], "doc_id": batch["doc_id"], "tokens": ragged}


def tokenize_documents(docs: List[Document], tokenizer_dir: str) -> Dict[str, List[np.ndarray]]:
    """Token arrays per source, in document order."""
    items = [{"source": d.source, "doc_id": d.doc_id, "text": d.text} for d in docs]
    ds = ray.data.from_items(items).map_batches(
        Tokenize, fn_constructor_kwargs={"tokenizer_dir": tokenizer_dir}, batch_size=64, concurrency=1, num_cpus=1)
    order = {(d.source, d.doc_id): i for i, d in enumerate(docs)}
    rows = sorted(ds.take_all(), key=lambda r: order[(r["source"], r["doc_id"])])
    out: Dict[str, List[np.ndarray]] = {}
    for row in rows:
        out.setdefault(row["source"], []).append(np.asarray(row["tokens"], dtype=np.int32))
    return out


def _retryable() -> tuple:
    from ray import exceptions as core
    from ray.serve import exceptions as serve_errors

    # A replica that died or is being replaced; the next attempt is routed to a live one.
    return (core.RayActorError, core.ActorUnavailableError, serve_errors.BackPressureError,
            serve_errors.ReplicaUnavailableError, serve_errors.DeploymentUnavailableError)


class TeacherAnnotator:
    """Ray Data stage: sends a batch of token ids to the teacher pool, appends the answer as columns.

    A failed replica costs a retry with exponential backoff, never a batch: after `max_attempts`
    the stage fails loudly rather than handing the trainer a batch without targets.
    """

    def __init__(self, app_name: str, deployment_name: str, max_attempts: int = 4, backoff_s: float = 0.5):
        from ray import serve

        self.handle = serve.get_deployment_handle(deployment_name, app_name=app_name)
        self.max_attempts, self.backoff_s = max_attempts, backoff_s
        self.retryable = _retryable()

    async def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        ids = np.ascontiguousarray(batch["input_ids"])
        for attempt in range(1, self.max_attempts + 1):
            try:
                answer = await self.handle.remote(ids)
                return {**batch, **answer}
            except self.retryable as exc:
                if attempt == self.max_attempts:
                    raise RuntimeError(f"teacher pool failed {attempt} times for one batch: {exc}") from exc
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))


def training_dataset(rows: Dict[str, np.ndarray], app_name: str, deployment_name: str,
                     teacher_batch_size: int, max_attempts: int = 4) -> "ray.data.Dataset":
    """Rows (sample_id, source, input_ids) in plan order -> rows with teacher columns, order preserved."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # the driver shows one training progress bar instead
    items = [{key: rows[key][i] for key in rows} for i in range(len(rows["sample_id"]))]
    return ray.data.from_items(items).map_batches(
        TeacherAnnotator, fn_constructor_kwargs={"app_name": app_name, "deployment_name": deployment_name,
                                                 "max_attempts": max_attempts},
        batch_size=teacher_batch_size, concurrency=1, num_cpus=0)  # it only awaits the teacher pool
