"""Training metrics: a weighted loss term that dwarfs the others is named in a warning."""





def test_a_weighted_term_that_dwarfs_the_others_is_named_in_a_warning():
    from distillation.training.metrics import dominance_warning

    calibrated = {"ce_weighted": 8.7, "logits_kl_weighted": 7.0, "attention_weighted": 40.0}
    assert dominance_warning(calibrated) is None
    assert dominance_warning({"ce_weighted": 9.0, "logits_kl_weighted": 0.0, "attention_weighted": 0.0}) is None
    swamped = {"ce_weighted": 8.7, "logits_kl_weighted": 77.6, "attention_weighted": 10715.8}
    assert "gamma * L_AD is 124x the other loss terms" in dominance_warning(swamped)


def test_a_resumed_run_drops_the_rows_a_killed_attempt_logged_past_its_checkpoint(tmp_path):
    import json

    from distillation.training.metrics import drop_rows_after, read_jsonl

    path = tmp_path / "ledger.jsonl"
    path.write_text("".join(json.dumps({"step": s, "samples": [[s, 0, 0, 0]]}) + "\n" for s in [1, 2, 3, 4, 3]))
    drop_rows_after(path, 2)  # the checkpoint the run resumes from
    assert [r["step"] for r in read_jsonl(path)] == [1, 2] and path.read_text().count("\n") == 2
    drop_rows_after(tmp_path / "absent.jsonl", 2)  # a run that logged nothing yet
    assert not (tmp_path / "absent.jsonl").exists() and [p.name for p in tmp_path.iterdir()] == ["ledger.jsonl"]
