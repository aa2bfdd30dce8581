"""Joining or starting the Ray cluster, and checking it can hold the run, for `distill` and `precompute`."""

import os
import signal
from typing import Dict, List

import ray

from distillation.config.schema import RunConfig, TeacherConfig, TrainingConfig
from distillation.console import quiet_ray, say
from distillation.errors import DistillError


def init_ray(r: RunConfig) -> None:
    """Join `run.ray_address` / RAY_ADDRESS, or start a local cluster (token auth on, dashboard on
    127.0.0.1). A local cluster's processes ignore the terminal's Ctrl-C: the driver handles it (stop
    after the step, checkpoint, clean up), which it could not if the workers died first."""
    if ray.is_initialized():
        return
    quiet_ray(r.verbose)
    address = r.ray_address or os.environ.get("RAY_ADDRESS")
    # address="local": a cluster of this run's own. Without it ray.init() joins any single Ray cluster
    # already running on the machine (another user's, a test's), resources and all.
    kwargs = ({"address": address} if address else
              {"address": "local", "num_cpus": r.num_cpus, "dashboard_host": "127.0.0.1"})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the processes started now
    try:
        context = ray.init(log_to_driver=r.verbose, logging_level="INFO" if r.verbose else "ERROR",
                           **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)
    say(f"Ray cluster ready; dashboard: http://{context.dashboard_url}" if context.dashboard_url
        else "Ray cluster ready (no dashboard)")


def _place(free: List[Dict[str, float]], need: Dict[str, float], count: int) -> int:
    """First fit of `count` bundles of `need` onto the nodes' `free` resources (taken as placed);
    how many fit. Ray books resources in units of 1e-4, so a float remainder below that is room."""
    wanted = {k: v for k, v in need.items() if v > 0}
    placed = 0
    for node in free:
        while placed < count and all(node.get(k, 0) + 1e-4 >= v for k, v in wanted.items()):
            for k, v in wanted.items():
                node[k] = node.get(k, 0) - v
            placed += 1
    return placed


def check_placement(t: TrainingConfig, tc: TeacherConfig, uses_teacher: bool = True) -> None:
    """The teacher pool's first replicas and `num_workers` training workers, together: what the
    cluster cannot place would leave Serve or Ray Train waiting forever, so say so now."""
    from distillation.roles.teacher_replica import replica_bundle
    from distillation.roles.train_worker import worker_bundle

    nodes = [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]
    problem = placement_problem(nodes, replica_bundle(tc), tc.min_replicas if uses_teacher else 0, worker_bundle(t),
                                t.num_workers)
    if problem:
        raise DistillError(problem)


def placement_problem(nodes: List[Dict[str, float]], replica: Dict[str, float], replicas: int,
                      worker: Dict[str, float], workers: int) -> str:
    """Why `replicas` teacher replicas and `workers` training workers do not fit on `nodes` (their
    resources), or "" if they do. First fit in both orders, so a node only one of them can use (a
    GPU node, say) is not taken by the other."""
    if _place([dict(n) for n in nodes], replica, replicas) < replicas:
        return (f"teacher.min_replicas={replicas} replicas of {replica} cannot be placed on the cluster's "
                f"nodes; lower teacher.num_cpus/num_gpus/min_replicas or add nodes")
    free = [dict(n) for n in nodes]
    if _place(free, worker, workers) == workers and _place(free, replica, replicas) == replicas:
        return ""
    free = [dict(n) for n in nodes]
    _place(free, replica, replicas)
    fits = _place(free, worker, workers)
    if fits == workers:
        return ""
    beside = f" beside {replicas} teacher replica(s)" if replicas else ""
    return (f"training.num_workers={workers} workers of {worker} cannot be placed: the cluster's nodes hold "
            f"room for {fits}{beside}. Lower num_workers or add nodes.")


def peak_rss_mb() -> float:
    """This process's memory high-water mark (VmHWM; 0 where /proc is missing). Not getrusage's
    ru_maxrss: Linux carries that over fork and exec, so a fresh process would report its parent's."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0.0
