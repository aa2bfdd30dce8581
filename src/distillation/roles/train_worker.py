"""Role: a training worker, one process per `training.num_workers`, started by Ray Train's
`TorchTrainer` (`trainer`, which the driver's `_fit` in run.py runs). It accepts a `WorkerSpec`
(specs.py) as `train_loop_config={"spec": ...}` and books `worker_bundle(training)`; it streams its
samples through its own annotate stage (roles/annotate_stage.py) and runs the phases of
training/loop.py.
"""

from typing import TYPE_CHECKING, Dict

from distillation.config.schema import TrainingConfig
from distillation.specs import WorkerSpec

if TYPE_CHECKING:
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer


def worker_bundle(t: TrainingConfig) -> Dict[str, float]:
    """What one training worker books: Ray Train's ScalingConfig, the driver's placement check and the
    held-out task (placed as a worker is) all use this."""
    return {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {}), **t.worker_resources}


def scaling_config(t: TrainingConfig) -> "ScalingConfig":
    from ray.train import ScalingConfig

    bundle = worker_bundle(t)
    bundle.pop("GPU", None)  # use_gpu books it
    return ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=bundle)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker: set up, then train this rank's samples."""
    from distillation.data.pipeline import rank_sample_ids
    from distillation.roles.annotate_stage import worker_stream
    from distillation.training.loop import setup, train_steps

    w = setup(config["spec"])
    t = w.spec.training
    ids = rank_sample_ids(w.rank, w.world, t.batch_size, t.grad_accum, w.step, t.max_steps)
    train_steps(w, worker_stream(ids, w.spec.rows_per_step, w.spec.feed))


def trainer(spec: WorkerSpec, storage_path: str, storage_name: str) -> "TorchTrainer":
    """The TorchTrainer of a run; the same name and storage path on a resumed driver, so Ray Train
    restores its latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    t = spec.training
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=scaling_config(t),
        run_config=RunConfig(name=storage_name, storage_path=storage_path,
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
    )
