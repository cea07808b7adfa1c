"""Reference quantization math: how a weight becomes (values, scales) and back, for every scheme FrontierLM reads.

Scales are kept per output row ("row scales", [N, number of K groups]) whatever the checkpoint's granularity:
a per-tensor scale becomes one column repeated over the rows, a 128x128 block scale is repeated over the 128 rows
of its block. Packed layers (q|k|v, gate|up) then take each checkpoint tensor's rows with their own scales, and
one matmul routine serves per-tensor, per-channel, group and block scales alike.
"""
from __future__ import annotations

import torch

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_max(dtype: torch.dtype = torch.float8_e4m3fn) -> float:
    return float(torch.finfo(dtype).max)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rows_from_blocks(scale: torch.Tensor, rows: int, block_rows: int) -> torch.Tensor:
    """[ceil(N / block_rows), KB] block scales -> [N, KB] row scales (the last block may be partial)."""
    return scale.repeat_interleave(block_rows, dim=0)[:rows]


def row_scales(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int] | None = None) -> torch.Tensor:
    """A checkpoint scale of any granularity -> float32 [rows, KB]. `block` is (block_rows, block_cols) for
    block scales; otherwise the scale is per tensor ([] or [1]), per channel ([N] or [N, 1]) or per group
    ([N, K / g])."""
    scale = scale.float()
    if block is not None:
        expect = (cdiv(rows, block[0]), cdiv(cols, block[1]))
        if tuple(scale.shape) != expect:
            raise ValueError(f"block scales of shape {tuple(scale.shape)} do not match a [{rows}, {cols}] weight "
                             f"in {block[0]}x{block[1]} blocks (expected {expect})")
        return rows_from_blocks(scale, rows, block[0]).contiguous()
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(rows, 1).contiguous()
    if scale.dim() == 1:
        scale = scale[:, None]
    if scale.shape[0] != rows:
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not match a weight of {rows} rows")
    return scale.contiguous()


def group_cols(cols: int, num_groups: int, group: int | None = None) -> int:
    """Columns per K group of a [N, K] weight with `num_groups` scales per row; the last group may be partial,
    so with more than one group the group size must be given."""
    if num_groups == 1:
        return cols
    if group is None or cdiv(cols, group) != num_groups:
        raise ValueError(f"{num_groups} scale columns do not fit {cols} columns in groups of {group}")
    return group


def expand_cols(scale: torch.Tensor, cols: int, group: int | None = None) -> torch.Tensor:
    """[N, KB] row scales -> [N, K], each scale over its group of columns."""
    g = group_cols(cols, scale.shape[1], group)
    return scale.repeat_interleave(g, dim=1)[:, :cols]


def dequantize(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32, group: int | None = None) -> torch.Tensor:
    """values [N, K] (int8 holding int4/int8, or fp8), row scales [N, KB] over groups of `group` columns,
    optional zero points [N, KB] -> (values - zero) * scale in `dtype`."""
    cols = values.shape[1]
    w = values.to(torch.float32)
    if zero_point is not None:
        w = w - expand_cols(zero_point.to(torch.float32), cols, group)
    return (w * expand_cols(scale, cols, group)).to(dtype)


