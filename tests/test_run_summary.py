"""The run summary as the terminal shows it."""

from distillation.run import print_summary


def _summary(heldout_tokens: int) -> dict:
    score = {"loss": 0.0 if not heldout_tokens else 2.5, "bits_per_byte": 0.0 if not heldout_tokens else 1.1,
             "tokens": heldout_tokens, "parameters": 10}
    return {"steps": 2, "tokens_seen": 100, "wall_s": 3.0, "resumed_from_step": None, "first": {"loss": 3.0},
            "last": {"loss": 2.0}, "heldout": {"student_before": score, "student_after": score, "teacher": score},
            "mixture": [{"weights": [1.0]}], "warnings": [], "student_checkpoint": "run/student",
            "exports": {"hf": "run/student", "gguf": "run/student.gguf"}, "metrics": "m", "loss_plot": "p"}


def test_a_run_without_held_out_rows_says_so_instead_of_printing_zero_losses(capsys):
    print_summary(_summary(0))
    out = capsys.readouterr().out
    heldout = out[out.index("held-out next-token loss"):out.index("mixture weights")]
    assert "0.000" not in heldout
    assert heldout.count("n/a, no held-out rows (the sources gave none at data.heldout_fraction") == 3
    print_summary(_summary(40))
    out = capsys.readouterr().out
    assert "  student after   2.500  1.100" in out and "n/a" not in out
    assert "student export (gguf): run/student.gguf" in out and "student export (hf)" not in out
