"""Which optimizer step a sample belongs to: the one rule the driver, the mixture, the workers and
their pipelines share. Samples are numbered in one global order; every optimizer step consumes
`batch_size * grad_accum` of them on each of `num_workers` ranks."""


def samples_per_step(batch_size: int, grad_accum: int, num_workers: int) -> int:
    return batch_size * grad_accum * num_workers


def step_of(sample: int, per_step: int) -> int:
    """The optimizer step (0-based) that trains on global sample `sample`."""
    return sample // per_step


def samples_before(step: int, per_step: int) -> int:
    """Samples consumed by the first `step` optimizer steps (a checkpoint after `step` resumes here)."""
    return step * per_step
