"""Which float precision to train in: bf16 autocast where the hardware multiplies bf16 natively;
and which memory layout the convolution nets (tokenizers, discriminator, judge) keep.

On CPUs with AMX or AVX512-BF16, oneDNN runs bf16 matmuls and convolutions several times faster
than fp32 (this project's 2-core CI machine: a 2048^3 matmul at 2.6 TFLOP/s in bf16 against 0.38 in
fp32); elsewhere bf16 is emulated and slower than fp32. "auto" picks by that.
"""
from __future__ import annotations

import functools

import torch

PRECISIONS = ("fp32", "bf16", "auto")

# Every conv net the library makes (built, loaded, converted, trained) keeps its weights
# channels-last: oneDNN's NHWC convolutions run 1.2-1.9x faster on a CPU than the default layout
# (benchmarks/bench_tokenizers.py), and one layout everywhere keeps a model's outputs bit-identical
# however it was obtained (the two layouts round differently, ~1e-7).
CONV_MEMORY_FORMAT = torch.channels_last


def native_bf16(device: str | torch.device) -> bool:
    """True if `device` runs bf16 matmuls in hardware (NVIDIA from Ampere on, AMD ROCm GPUs; CPU with
    AMX or AVX512-BF16). Older NVIDIA cards (V100, T4) only emulate bf16, slower than fp32."""
    device = torch.device(device)
    index = device.index if device.index is not None else (torch.cuda.current_device()
                                                           if device.type == "cuda" and torch.cuda.is_available() else 0)
    return _native_bf16(device.type, index)


@functools.lru_cache(maxsize=None)  # the hardware does not change: probe once, not on every train_step
def _native_bf16(device_type: str, index: int = 0) -> bool:
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False
        if torch.version.hip:
            return True
        # torch.cuda.is_bf16_supported() also says True where bf16 is only emulated (pre-Ampere)
        return torch.cuda.get_device_capability(index)[0] >= 8
    if device_type == "cpu":
        # Private but long-standing probes (torch.cpu); a torch without them counts as no support.
        probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
        return any(p is not None and p() for p in probes)
    return False


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """'fp32' | 'bf16' from 'fp32' | 'bf16' | 'auto' ('auto': bf16 where `native_bf16`, else fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision
