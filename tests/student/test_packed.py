"""The packed 2-bit export: the training outputs bit for bit, 2 bits per weight."""


import pytest
import torch
from transformers.integrations.bitnet import AutoBitLinear

from distillation.errors import DistillError
from distillation.student import convert_to_bitnet, load_student, save_student


@pytest.mark.parametrize("subln", ["paper", "allnorm"])
def test_packed_export_reproduces_training_outputs_and_stores_2_bits_per_weight(tiny_llama, tmp_path, subln):
    from distillation.student import linear_weight_bytes, pack_student, set_compile
    from distillation.student.export import export_packed
    from distillation.student.packed import PackedBitLinear

    set_compile(False)
    convert_to_bitnet(tiny_llama, subln)
    for module in tiny_llama.modules():  # SubLN gains away from 1, so a wrong copy would show
        if isinstance(module, AutoBitLinear) and module.rms_norm is not None:
            module.rms_norm.weight.data.uniform_(0.5, 1.5)
    tiny_llama.eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        trained = tiny_llama(input_ids=ids).logits
    src = save_student(tiny_llama, tmp_path / "student")
    sizes = export_packed(src, tmp_path / "packed")
    packed = load_student(tmp_path / "packed").eval()
    assert packed.config.bitnet["weights"] == "packed"
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, trained, rtol=0, atol=0)  # bit for bit
    matrices = [m for m in packed.modules() if isinstance(m, PackedBitLinear)]
    # 2 bits per weight plus one fp32 scale per matrix, against 16 bits per weight
    assert sizes["stored"] == sum(m.in_features * m.out_features // 4 + 4 for m in matrices)
    assert sizes["fp16"] == sum(m.in_features * m.out_features * 2 for m in matrices)
    assert linear_weight_bytes(pack_student(load_student(src)))["stored"] == sizes["stored"]
    with pytest.raises(DistillError, match="already packed"):
        export_packed(tmp_path / "packed", tmp_path / "again")
