"""The 1.58-bit BitNet student: conversion from a full-precision causal LM, strict save and load in a
layout plain transformers reads, and the exports for inference (packed, GGUF)."""

from distillation.student.bitnet import (
    BITNET_CONFIG_KEY,
    convert_to_bitnet,
    is_bitnet_student,
    set_quant_mix,
    ternary_weights,
)
from distillation.student.build import build_student, set_compile
from distillation.student.checkpoint import load_student, save_student
from distillation.student.packed import linear_weight_bytes

__all__ = ["BITNET_CONFIG_KEY", "convert_to_bitnet", "is_bitnet_student", "set_quant_mix", "ternary_weights",
           "build_student", "set_compile", "load_student", "save_student", "linear_weight_bytes"]
