"""FP8 KV cache (`kv_cache_dtype="fp8_e4m3" | "fp8_e5m2"`, vLLM's names; "fp8" means E4M3).

Dense attention keeps one per-tensor scale for K and one for V per layer (`k_scale`, `v_scale`: the
checkpoint's when it has them, else 1.0, vLLM's default). The cache stores K / k_scale and V / v_scale in FP8,
clamped into range; the scales never touch the cache reads: k_scale folds into the softmax scale and v_scale
multiplies the output, so every backend and the compiled decode step read the FP8 rows as they are.
MLA's latent cache stores the normalized latent and the rope key at scale 1 (RMS-normalized values sit far
inside E4M3's range of +-448), clamped and rounded the same way.
"""
from __future__ import annotations

import torch

KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "fp8_e5m2": torch.float8_e5m2}


def kv_cache_torch_dtype(name: str) -> torch.dtype | None:
    """vLLM's kv_cache_dtype name -> the cache's torch dtype (None: the model's dtype)."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    return KV_CACHE_DTYPES[name]


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def round_trip_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as the FP8 cache will hold it: clamped (the cast does not saturate; E4M3 overflows to NaN) and rounded
    to `dtype`. The step attends with these values also where it could use the fresh ones (a prefill without a
    cached prefix), so a prefix-cache hit or a recompute after preemption gives exactly the same result."""
    fmax = torch.finfo(dtype).max
    return x.clamp(-fmax, fmax).to(dtype).to(x.dtype)


def fp8_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan, run) -> torch.Tensor:
    """One dense attention layer over an FP8 cache: `run(q, k, v, scale)` is the float path (backend or paged
    decode) given the already scaled K / V and the softmax scale with k_scale folded in."""
    dtype = attn.kv_cache.dtype
    ks, vs = float(getattr(attn, "k_scale", 1.0)), float(getattr(attn, "v_scale", 1.0))
    if ks != 1.0:
        k = k / ks
    if vs != 1.0:
        v = v / vs
    out = run(q, round_trip_fp8(k, dtype), round_trip_fp8(v, dtype), attn.scale * ks)
    return out * vs if vs != 1.0 else out


def store_rows(flat: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """flat.index_copy_(0, slots, rows) for any cache dtype: CPU has no FP8 index_copy_, so FP8 rows are
    copied as their bytes."""
    rows = rows.to(flat.dtype)
    if is_fp8(flat):
        flat, rows = flat.view(torch.uint8), rows.view(torch.uint8)
    flat.index_copy_(0, slots, rows)
