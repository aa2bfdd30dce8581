"""Training: the Ray Train per-worker loop, the student builder, metrics and held-out evaluation."""
