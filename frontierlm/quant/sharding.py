"""Where a parameter's shard lies in a quantized checkpoint tensor, and reading only that part.

A layer shard is a `Region` of one checkpoint tensor's logical [N, K] matrix (rows = output features, columns
= input features): a column-parallel layer (or one part of packed q|k|v, gate|up) takes a range of rows, a
row-parallel one a range of columns, a vocab-parallel LM head a range of vocabulary rows. The parallel layers
(distributed/layers.py, distributed/moe.py) say which region they hold (`shard_region`); the float loaders and
the quantized loaders (linear_methods.py, moe.py) both read through it, so there is one mapping. For each
stored tensor this module maps the region to the stored one and reads only that from a safetensors slice:

* values (FP8, int8 as stored): the region itself.
* `weight_packed` (compressed-tensors pack-quantized: 32 / bits values per int32 along K): the int32 words
  that cover the columns, unpacked, then trimmed (a shard that starts inside a word reads that one word).
* scales: per tensor: the one value (replicated); per channel: the rows (a row-parallel shard reads every
  row: the scale is per output row); groups: the rows and the groups of the columns, which must start and end
  on group boundaries (a group across two ranks is refused, naming the numbers); 128x128 blocks: the blocks
  that cover the rows (repeated per row and trimmed, so any row boundary works) and the column blocks, which
  must be whole (refused otherwise).
* zero points (pack-quantized int32, 8 per word along N): the covering words, unpacked, trimmed.

`COUNTER` adds up the bytes read, so tests can check that a rank read about 1 / T of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from frontierlm.quant import formats


@dataclass(frozen=True)
class Region:
    """Rows [row0, row0 + rows) and columns [col0, col0 + cols) of a checkpoint matrix of full_rows x full_cols."""
    row0: int
    rows: int
    col0: int
    cols: int
    full_rows: int
    full_cols: int

    @staticmethod
    def whole(rows: int, cols: int) -> "Region":
        return Region(0, rows, 0, cols, rows, cols)


class ReadCounter:
    """Bytes of checkpoint tensors the quantized loaders read in this process."""

    def __init__(self):
        self.bytes = 0

    def add(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes += t.numel() * t.element_size()
        return t


COUNTER = ReadCounter()


def shape_of(loaded) -> tuple[int, ...]:
    return tuple(loaded.shape if isinstance(loaded, torch.Tensor) else loaded.get_shape())


def read(loaded, *index: slice) -> torch.Tensor:
    """loaded[index] of a tensor or a lazy safetensors slice (only that part is read), counted."""
    if isinstance(loaded, torch.Tensor):
        return COUNTER.add(loaded[index] if index else loaded)
    if not index:
        return COUNTER.add(loaded[:])
    index = index + (slice(None),) * (len(loaded.get_shape()) - len(index))
    return COUNTER.add(loaded[index])


def layer_region(layer, shard_id) -> Region:
    """The region one checkpoint tensor (one part of a packed layer) gives this layer; a layer without
    `shard_region` (a single-process layer) takes the whole tensor."""
    own = getattr(layer, "shard_region", None)
    if own is not None:
        return own(shard_id)
    if shard_id is None:
        return Region.whole(layer.output_size, layer.input_size)
    return Region.whole(layer.shard_offsets[shard_id][1], layer.input_size)


def _check(loaded, r: Region, what: str, shape: tuple[int, ...]) -> None:
    if shape_of(loaded) != shape:
        raise ValueError(f"shape mismatch: expected {what} of shape {shape} for a [{r.full_rows}, {r.full_cols}] "
                         f"weight, checkpoint has {shape_of(loaded)}")


def values(loaded, r: Region) -> torch.Tensor:
    """FP8 / int8 values as stored: [rows, cols]."""
    _check(loaded, r, "values", (r.full_rows, r.full_cols))
    return read(loaded, slice(r.row0, r.row0 + r.rows), slice(r.col0, r.col0 + r.cols))


def packed_values(loaded, r: Region, bits: int) -> torch.Tensor:
    """pack-quantized int32 words [N, ceil(K / per)] -> int8 values [rows, cols]."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    per = 32 // bits
    _check(loaded, r, "weight_packed", (r.full_rows, formats.cdiv(r.full_cols, per)))
    w0, w1 = r.col0 // per, formats.cdiv(r.col0 + r.cols, per)
    words = read(loaded, slice(r.row0, r.row0 + r.rows), slice(w0, w1))
    cols = min(w1 * per, r.full_cols) - w0 * per
    out = unpack_from_int32(words, bits, torch.Size((r.rows, cols)))
    start = r.col0 - w0 * per
    return out[:, start:start + r.cols]