def quantize_int(w: torch.Tensor, bits: int, group_size: int | None,
                 reduce_absmax=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization of [N, K]: values in [-2^(b-1), 2^(b-1) - 1] as int8, row scales [N, KB]
    (KB = 1 per channel, else ceil(K / group_size)). The scale is compressed-tensors' symmetric rule,
    absmax / ((qmax - qmin) / 2); tests check it against compressed_tensors.calculate_qparams.
    reduce_absmax(absmax [N, KB], group_size): a tensor-parallel shard of the columns makes its absmax that of
    the whole row (frontierlm/distributed/layers.py), so every rank quantizes as one process would."""
    n, k = w.shape
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    w = w.float()
    g = k if not group_size else group_size
    pad = cdiv(k, g) * g - k
    wg = torch.nn.functional.pad(w, (0, pad)).view(n, -1, g)
    absmax = wg.abs().amax(-1)
    if reduce_absmax is not None:
        absmax = reduce_absmax(absmax, group_size)
    scale = absmax / ((qmax - qmin) / 2)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(wg / scale[..., None]).clamp(qmin, qmax).to(torch.int8).view(n, -1)[:, :k]
    return q.contiguous(), scale.contiguous()


def quantize_fp8(w: torch.Tensor, strategy: str, block: tuple[int, int] = (128, 128),
                 dtype: torch.dtype = torch.float8_e4m3fn, reduce_absmax=None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (fp8 values [N, K], checkpoint-shaped scale): strategy "tensor" (scale [1]), "channel"
    ([N, 1]) or "block" ([ceil(N / bn), ceil(K / bk)], DeepSeek-V3's weight_scale_inv). value * scale ~ w."""
    n, k = w.shape
    w = w.float()
    fmax = fp8_max(dtype)
    if strategy == "tensor":
        scale = (w.abs().amax() / fmax).clamp(min=1e-12).reshape(1)
        return (w / scale).clamp(-fmax, fmax).to(dtype), scale
    if strategy == "channel":
        absmax = w.abs().amax(1, keepdim=True)
        if reduce_absmax is not None:  # as in quantize_int
            absmax = reduce_absmax(absmax, None)
        scale = (absmax / fmax).clamp(min=1e-12)
        return (w / scale).clamp(-fmax, fmax).to(dtype), scale
    if strategy != "block":
        raise ValueError(f"unknown FP8 strategy {strategy!r}")
    bn, bk = block
    padded = torch.nn.functional.pad(w, (0, cdiv(k, bk) * bk - k, 0, cdiv(n, bn) * bn - n))
    blocks = padded.view(cdiv(n, bn), bn, cdiv(k, bk), bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / fmax).clamp(min=1e-12)  # [NB, KB]
    q = (blocks / scale[:, None, :, None]).clamp(-fmax, fmax).view_as(padded)[:n, :k]
    return q.to(dtype).contiguous(), scale


def pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = cdiv(t.shape[0], multiple) * multiple - t.shape[0]
    return torch.nn.functional.pad(t, (0, 0, 0, extra)) if extra else t


# torch's CPU int4 packing (`_convert_weight_to_int4pack_for_cpu`, aten/src/ATen/native/cpu/int4mm_kernel.cpp)
# stores each block of BLOCK_N rows as [K, BLOCK_N / 2] bytes: a full block of the AVX512 (64 rows) or AVX2
# (32 rows) build puts rows [0, BLOCK_N / 2) in the low nibbles and the rest in the high ones; partial blocks
# and the scalar build pair rows 2j (low) and 2j + 1 (high). Which build runs is the CPU's, so the layout is
# found by unpacking a packed weight and comparing it with the values it was packed from.
INT4PACK_LAYOUTS = ((64, True), (32, True), (32, False))  # (BLOCK_N, full blocks split in halves)


def unpack_int4pack_cpu(packed: torch.Tensor, rows: int, cols: int, layout: tuple[int, bool]) -> torch.Tensor:
    """[..., rows, cols / 2] CPU int4-packed bytes -> [..., rows, cols] uint8 values in [0, 16)."""
    block_n, halves = layout
    lead = packed.shape[:-2]
    flat = packed.reshape(*lead, -1)
    full = rows // block_n * block_n
    parts = []
    if full:
        b = flat[..., :full * cols // 2].reshape(*lead, full // block_n, cols, block_n // 2)
        lo, hi = b & 15, b >> 4
        blocks = torch.cat([lo, hi], -1) if halves else torch.stack([lo, hi], -1).flatten(-2)
        parts.append(blocks.transpose(-1, -2).reshape(*lead, full, cols))
    if rows > full:
        b = flat[..., full * cols // 2:].reshape(*lead, cols, (rows - full) // 2)
        parts.append(torch.stack([b & 15, b >> 4], -1).flatten(-2).transpose(-1, -2))
    return torch.cat(parts, -2) if len(parts) > 1 else parts[0].contiguous()


def find_int4pack_layout(packed: torch.Tensor, values: torch.Tensor) -> tuple[int, bool] | None:
    """The layout under which `packed` unpacks to exactly `values` ([rows, cols] ints in [0, 16)), or None."""
    rows, cols = values.shape
    for layout in INT4PACK_LAYOUTS:
        try:
            if torch.equal(unpack_int4pack_cpu(packed, rows, cols, layout).to(values.dtype), values):
                return layout
        except RuntimeError:  # a size that this layout cannot describe
            continue
    return None
