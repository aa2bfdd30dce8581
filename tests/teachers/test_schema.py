"""The one teacher-output schema: dtypes on the wire, column round trip, split/concat, validation."""

import numpy as np
import pytest

from distillation.teachers.schema import TeacherOutput


def _output(batch=3, length=5, k=4, width=8, qkv=True, seed=0):
    rng = np.random.default_rng(seed)
    extra = {key: rng.normal(size=(batch, length, width)) for key in "qkv"} if qkv else {}
    return TeacherOutput(topk_ids=rng.integers(0, 100, (batch, length, k)), topk_logprobs=-rng.random((batch, length, k)),
                         tail_mass=rng.random((batch, length)), temperature=np.full(batch, 5.0), **extra)


def test_wire_dtypes_and_bytes_per_token():
    out = _output()
    assert (out.topk_ids.dtype, out.topk_logprobs.dtype, out.tail_mass.dtype, out.q.dtype) == (
        np.int32, np.float16, np.float32, np.float16)
    # per token: k ids * 4 + k logprobs * 2 + tail 4 + 3 states * width * 2, plus the per-row temperature
    expected = 4 * 4 + 4 * 2 + 4 + 3 * 8 * 2 + 4 / 5
    assert out.nbytes_per_token() == pytest.approx(expected)
    assert not _output(qkv=False).has_qkv


def test_columns_round_trip_and_split_concat_are_inverse():
    out = _output()
    columns = out.to_columns()
    assert set(columns) == {"teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_mass",
                            "teacher_temperature", "teacher_q", "teacher_k", "teacher_v"}
    back = TeacherOutput.from_columns(columns)
    parts = back.split([1, 2])
    assert [p.topk_ids.shape[0] for p in parts] == [1, 2]
    joined = TeacherOutput.concat(parts)
    for name, value in out.to_columns().items():
        np.testing.assert_array_equal(joined.to_columns()[name], value)


def test_validate_rejects_wrong_shape_ids_and_nan():
    ids = np.zeros((3, 5), dtype=np.int64)
    _output().validate(ids, 100)
    with pytest.raises(ValueError, match="do not match input"):
        _output().validate(np.zeros((3, 6)), 100)
    with pytest.raises(ValueError, match="outside"):
        _output().validate(ids, 50)
    bad = _output()
    bad.tail_mass[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        bad.validate(ids, 100)


def test_an_output_carries_exactly_one_signal():
    rng = np.random.default_rng(0)
    sampled = TeacherOutput(temperature=np.ones(2), sampled_ids=rng.integers(0, 9, (2, 3, 4)),
                            sampled_weights=np.full((2, 3, 4), 0.25), sampled_logprobs=-rng.random((2, 3, 4)))
    assert sampled.sampled_weights.dtype == np.float16 and sampled.nbytes_per_token() == pytest.approx(4 * 8 + 4 / 3)
    sampled.validate(np.zeros((2, 3)), 9)
    with pytest.raises(ValueError, match="exactly one signal"):
        TeacherOutput(temperature=np.ones(2))
    with pytest.raises(ValueError, match="exactly one signal"):
        TeacherOutput(temperature=np.ones(2), topk_ids=sampled.sampled_ids, sampled_ids=sampled.sampled_ids)