def _group_range(r: Region, group: int, what: str) -> tuple[int, int]:
    """The scale columns of the region's columns, which must be whole groups of `group` columns."""
    end = r.col0 + r.cols
    if r.col0 % group or (end % group and end != r.full_cols):
        raise ValueError(f"this rank's input columns [{r.col0}, {end}) of {r.full_cols} do not start and end on "
                         f"the checkpoint's {what} of {group} columns (one would span two ranks); choose a "
                         f"tensor_parallel_size that leaves a multiple of {group} columns per rank")
    return r.col0 // group, formats.cdiv(end, group)


def scales(loaded, r: Region, scheme) -> torch.Tensor:
    """Any stored scale -> float32 row scales [rows, scale columns of the region]."""
    shape = shape_of(loaded)
    rows = slice(r.row0, r.row0 + r.rows)
    if scheme.strategy == "block":
        bn, bk = scheme.block
        _check(loaded, r, "block scales", (formats.cdiv(r.full_rows, bn), formats.cdiv(r.full_cols, bk)))
        c0, c1 = _group_range(r, bk, "scale blocks")
        b0, b1 = r.row0 // bn, formats.cdiv(r.row0 + r.rows, bn)
        blocks = read(loaded, slice(b0, b1), slice(c0, c1)).float()
        start = r.row0 - b0 * bn
        return blocks.repeat_interleave(bn, dim=0)[start:start + r.rows].contiguous()
    if int(torch.tensor(shape).prod()) == 1:  # per tensor: one value, on every rank
        return read(loaded).float().reshape(1, 1).expand(r.rows, 1).contiguous()
    if scheme.strategy == "group":
        _check(loaded, r, "group scales", (r.full_rows, formats.cdiv(r.full_cols, scheme.group_size)))
        c0, c1 = _group_range(r, scheme.group_size, "quantization groups")
        return read(loaded, rows, slice(c0, c1)).float().contiguous()
    # per channel: [N] or [N, 1], one scale per output row whatever the columns
    if shape not in ((r.full_rows,), (r.full_rows, 1)):
        raise ValueError(f"scale of shape {shape} does not match a weight of {r.full_rows} rows")
    return read(loaded, rows).float().reshape(r.rows, 1).contiguous()


def _dtype(loaded) -> str:
    return str(loaded.dtype).removeprefix("torch.") if isinstance(loaded, torch.Tensor) else \
        {"I8": "int8", "I32": "int32"}.get(loaded.get_dtype(), loaded.get_dtype())


def zero_points(loaded, r: Region, scheme) -> torch.Tensor:
    """int8 [N, KB] or pack-quantized int32 [ceil(N / per), KB] (packed along N) -> int8 [rows, KB of region]."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    c0, c1 = _group_range(r, scheme.group_size, "quantization groups") if scheme.strategy == "group" else (0, 1)
    if _dtype(loaded) == "int8":
        return read(loaded, slice(r.row0, r.row0 + r.rows), slice(c0, c1)).reshape(r.rows, -1)
    per = 32 // scheme.bits
    w0, w1 = r.row0 // per, formats.cdiv(r.row0 + r.rows, per)
    words = read(loaded, slice(w0, w1), slice(c0, c1))
    rows = min(w1 * per, r.full_rows) - w0 * per
    out = unpack_from_int32(words, scheme.bits, torch.Size((rows, c1 - c0)), packed_dim=0)
    start = r.row0 - w0 * per
    return out[start:start + r.rows]


def check_shape(loaded, r: Region) -> None:
    got = [int(v) for v in read(loaded).flatten()]
    if got != [r.full_rows, r.full_cols]:
        raise ValueError(f"weight_shape {got} does not match the checkpoint matrix's [{r.full_rows}, {r.full_cols}]")


def dequantized(r: Region, scheme, vals: torch.Tensor, row_scales: torch.Tensor,
                zero: torch.Tensor | None = None) -> torch.Tensor:
    """The float shard (tests compare it with the matching slice of the whole dequantized matrix)."""
    group = scheme.group_size if scheme.strategy == "group" else scheme.block[1] if scheme.strategy == "block" \
        else r.cols
    return formats.dequantize(vals, row_scales, zero, group=group)
