"""The miniature teacher's cache key follows what decides the teacher: its rows' sources, splits and length."""

from bench.miniature import miniature_dir
from distillation.config import load_config


def test_the_cache_key_changes_with_the_rows_and_only_with_them():
    key = miniature_dir(load_config().data)
    assert miniature_dir(load_config().data) == key
    assert miniature_dir(load_config(["training.lr=3e-3"]).data) == key
    for change in ("data.seq_len=128", "data.heldout_fraction=0.1", "data.sources=[{name: shakespeare, kind: shakespeare}]"):
        assert miniature_dir(load_config([change]).data) != key, change
