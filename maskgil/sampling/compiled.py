"""torch.compile'd model methods for the samplers, built once per model and mode and kept.

Sampling calls the same function with the same shapes many times (AR: once per token; MaskGIT:
once per step), so eager mode pays Python and kernel-launch overhead on every call while a
compiled graph fuses the norms, RoPE and SwiGLU around the matmuls and launches a few kernels."""
from __future__ import annotations

import torch


def compiled_method(model, name: str, compile: bool | str = False):
    """`getattr(model, name)`, or with `compile` its torch.compile'd version (True: inductor's
    default mode; a string: that mode, e.g. "reduce-overhead" for CUDA graphs), cached on the model.

    The first batch size gets a graph of its own, the next one a graph with a symbolic batch that
    serves the rest (a single row gets one more, and so do more than 16 rows of the AR decode step,
    where `linear` takes another path)."""
    if not compile:
        return getattr(model, name)
    mode = None if compile is True else compile
    cache = model.__dict__.setdefault("_compiled_methods", {})
    if (name, mode) not in cache:
        if next(model.parameters()).device.type == "cpu":
            from maskgil.training.loop import cpu_compile_available

            if not cpu_compile_available():
                raise RuntimeError("compiled sampling on CPU needs a C++ compiler (g++/clang++) and the Python "
                                   "headers for torch.compile's inductor; install them or pass compile=False")
        cache[name, mode] = torch.compile(getattr(model, name), mode=mode, fullgraph=True)
    return cache[name, mode]
