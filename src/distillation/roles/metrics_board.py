"""Role: the metrics board, one named actor per run (`distill-metrics-<run>`, no CPU booked),
created by the driver (run.py), pushed to by the training workers (roles/train_worker.py) and read by
the driver's progress loop. It is also the run's stop switch: a first Ctrl-C on the driver asks the
workers, through it, to stop after the current step."""

from typing import Dict, List

import ray


def board_name(run_name: str) -> str:
    return f"distill-metrics-{run_name}"


@ray.remote(num_cpus=0)
class MetricsBoard:
    """Append-only logs the driver copies to files as they grow: metrics rows and the sample ledger
    (one row per step and rank: [(sample_id, source, row)]). A step redone after a restart appears
    again; readers keep its last row (`read_jsonl`)."""

    def __init__(self) -> None:
        self.logs: Dict[str, List[dict]] = {"metrics": [], "ledger": []}
        self.stop = False  # the driver's request to stop after the current step (a first Ctrl-C)

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def push(self, row: dict) -> None:
        self.logs["metrics"].append(row)

    def push_ledger(self, rank: int, step: int, entries: list) -> None:
        self.logs["ledger"].append({"step": step, "rank": rank, "samples": entries})

    def since(self, counts: Dict[str, int]) -> Dict[str, List[dict]]:
        return {name: rows[counts[name]:] for name, rows in self.logs.items()}


def start_board(run_name: str) -> "ray.actor.ActorHandle":
    return MetricsBoard.options(name=board_name(run_name)).remote()  # type: ignore[attr-defined]  # @ray.remote: an ActorClass
