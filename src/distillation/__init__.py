"""wrinklefree-distillation: Ray-native BitDistill (full-precision LLM -> 1.58-bit BitNet student)."""

__version__ = "0.1.0"
