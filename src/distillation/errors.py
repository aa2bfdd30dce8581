"""The one error type users see: a clear one-line message and a nonzero exit from the CLI."""


class DistillError(Exception):
    """Bad input or an unmet precondition; the message names what was wrong and what was expected."""


def get_or_raise(ref):
    """`ray.get(ref)`, with a DistillError raised in the task (a bad record, say) re-raised as the one
    line it is rather than Ray's trace."""
    import ray  # here, not at import: `distill eval` never imports Ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, DistillError):
            raise DistillError(str(exc.cause)) from None
        raise
