"""What `dtype="auto"` means on this machine: the checkpoint's dtype, except where the CPU makes it slow.

bfloat16 matmuls on CPU are fast only with hardware support, which oneDNN uses when present: AMX tiles
(Sapphire Rapids and later) or AVX512-BF16 dot products (Cooper Lake, Zen 4). Without either, torch emulates
bfloat16 through float32 conversions and is slower than plain float32, so a bfloat16 or float16 checkpoint is
upcast to float32 there (float16 always is: torch's CPU kernels for it are slow). Measured on the 2-core Xeon with AMX (docs/benchmarks.md, "bfloat16 on CPU").
A float32 checkpoint stays float32 (asking for `dtype="bfloat16"` is the user's call: it changes numerics).
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_feature(flags: frozenset[str] | None = None) -> str | None:
    """'AMX' or 'AVX512-BF16' when the CPU computes bfloat16 matmuls in hardware, else None."""
    flags = cpu_flags() if flags is None else flags
    if {"amx_bf16", "amx_tile"} <= flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


def choose_dtype(checkpoint_dtype: torch.dtype, device: torch.device,
                 flags: frozenset[str] | None = None) -> tuple[torch.dtype, str]:
    """(dtype, reason) for dtype="auto"."""
    if device.type != "cpu" or checkpoint_dtype == torch.float32:
        return checkpoint_dtype, "the checkpoint's dtype"
    if checkpoint_dtype != torch.bfloat16:  # float16: torch's CPU kernels for it are slow; upcasting is exact
        return torch.float32, f"checkpoint is {_name(checkpoint_dtype)}, upcast to float32 on CPU"
    feature = cpu_bf16_feature(flags)
    if feature is None:
        return torch.float32, (f"checkpoint is bfloat16 but this CPU ({torch.backends.cpu.get_cpu_capability()}) "
                               "has no AMX or AVX512-BF16: float32 is faster here")
    return torch.bfloat16, f"the checkpoint's dtype; this CPU has {feature} for bfloat16 matmuls"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
