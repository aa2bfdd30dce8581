"""The sweep's table: gap closed per seed against the SFT run of the same seed and budget, and the
log's rows from an older held-out set left out."""

import json

from bench.bench_sweep import from_log, table


def _row(arm, seed, heldout, unseen, teacher_heldout=1.0, steps=120):
    return {"arm": arm, "seed": seed, "steps": steps, "heldout_bpb": heldout, "teacher_heldout_bpb": teacher_heldout,
            "unseen_bpb": {"mean": unseen}, "loss_terms_first": {"attention": 0.0}, "loss_terms_last": {"attention": 0.0}}


def test_the_table_pairs_each_seed_with_its_own_sft_run_and_skips_rows_of_an_older_held_out_set(tmp_path):
    log = tmp_path / "runs.jsonl"
    rows = [_row("defaults", 0, 9.0, 9.0, teacher_heldout=1.5),  # an older held-out set: left out
            _row("sft", 0, 3.0, 4.0), _row("defaults", 0, 2.0, 3.0),
            _row("sft", 1, 5.0, 6.0), _row("defaults", 1, 4.0, 3.0),
            _row("defaults", 2, 2.5, 2.5, steps=30),  # another budget: left out
            _row("split", 0, 2.5, 3.5, teacher_heldout=None)]  # a stage-2 split scores no teacher: kept
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = from_log(str(log), ["defaults", "sft", "split"], 120, [0, 1])
    assert [(r["arm"], r["seed"], r["heldout_bpb"]) for r in results] == [
        ("defaults", 0, 2.0), ("defaults", 1, 4.0), ("sft", 0, 3.0), ("sft", 1, 5.0), ("split", 0, 2.5)]
    text = table(results, {"heldout": 1.0, "unseen": 2.0})
    defaults = next(line for line in text.splitlines() if line.startswith("| defaults"))
    # held-out gaps: (3-2)/(3-1) = 0.5 and (5-4)/(5-1) = 0.25; unseen: (4-3)/(4-2) = 0.5, (6-3)/(6-2) = 0.75
    assert defaults == ("| defaults | 120 | 0,1 | 3.000 [2.000, 4.000] | 0.375 [0.250, 0.500] | "
                        "3.000 [3.000, 3.000] | 0.625 [0.500, 0.750] | - |")
