"""The sample scan that fills the held-out, probe and pool sets from each source's first units."""

import pytest

from conftest import jsonl_corpus
from distillation.data.corpus import SCAN_WINDOW, _sample
from distillation.data.rows import RowRecipe
from distillation.data.sources import open_source
from distillation.errors import DistillError
from distillation.roles.unit_reader import Readers


def test_a_bad_record_in_a_read_the_scan_started_stops_the_run_before_training(ray_cluster, smollm2_dir, tmp_path):
    """The scan reads SCAN_WINDOW units ahead and stops once the first satisfies it: a bad record in
    one of those reads is the error, not a line in a reader's log while the run goes on."""
    corpus = jsonl_corpus(tmp_path / "c", files=8, docs_per_file=40)
    spec = open_source("mine", "jsonl", str(corpus), "unused")
    recipe = RowRecipe(str(smollm2_dir), 64, 0.2, 0.0)
    wanted = {"heldout": 1}
    assert _sample(spec, recipe, wanted, Readers(2, 0).cut)["heldout"].rows.shape[0] >= 1  # the first unit suffices
    bad = spec.units[SCAN_WINDOW - 1].path  # the last of the reads started with the first, never consumed
    lines = open(bad).read().splitlines()
    lines[2] = "{broken"
    open(bad, "w").write("\n".join(lines) + "\n")
    spec = open_source("mine", "jsonl", str(corpus), "unused")
    with pytest.raises(DistillError, match=f"{bad}:3: not valid JSON"):
        _sample(spec, recipe, wanted, Readers(2, 0).cut)
