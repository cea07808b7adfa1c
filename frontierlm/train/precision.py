"""Which precision a training run computes in: bf16 autocast on CUDA, and on CPUs whose matrix units take bf16
(Intel AMX, or AVX512-BF16); float32 everywhere else.

On a CPU with AMX a bf16 matmul runs several times faster than float32 (the oneDNN kernels behind autocast use
the tile unit), while a CPU without native bf16 emulates it and gets slower, so the choice is detected, not
assumed. Master weights, optimizer state and the loss stay float32 in every case.
"""
from __future__ import annotations

import contextlib

import torch


def cpu_bf16_unit() -> str | None:
    """"AMX" or "AVX512-BF16" when this CPU computes bf16 natively, else None."""
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if cpu is not None and getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def training_precision(device: torch.device, bf16: bool) -> str:
    """A one-line description of the compute precision: 'bf16 autocast (CUDA)', 'bf16 autocast (CPU, AMX)',
    or 'float32 (...why...)'."""
    if not bf16:
        return "float32 (bf16 off)"
    if device.type == "cuda":
        return "bf16 autocast (CUDA)"
    if device.type == "cpu":
        unit = cpu_bf16_unit()
        return f"bf16 autocast (CPU, {unit})" if unit else "float32 (this CPU has neither AMX nor AVX512-BF16)"
    return f"float32 (no bf16 autocast on {device.type})"


def autocast_context(device: torch.device, bf16: bool):
    """The autocast context of training_precision(device, bf16)."""
    if training_precision(device, bf16).startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
