"""Quantized linear layers: what a `Linear` holds and computes once it has a `quant_method` (vLLM's shape:
`create_weights`, `process_weights_after_loading`, `apply`).

Loading: the layer's float `weight` is replaced by parameters named as the checkpoint names them (`weight` in
FP8, `weight_packed`, `weight_scale`, `weight_scale_inv`, `weight_zero_point`, `weight_shape`, `input_scale`);
each has a weight_loader that takes one checkpoint tensor (one shard of a packed q|k|v or gate|up layer), unpacks
it and writes its rows, so every format lands in one layout: values [N, K] and row scales [N, KB]
(formats.py). A float checkpoint with `quantization=...` keeps `weight` and is quantized after loading.

Compute (after loading):
* int8: `torch._weight_int8pack_mm` (per-channel; group scales run one call per group), activations in
  bfloat16, the packed kernels' fast dtype on this CPU (measured: float32 activations ran 5-20x slower);
  batches of more than SMALL_BATCH rows multiply a bfloat16 copy of the int8 matrix instead (AMX matmul).
* int4: `torch._convert_weight_to_int4pack_for_cpu` + `torch._weight_int4pack_mm_for_cpu` (CPU) or tinygemm
  (`_weight_int4pack_mm`, CUDA), group scales and zero points in the kernel's (q - 8) * scale + zero form.
  torchao's CPU int8/int4 weight-only layouts call these same aten kernels, so it is not a faster option here.
* FP8: on CPU the weight stays FP8 and is dequantized one column block at a time inside the matmul (an N x 128
  slice per block, never the full float matrix); on CUDA per-tensor / per-channel weights run W8A8 through
  `torch._scaled_mm` with dynamic per-token activation scales (or the checkpoint's static input scale).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from frontierlm.quant import formats, sharding
from frontierlm.quant.config import WeightScheme

SMALL_BATCH = 32          # rows up to which the packed int8 kernel beats a bf16 matmul of the dequantized matrix
# rows from which unpacking the int4 matrix to bfloat16 once per call and F.linear beat the int4 kernel (which
# re-reads the weight for every 4 rows): measured 1.0x at 96 rows, 1.5x at 128, 2-2.9x at 192-512
# (`benchmarks/quant.py int4-rows`, docs/benchmarks.md)
INT4_DENSE_ROWS = 128
INT4_KERNEL_GROUPS = (256, 128, 64, 32)
FP8_CHUNK = 128           # columns of the FP8 weight dequantized at a time on CPU
_SAFETENSORS_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I8": torch.int8,
                       "I32": torch.int32, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _shard_rows(layer: nn.Module, shard_id) -> tuple[int, int]:
    if shard_id is None:
        return 0, layer.output_size
    offsets = getattr(layer, "shard_offsets", None)
    if offsets is None:
        raise ValueError(f"layer is not packed, got shard id {shard_id!r}")
    if shard_id not in offsets:
        raise ValueError(f"unknown shard id {shard_id!r}; expected one of {list(offsets)}")
    return offsets[shard_id]


class QuantLinearMethod:
    def __init__(self, scheme: WeightScheme, checkpoint_format: str | None):
        self.scheme = scheme
        self.checkpoint_format = checkpoint_format  # None: the float weight is quantized after loading

    # ---- loading ------------------------------------------------------------------------------------
    def group_cols(self, cols: int) -> int:
        """Columns that share one scale: the group, the block's width, or every column."""
        s = self.scheme
        return s.group_size if s.strategy == "group" else s.block[1] if s.strategy == "block" else cols

    def num_scale_cols(self, cols: int) -> int:
        s = self.scheme
        if s.strategy == "group":
            return formats.cdiv(cols, s.group_size)
        if s.strategy == "block":
            return formats.cdiv(cols, s.block[1])
        return 1

    def create_weights(self, layer: nn.Module) -> None:
        """Swap the float weight for the checkpoint's tensors (only for a quantized checkpoint)."""
        layer.quant_method = self
        if self.checkpoint_format is None:
            return
        n, k, s = layer.output_size, layer.input_size, self.scheme
        device, shard_ids = layer.weight.device, getattr(layer.weight, "shard_ids", None)
        del layer.weight
        kb = self.num_scale_cols(k)
        names = []
        if s.kind == "float":
            self._param(layer, "weight", torch.zeros(n, k, dtype=torch.float8_e4m3fn, device=device), self._load_values)
            names.append("weight")
            scale = "weight_scale_inv" if self.checkpoint_format == "deepseek-fp8" else "weight_scale"
            if s.activations == "static":
                self._param(layer, "input_scale", torch.zeros(len(shard_ids or (None,)), device=device),
                            self._load_input_scale)
                names.append("input_scale")
        elif self.checkpoint_format == "pack-quantized":
            self._param(layer, "weight_packed", torch.zeros(n, k, dtype=torch.int8, device=device), self._load_packed)
            self._param(layer, "weight_shape", torch.zeros(2, dtype=torch.int64, device=device), self._check_shape)
            names += ["weight_packed", "weight_shape"]
            if not s.symmetric:
                self._param(layer, "weight_zero_point", torch.zeros(n, kb, dtype=torch.int8, device=device),
                            self._load_zero_point)
                names.append("weight_zero_point")
            scale = "weight_scale"
        else:  # int-quantized / naive-quantized: int8 values stored as they are
            self._param(layer, "weight", torch.zeros(n, k, dtype=torch.int8, device=device), self._load_values)
            names.append("weight")
            scale = "weight_scale"
        self._param(layer, scale, torch.zeros(n, kb, device=device), self._load_scale)
        names.append(scale)
        layer.quant_param_names = tuple(names)
        for name in names:  # the loader checks that every shard of a packed layer was loaded
            if shard_ids is not None:
                getattr(layer, name).shard_ids = shard_ids

    def _param(self, layer, name, data, loader) -> None:
        p = nn.Parameter(data, requires_grad=False)
        p.weight_loader = lambda param, w, shard_id=None, _l=layer, _f=loader: _f(_l, param, w, shard_id)
        p.loads_slices = True  # models/loader.py hands over a lazy safetensors slice: only the region is read
        layer.register_parameter(name, p)

    # Each loader reads only this layer's region of the checkpoint tensor (quant/sharding.py: a tensor-parallel
    # shard, or all of it), from a lazy safetensors slice, into the layer's rows of that part.
    def _target(self, layer, param, shard_id):
        off, size = _shard_rows(layer, shard_id)
        r = sharding.layer_region(layer, shard_id)
        if r.rows > size:
            raise ValueError(f"shard of {r.rows} rows does not fit the layer's {size}")
        return param.data.narrow(0, off, r.rows), r  # fewer rows: a vocab-parallel head's padding stays 0

    def _load_values(self, layer, param, w, shard_id) -> None:
        target, r = self._target(layer, param, shard_id)
        dtype = w.dtype if isinstance(w, torch.Tensor) else _SAFETENSORS_DTYPES.get(w.get_dtype())
        if dtype != param.dtype and not (dtype is not None and dtype.is_floating_point and dtype.itemsize == 1
                                         and param.dtype.is_floating_point):
            raise ValueError(f"expected {param.dtype} weights for {self.scheme.describe()}, got {dtype}")
        if dtype == torch.float8_e5m2:
            raise ValueError("FP8 E5M2 weights are not supported (E4M3 is)")
        if r.rows:
            target.copy_(sharding.values(w, r))

    def _load_packed(self, layer, param, w, shard_id) -> None:
        target, r = self._target(layer, param, shard_id)
        if r.rows:
            target.copy_(sharding.packed_values(w, r, self.scheme.bits))

    def _load_zero_point(self, layer, param, w, shard_id) -> None:
        target, r = self._target(layer, param, shard_id)
        if r.rows:
            target.copy_(sharding.zero_points(w, r, self.scheme))

    def _check_shape(self, layer, param, w, shard_id) -> None:
        sharding.check_shape(w, sharding.layer_region(layer, shard_id))
        param.data.copy_(torch.tensor([layer.output_size, layer.input_size]))

    def _load_scale(self, layer, param, w, shard_id) -> None:
        target, r = self._target(layer, param, shard_id)
        if not r.rows:
            return
        rows = sharding.scales(w, r, self.scheme)
        if rows.shape[1] != param.shape[1]:
            raise ValueError(f"scale of shape {sharding.shape_of(w)} does not match {self.scheme.describe()} of "
                             f"this layer's [{r.rows}, {layer.input_size}] shard")
        target.copy_(rows)

    def _load_input_scale(self, layer, param, w, shard_id) -> None:
        ids = list(getattr(layer, "shard_offsets", {None: 0}))
        param.data[ids.index(shard_id)] = sharding.read(w).float().max()

    # ---- after loading: the runtime layout ----------------------------------------------------------
    @torch.no_grad()
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        s = self.scheme
        if self.checkpoint_format is None:  # float checkpoint: quantize it now
            w = layer.weight.data
            del layer.weight
            reduce = getattr(layer, "reduce_absmax", None)  # a row-parallel shard: scales of the whole rows
            if s.kind == "float":
                if reduce is not None and s.strategy != "channel":
                    raise ValueError(f"FP8 {s.strategy} scales with tensor parallelism are not supported")
                values, scale = formats.quantize_fp8(w, s.strategy, s.block or (128, 128), reduce_absmax=reduce)
                scale = formats.row_scales(scale, w.shape[0], w.shape[1], s.block if s.strategy == "block" else None)
            else:
                values, scale = formats.quantize_int(w, s.bits, s.group_size, reduce_absmax=reduce)
            zero, input_scale = None, None
        else:
            values = (layer.weight if s.kind == "float" or self.checkpoint_format != "pack-quantized"
                      else layer.weight_packed).data
            scale_name = "weight_scale_inv" if self.checkpoint_format == "deepseek-fp8" else "weight_scale"
            scale = getattr(layer, scale_name).data
            zero = layer.weight_zero_point.data if hasattr(layer, "weight_zero_point") else None
            input_scale = layer.input_scale.data.max() if hasattr(layer, "input_scale") else None
            for name in layer.quant_param_names:
                delattr(layer, name)
        self.kernel = make_kernel(s, values, scale, zero, input_scale, self.group_cols(layer.input_size))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.kernel(x.reshape(-1, x.shape[-1]))
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, y.shape[-1])

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the kernel computes with (tests, and modules that need the matrix itself)."""
        return self.kernel.dequantized()


def make_kernel(s: WeightScheme, values, scale, zero, input_scale, group: int):
    """`group`: columns per scale column (the last group of a row may be partial)."""
    if s.kind == "float":
        return Fp8Kernel(values, scale, input_scale, group)
    if s.bits == 8:
        return Int8Kernel(values, scale, group)
    return Int4Kernel(values, scale, zero, group)


class Int8Kernel(nn.Module):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, group: int):
        super().__init__()
        self.n, self.k = q.shape
        self.num_groups = scale.shape[1]
        self.g = formats.group_cols(self.k, self.num_groups, group)
        if self.num_groups == 1:  # the kernel reads K in 32-column tiles (other K crash it): pad with zeros
            self.g = formats.cdiv(self.k, 32) * 32
        # groups that are not whole tiles take the bfloat16 matmul at every batch size
        self.packed_ok = self.g % 32 == 0
        kp = self.g * self.num_groups
        qp = F.pad(q, (0, kp - self.k))
        # [G, N, g]: each group's columns contiguous, for one kernel call per group
        self.q = qp.view(self.n, self.num_groups, self.g).transpose(0, 1).contiguous()
        self.scale = scale.t().contiguous().to(torch.bfloat16)  # [G, N]
        self.scale_f32 = scale.t().contiguous()

    def dequantized(self) -> torch.Tensor:
        w = self.q.float() * self.scale_f32[:, :, None]
        return w.transpose(0, 1).reshape(self.n, -1)[:, :self.k]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xb = x.to(torch.bfloat16)
        if self.g * self.num_groups != self.k:
            xb = F.pad(xb, (0, self.g * self.num_groups - self.k))
        if x.shape[0] > SMALL_BATCH or x.device.type != "cpu" or not self.packed_ok:
            y = None
            for i in range(self.num_groups):
                part = F.linear(xb[:, i * self.g:(i + 1) * self.g], self.q[i].to(torch.bfloat16)) * self.scale[i]
                y = part if y is None else y + part
            return y.to(dtype)
        if self.num_groups == 1:
            return torch._weight_int8pack_mm(xb, self.q[0], self.scale[0]).to(dtype)
        y = torch._weight_int8pack_mm(xb[:, :self.g].contiguous(), self.q[0], self.scale[0]).float()
        for i in range(1, self.num_groups):
            y += torch._weight_int8pack_mm(xb[:, i * self.g:(i + 1) * self.g].contiguous(), self.q[i], self.scale[i])
        return y.to(dtype)


class Int4Kernel(nn.Module):
    """Signed int4 values [N, K] (int8 storage), row scales [N, KB], optional signed zero points [N, KB]."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int):
        super().__init__()
        self.n, self.k = q.shape
        g = formats.group_cols(self.k, scale.shape[1], group)
        self.ref = (q, scale, zero, torch.float32, g)  # kept only when no kernel group size fits (see below)
        # one scale per row fits any kernel group (columns are padded: the least padding, then the fewest
        # scales, so K = 32 is not stored as 256 columns); groups need a kernel size dividing them
        if scale.shape[1] == 1:
            self.kernel_g = min(INT4_KERNEL_GROUPS, key=lambda kg: (formats.cdiv(self.k, kg) * kg, -kg))
        else:
            self.kernel_g = next((kg for kg in INT4_KERNEL_GROUPS if g % kg == 0), None)
        if self.kernel_g is None:  # e.g. group 16: no packed kernel, compute from a bfloat16 copy
            self.w = formats.dequantize(q, scale, zero, torch.bfloat16, g)
            return
        if scale.shape[1] == 1:
            g = formats.cdiv(self.k, self.kernel_g) * self.kernel_g
        reps = g // self.kernel_g
        kp = formats.cdiv(self.k, g) * g
        scale_k = scale.repeat_interleave(reps, 1)
        zero_k = None if zero is None else zero.repeat_interleave(reps, 1)
        u = F.pad(q.to(torch.int32) + 8, (0, kp - self.k), value=8)  # padded columns dequantize to 0
        u = formats.pad_rows(u, 16) if u.shape[0] % 16 else u
        np_ = u.shape[0]
        scale_k = F.pad(scale_k, (0, 0, 0, np_ - self.n))
        zf = torch.zeros_like(scale_k) if zero_k is None else -F.pad(zero_k.float(), (0, 0, 0, np_ - self.n)) * scale_k
        # the kernel's [K / g, N, 2] (scale, zero) with w = (u - 8) * scale + zero
        self.scales_zeros = torch.stack([scale_k.t(), zf.t()], dim=-1).contiguous().to(torch.bfloat16)
        self.kp = kp
        self.layout = None  # the CPU packing's layout, when known: lets prefill take the dense path
        if u.device.type == "cpu":
            self.packed = torch._convert_weight_to_int4pack_for_cpu(u, 1)
            self.layout = formats.find_int4pack_layout(self.packed, u)
        else:
            packed_u8 = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
            self.packed = torch._convert_weight_to_int4pack(packed_u8, 8)
        self.ref = None

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The [N padded, K padded] matrix the packed kernel computes with, unpacked from its packing (once per
        prefill forward: the kernel re-reads the weight for every 4 rows, so many rows go faster dense)."""
        rows, kp = self.packed.shape[0], self.kp
        u = formats.unpack_int4pack_cpu(self.packed, rows, kp, self.layout).view(rows, -1, self.kernel_g)
        return affine_int4(u, self.scales_zeros, dtype).view(rows, kp)

    def dequantized(self) -> torch.Tensor:
        if self.ref is None:  # through the kernel itself, on the identity: exactly what it computes
            eye = torch.eye(self.k, device=self.packed.device)
            return self.forward(eye, dense=False).float().t().contiguous()
        return formats.dequantize(*self.ref)

    def forward(self, x: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        """dense: None = by row count (INT4_DENSE_ROWS, CPU); True / False force a path (tests, benchmarks)."""
        dtype = x.dtype
        if self.kernel_g is None:
            return F.linear(x.to(torch.bfloat16), self.w).to(dtype)
        xb = x.to(torch.bfloat16)
        if self.kp != self.k:
            xb = F.pad(xb, (0, self.kp - self.k))
        if dense is None:
            dense = x.shape[0] >= INT4_DENSE_ROWS
        if xb.device.type == "cpu" and dense and self.layout is not None:
            y = F.linear(xb, self.dense_weight(torch.bfloat16))
        elif xb.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(xb.contiguous(), self.packed, self.kernel_g, self.scales_zeros)
        else:
            y = torch._weight_int4pack_mm(xb.contiguous(), self.packed, self.kernel_g, self.scales_zeros)
        return y[:, :self.n].to(dtype)


def affine_int4(u: torch.Tensor, scales_zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """u [..., N, K / g, g] values in [0, 16) and the kernel's [..., K / g, N, 2] (scale, zero) -> the weights
    (u - 8) * scale + zero in `dtype`, as u * scale + (zero - 8 * scale): two passes over the matrix instead of
    three (bfloat16 elementwise passes cost as much as the unpacking; addcmul measured 2.6x slower here)."""
    sz = scales_zeros.float().movedim(-1, 0).transpose(-1, -2)[..., None]  # [2, ..., N, K / g, 1]
    scale, shift = sz[0], sz[1] - 8 * sz[0]
    return u.to(dtype) * scale.to(dtype) + shift.to(dtype)


class Fp8Kernel(nn.Module):
    """FP8 E4M3 values [N, K] and row scales [N, KB] (KB = 1: per-tensor or per-channel; else column blocks)."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor | None, group: int):
        super().__init__()
        self.w, self.scale = w.contiguous(), scale.float().contiguous()
        self.n, self.k = w.shape
        self.block_cols = formats.group_cols(self.k, scale.shape[1], group)
        self.input_scale = None if input_scale is None else input_scale.float().reshape(1, 1)
        # W8A8 where it pays: CUDA, one scale per row, shapes _scaled_mm accepts
        self.use_scaled_mm = (w.device.type == "cuda" and scale.shape[1] == 1 and self.k % 16 == 0
                              and self.n % 16 == 0)

    def dequantized(self) -> torch.Tensor:
        return formats.dequantize(self.w, self.scale, group=self.block_cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_scaled_mm:
            return self.forward_w8a8(x)
        return self.forward_weight_only(x)

    def forward_weight_only(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize one [N, chunk] column slice at a time and accumulate (the oracle for the W8A8 path)."""
        dt = x.dtype if x.dtype.is_floating_point else torch.float32
        if self.scale.shape[1] == 1:
            y = None
            for k0 in range(0, self.k, FP8_CHUNK):
                part = F.linear(x[:, k0:k0 + FP8_CHUNK], self.w[:, k0:k0 + FP8_CHUNK].to(dt))
                y = part if y is None else y + part
            return y * self.scale[:, 0].to(dt)
        y, bc = None, self.block_cols
        for j in range(self.scale.shape[1]):
            w = self.w[:, j * bc:(j + 1) * bc].to(dt) * self.scale[:, j:j + 1].to(dt)
            part = F.linear(x[:, j * bc:(j + 1) * bc], w)
            y = part if y is None else y + part
        return y

    def forward_w8a8(self, x: torch.Tensor) -> torch.Tensor:
        """FP8 activations (dynamic per-token scales, or the checkpoint's static one) x FP8 weights, one
        `torch._scaled_mm` with row-wise scales. Runs on CPU too, so the tests compare it with the oracle."""
        fmax = formats.fp8_max()
        xf = x.float()
        if self.input_scale is not None:
            sx = self.input_scale.expand(x.shape[0], 1).contiguous()
        else:
            sx = (xf.abs().amax(dim=1, keepdim=True) / fmax).clamp(min=1e-12)
        xq = (xf / sx).clamp(-fmax, fmax).to(torch.float8_e4m3fn)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
        return torch._scaled_mm(xq, self.w.t(), scale_a=sx, scale_b=self.scale.t().contiguous(),
                                out_dtype=out_dtype)
