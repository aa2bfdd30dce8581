"""Training metrics: a weighted loss term that dwarfs the others is named in a warning."""





def test_a_weighted_term_that_dwarfs_the_others_is_named_in_a_warning():
    from distillation.training.metrics import dominance_warning

    calibrated = {"ce_weighted": 8.7, "logits_kl_weighted": 7.0, "attention_weighted": 40.0}
    assert dominance_warning(calibrated) is None
    assert dominance_warning({"ce_weighted": 9.0, "logits_kl_weighted": 0.0, "attention_weighted": 0.0}) is None
    swamped = {"ce_weighted": 8.7, "logits_kl_weighted": 77.6, "attention_weighted": 10715.8}
    assert "gamma * L_AD is 124x the other loss terms" in dominance_warning(swamped)
