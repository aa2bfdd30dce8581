"""The CPU kernel behind packed students: int8 activations times 2-bit ternary weights.

Why our own: transformers' offline BitNet layers unpack every weight to a dense matrix (BitLinear on
each forward, AutoBitLinear once at load), so a packed student would be as large and as slow as the
dense one; llama.cpp's ternary kernels need its own runtime (the GGUF export is that route). This
kernel keeps 2 bits per weight in memory and multiplies int8 activations by them with AVX-512 VNNI
(or AVX2, or plain C), threaded with OpenMP (torch's own runtime, which torch has already loaded).

It is compiled once per machine with the system C compiler (`CC`, else `cc`) into the cache folder,
keyed by the source and the CPU's flags. Without a compiler (or for tensors on a GPU),
`ternary_linear` uses torch's ops, unpacking one block of rows at a time (slower, never a whole layer).
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import partial
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("ternary_kernel.c")
BLOCK = 128  # inputs per 32-byte block of codes (the C file's layout)
FALLBACK_ROWS = 1024
_LIB: Optional[ctypes.CDLL] = None
_TRIED = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    from distillation.config.schema import DataConfig

    return Path(os.path.expanduser(os.environ.get("DISTILL_KERNEL_CACHE", DataConfig().cache_dir))) / "kernels"


def _build(flags: tuple = ("-march=native",)) -> Optional[ctypes.CDLL]:
    """Compile (once per source, CPU and `flags`) and load the kernel; None without a compiler."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    key = hashlib.sha256(SOURCE.read_bytes() + _cpu_flags().encode() + platform.machine().encode()
                         + " ".join(flags).encode()).hexdigest()[:16]
    target = _cache_dir() / f"ternary-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            command = [compiler, "-O3", *flags, "-fopenmp", "-shared", "-fPIC", str(SOURCE), "-o", str(built)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                warnings.warn(f"cannot compile the ternary kernel ({done.stderr.strip().splitlines()[-1:]}); "
                              "packed layers use the slower torch path")
                return None
            os.replace(built, target)  # atomic: a concurrent build of the same key writes the same file
    lib = ctypes.CDLL(str(target))
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.ternary_act_quant.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr]
    lib.ternary_gemm.argtypes = [ptr, ptr, ptr, i64, i64, ptr, i64, f32, ptr, ptr]
    lib.ternary_simd_level.restype = ctypes.c_int
    return lib


def kernel() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None where it cannot be built (then the torch path runs)."""
    global _LIB, _TRIED
    if not _TRIED:
        _TRIED = True
        _LIB = _build()
    return _LIB


def padded(k: int) -> int:
    return -(-k // BLOCK) * BLOCK


def pack_codes(ternary: torch.Tensor) -> torch.Tensor:
    """[N, K] values in {-1, 0, 1} -> [N, padded(K) / 4] uint8 in the kernel's layout."""
    n, k = ternary.shape
    codes = torch.ones(n, padded(k), dtype=torch.uint8)  # padding is the code of 0
    codes[:, :k] = (ternary + 1).to(torch.uint8)
    blocks = codes.view(n, -1, 4, 32)  # [row, block, which quarter, byte]: input 32 * s + j
    out = blocks[:, :, 0] | (blocks[:, :, 1] << 2) | (blocks[:, :, 2] << 4) | (blocks[:, :, 3] << 6)
    return out.reshape(n, -1).contiguous()


def unpack_codes(codes: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `pack_codes`: [N, K] int8 ternary values."""
    n = codes.shape[0]
    blocks = codes.view(n, -1, 1, 32)
    parts = torch.cat([(blocks >> (2 * s)) & 3 for s in range(4)], dim=2)
    return (parts.reshape(n, -1)[:, :k].to(torch.int8) - 1)


def act_quant_reference(x: torch.Tensor) -> tuple:
    """transformers' ActQuant, kept integer: (q int8, scale) with dequantized = q / scale."""
    scale = 127 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127), scale


def ternary_linear(x: torch.Tensor, codes: torch.Tensor, in_features: int, weight_scale: float,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = (ActQuant(x) @ ternary^T) * weight_scale + bias for x [..., in_features]; inference only."""
    shape, dtype = x.shape, x.dtype
    x2 = x.reshape(-1, in_features).to(torch.float32).contiguous()
    n = codes.shape[0]
    lib = kernel() if x2.device.type == "cpu" else None  # the kernel is for CPUs; elsewhere torch's ops
    path = torch_path if lib is None else partial(kernel_path, lib)
    y = path(x2, codes, in_features, weight_scale, bias)
    return y.to(dtype).reshape(*shape[:-1], n)


def kernel_path(lib: ctypes.CDLL, x2: torch.Tensor, codes: torch.Tensor, k: int, weight_scale: float,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The compiled kernel on a contiguous fp32 [T, k] input."""
    t, n, kp = x2.shape[0], codes.shape[0], codes.shape[1] * 4
    q = torch.empty(t, kp, dtype=torch.int8)
    scale = torch.empty(t, dtype=torch.float32)
    qsum = torch.empty(t, dtype=torch.int32)
    y = torch.empty(t, n, dtype=torch.float32)
    lib.ternary_act_quant(x2.data_ptr(), t, k, kp, q.data_ptr(), scale.data_ptr(), qsum.data_ptr())
    b = bias.to(torch.float32).contiguous() if bias is not None else None
    lib.ternary_gemm(q.data_ptr(), scale.data_ptr(), qsum.data_ptr(), t, kp, codes.data_ptr(), n, float(weight_scale),
                     b.data_ptr() if b is not None else None, y.data_ptr())
    return y


def torch_path(x2: torch.Tensor, codes: torch.Tensor, k: int, weight_scale: float, bias) -> torch.Tensor:
    q, scale = act_quant_reference(x2)
    y = torch.empty(x2.shape[0], codes.shape[0], dtype=torch.float32, device=x2.device)
    for start in range(0, codes.shape[0], FALLBACK_ROWS):  # one block of rows dense at a time
        w = unpack_codes(codes[start:start + FALLBACK_ROWS], k).to(torch.float32)
        y[:, start:start + w.shape[0]] = (q @ w.T) / scale * weight_scale
    return y + bias.to(torch.float32) if bias is not None else y
