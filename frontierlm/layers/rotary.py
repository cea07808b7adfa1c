"""Rotary position embeddings with the transformers rope types: default, linear, dynamic (NTK), yarn, llama3.

Frequencies are computed with the same float32 ops as transformers so logits match at float32 tolerance.
cos/sin are precomputed once per position (a table, grown on demand); only dynamic NTK past the original
context needs per-forward work.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def rope_parameters(hf_config) -> dict:
    """transformers 5 keeps everything in `rope_parameters`; older configs use `rope_scaling` + `rope_theta`."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _base_inv_freq(base, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn_inv_freq(p: dict, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    base, factor = p["rope_theta"], p.get("factor")
    orig = p.get("original_max_position_embeddings") or max_pos
    if factor is None:
        factor = max_pos / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = p.get("attention_factor")
    if attn_factor is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attn_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):  # the dim index whose wavelength makes `rotations` turns over `orig`
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp  # high-frequency dims keep their original frequency, low ones are interpolated
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, attn_factor


def _llama3_inv_freq(p: dict, dim: int, max_pos: int) -> torch.Tensor:
    inv_freq = _base_inv_freq(p["rope_theta"], dim)
    factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p.get("original_max_position_embeddings") or max_pos
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, params: dict, rotary_dim: int | None = None):
        super().__init__()
        self.rotary_dim = rotary_dim or int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.max_position = max_position
        self.params = params
        self.rope_type = params["rope_type"]
        dim = self.rotary_dim
        self.attention_scaling = 1.0
        if self.rope_type == "default":
            inv_freq = _base_inv_freq(params["rope_theta"], dim)
        elif self.rope_type == "linear":
            inv_freq = _base_inv_freq(params["rope_theta"], dim) / params["factor"]
        elif self.rope_type == "dynamic":
            # Within the original context dynamic NTK is plain RoPE (transformers clamps seq_len up to it).
            inv_freq = _base_inv_freq(params["rope_theta"], dim)
        elif self.rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(params, dim, max_position)
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(params, dim, max_position)
        else:
            raise ValueError(f"unsupported rope type {self.rope_type!r}; "
                             "supported: default, linear, dynamic, yarn, llama3")
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.register_buffer("cos_sin", self._table(max_position), persistent=False)

    def _table(self, length: int) -> torch.Tensor:
        """[length, rotary_dim] float32: cos of each frequency in the first half, sin in the second."""
        pos = torch.arange(length, device=self.inv_freq.device).float()
        freqs = pos[:, None] * self.inv_freq[None, :]
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1) * self.attention_scaling

    def _dynamic_inv_freq(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """[n] context lengths -> [n, rotary_dim/2] NTK-scaled frequencies (transformers' formula, float32)."""
        p, dim, max_pos = self.params, self.rotary_dim, self.max_position
        seq = torch.clamp(seq_lens.to(torch.int64), min=max_pos).float()
        base = p["rope_theta"] * ((p["factor"] * seq / max_pos) - (p["factor"] - 1)) ** (dim / (dim - 2))
        exps = torch.arange(0, dim, 2, dtype=torch.int64, device=seq.device).float() / dim
        return 1.0 / (base[:, None] ** exps[None, :])

    def cos_sin_for(self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None,
                    max_len: int | None = None) -> torch.Tensor:
        """cos|sin rows for `positions`. `seq_lens` (same shape as positions) is each token's sequence
        context length, used by dynamic NTK only; `max_len` is a host bound on positions + 1 if known."""
        if self.rope_type == "dynamic" and seq_lens is not None:
            # Dynamic NTK rule (as transformers): a sequence whose context length L exceeds the original
            # max_position_embeddings uses base * ((factor * L / max_pos) - (factor - 1)) ** (d / (d - 2)),
            # recomputed per sequence from its length in this step; shorter sequences use plain RoPE.
            # (Keys already in the cache keep the rotation they were written with, as in transformers.)
            if max_len is None:
                max_len = int(seq_lens.max()) if seq_lens.numel() else 0
            if max_len > self.max_position:
                inv = self._dynamic_inv_freq(seq_lens.reshape(-1)).to(self.inv_freq.device)
                freqs = positions.reshape(-1, 1).float() * inv
                table = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
                return table.view(*positions.shape, self.rotary_dim)
        if max_len is None:
            max_len = int(positions.max()) + 1 if positions.numel() else 0
        if max_len > self.cos_sin.shape[0]:  # positions past the table (e.g. dynamic NTK): grow it
            self.cos_sin = self._table(max(max_len, 2 * self.cos_sin.shape[0]))
        return self.cos_sin[positions]

    @staticmethod
    def expand(cos_sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-forward prep shared by every layer: cos_sin [..., rotary_dim] -> (cos, signed sin), each
        [..., 1, rotary_dim] so that rotate(x) = x * cos + cat(x2, x1) * signed_sin (transformers' formula
        with rotate_half's negation folded into the sine)."""
        cos, sin = cos_sin.to(dtype).unsqueeze(-2).chunk(2, dim=-1)
        return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Rotate x [..., H, D] (q, k, or both stacked along H) with expand()'s output."""
        cos, signed_sin = cos_sin
        d = self.rotary_dim
        rot = x[..., :d] if d != x.shape[-1] else x
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.addcmul(rot * cos, torch.cat([x2, x1], dim=-1), signed_sin)
        return out if d == x.shape[-1] else torch.cat([out, x[..., d:]], dim=-1)
