"""Role: the unit readers, unnamed actors (`num_cpus` is data.reader_cpus) that read and cut units
into rows. Created, a few at a time (`Readers`), by whoever needs units read and owned by it, so they
end with it: the driver (run.py, for the scan of each source's first units in data/corpus.py) and the mixture actor
while training (roles/mixture.py)."""

from dataclasses import replace
from typing import Dict

import ray

from distillation.data.packing import Packed
from distillation.data.rows import RowRecipe
from distillation.data.sources import SourceSpec, Unit


@ray.remote
class UnitReader:
    """Reads and cuts units on a Ray worker. An actor, not a task per unit: each task with no CPU
    booked may start a worker process of its own (importing transformers, loading the tokenizer),
    which on a small machine cost more than the reading."""

    def cut(self, recipe: RowRecipe, spec: SourceSpec, unit: Unit) -> Dict[str, Packed]:
        return recipe.cut(spec, unit)


class Readers:
    """`count` UnitReader actors that units are sent to in turn (owned by whoever creates them, so
    they end with it)."""

    def __init__(self, count: int, num_cpus: float):
        self.actors = [UnitReader.options(num_cpus=num_cpus).remote()  # type: ignore[attr-defined]  # @ray.remote: an ActorClass
                       for _ in range(count)]
        self.sent = 0

    def cut(self, recipe: RowRecipe, spec: SourceSpec, unit: Unit) -> "ray.ObjectRef":
        """The unit's rows, later; `spec` travels without its unit list (which can be long)."""
        actor = self.actors[self.sent % len(self.actors)]
        self.sent += 1
        return actor.cut.remote(recipe, replace(spec, units=()), unit)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
