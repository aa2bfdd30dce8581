"""Teacher/student vocabulary checks: padding rows are aligned with a warning, anything else fails."""

import pytest

from distillation.errors import DistillError
from distillation.models import load_tokenizer
from distillation.vocab import check_vocab


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def test_same_vocabulary_passes_silently(tokenizer, recwarn):
    assert check_vocab(tokenizer, 49152, tokenizer, 49152) == 49152
    assert not recwarn.list


def test_padding_rows_are_aligned_to_the_shared_real_range_with_a_warning(tokenizer):
    with pytest.warns(UserWarning, match=r"differ only by padding rows; distilling over the shared real range \[0, 49152\)"):
        assert check_vocab(tokenizer, 49152, tokenizer, 49216) == 49152


def test_any_other_mismatch_names_both_sizes(tokenizer):
    with pytest.raises(DistillError, match="teacher has 49152 token ids .* student has 32000"):
        check_vocab(tokenizer, 49152, tokenizer, 32000)


def test_tokenizers_that_split_text_differently_are_refused(tokenizer, smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(smollm2_dir)
    other.add_tokens(["To be"])  # one new token changes how the probe text is split
    with pytest.raises(DistillError, match="tokenizers disagree on 'To be, or not to be"):
        check_vocab(tokenizer, 49152, other, 49152)
