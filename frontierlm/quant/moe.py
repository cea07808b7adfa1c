"""Quantized MoE experts: a `FusedExperts` whose w13 [E, 2I, H] and w2 [E, H, I] stay int8 / int4 / FP8.

Loading (a quantized checkpoint): w13 / w2 are replaced by parameters named as the checkpoint names each
expert's tensors, prefixed by the fused name (`w13_weight_packed`, `w13_weight_scale`, `w2_weight_zero_point`,
FP8 values under `w13` itself; models/loader.py maps `experts.{e}.gate_proj.weight_scale` to
`experts.w13_weight_scale` with shard (e, 0)). Every format lands in the layout of linear_methods.py: values
[E, N, K] in int8 (int4 unpacked) or FP8 and row scales [E, N, KB], so the float matrix never exists. A float
checkpoint with `quantization=...` loads float and quantizes expert by expert after loading.

Compute: each expert becomes one kernel per matrix (Int8Kernel / Int4Kernel / Fp8Kernel: torch's packed CPU
kernels, FP8 dequantized a column block at a time), and the grouped (token, expert) rows of `FusedExperts`
run expert by expert through them. The kernels' tensors are stacked over the experts afterwards, so the
compiled decode step (which needs static shapes) gathers each pair's quantized matrix and dequantizes only
those rows. That path multiplies in the activations' dtype (float32 in a float32 model) where the int8 / int4
kernels take bfloat16 activations, so a compiled and an eager greedy run can part at a near tie (seen once on
a tiny random Qwen3-MoE: the compiled run then gave the float model's tokens).

Tensor / expert parallelism (distributed/moe.py), quantized checkpoint: each rank reads only its region of
every expert's tensors (TP: `shard_region`, quant/sharding.py) or only its own experts' tensors (EP). Float
checkpoint with `quantization=...`: each rank quantizes the experts it holds, its slice of every expert (TP) or its whole experts (EP), and keeps only those
kernels. Under TP the down projection's rows are cut across ranks, so its per-row scales come from the max
over the TP group (`_agreed_absmax`): a rank's quantized slice is then exactly the matching columns of the
single-process matrix.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from frontierlm.layers.moe import FusedExperts
from frontierlm.quant import formats, sharding
from frontierlm.quant.config import WeightScheme
from frontierlm.quant.linear_methods import (_SAFETENSORS_DTYPES, Fp8Kernel, Int4Kernel, Int8Kernel, affine_int4,
                                            make_kernel)

logger = logging.getLogger(__name__)

FUSED = ("w13", "w2")


def expert_layers(model: nn.Module):
    for name, m in model.named_modules():
        if isinstance(m, FusedExperts):
            yield name, m


def expert_checkpoint_modules(model: nn.Module, name: str, experts: FusedExperts, fused: str) -> list[str]:
    """The checkpoint module names one fused matrix loads from (experts.{e}.gate_proj, ..., for every e)."""
    from frontierlm.models.loader import _checkpoint_name

    ids = getattr(experts, fused).shard_ids
    if hasattr(experts, "global_experts"):  # expert parallel: the other ranks' experts too (their loads read nothing)
        ids = tuple((e, p) for e in range(experts.global_experts) for p in ((0, 1) if fused == "w13" else (None,)))
    return [_checkpoint_name(f"{name}.{fused}", s, model).removesuffix(".weight") for s in ids]


def expert_schemes(model: nn.Module, name: str, experts: FusedExperts, scheme_for) -> dict:
    """{fused name: (WeightScheme or None, its checkpoint modules)}: one scheme for all of a matrix's parts."""
    out = {}
    for fused in FUSED:
        parts = expert_checkpoint_modules(model, name, experts, fused)
        schemes = {p: scheme_for(p) for p in parts}
        distinct = set(schemes.values())
        if len(distinct) > 1:
            first = {s: next(p for p in parts if schemes[p] == s) for s in distinct}
            raise ValueError(f"the experts of {name} are quantized differently ({first}); FrontierLM stacks "
                             f"every expert's {fused} and needs one scheme for all of them")
        out[fused] = (schemes[parts[0]], parts)
    return out


def _scale_cols(s: WeightScheme, cols: int) -> int:
    if s.strategy == "group":
        return formats.cdiv(cols, s.group_size)
    return formats.cdiv(cols, s.block[1]) if s.strategy == "block" else 1


def _group_cols(s: WeightScheme, cols: int) -> int:
    return s.group_size if s.strategy == "group" else s.block[1] if s.strategy == "block" else cols


class QuantExpertsMethod:
    def __init__(self, schemes: dict[str, WeightScheme | None], checkpoint_format: str | None):
        self.schemes = schemes                      # fused name -> scheme (None: that matrix stays float)
        self.checkpoint_format = checkpoint_format  # None: float weights, quantized after loading
        self.kernels: dict[str, list[nn.Module]] = {}
        self.stacks: dict[str, dict[str, torch.Tensor]] = {}

    # ---- loading ------------------------------------------------------------------------------------
    def create_weights(self, experts: FusedExperts) -> None:
        if self.checkpoint_format is None:  # float weights, this rank's shard quantized after loading
            for fused, s in self.schemes.items():
                if s is not None and hasattr(experts, "check_quantization"):
                    experts.check_quantization(fused, s)
            experts.quant_method = self
            return
        experts.quant_method = self
        self.param_names = {}
        for fused, s in self.schemes.items():
            if s is None:
                continue
            param = getattr(experts, fused)
            e, n, k = param.shape
            shard_ids, device = param.shard_ids, param.device
            delattr(experts, fused)
            kb, names = _scale_cols(s, k), []

            def add(name, data, loader, _fused=fused):
                p = nn.Parameter(data, requires_grad=False)
                p.weight_loader = lambda prm, w, shard_id=None, _f=loader: _f(experts, _fused, prm, w, shard_id)
                p.shard_ids = shard_ids  # the loader checks that every expert's part arrived
                p.loads_slices = True  # a lazy safetensors slice: only this rank's region is read (sharding.py)
                experts.register_parameter(name, p)
                names.append(name)

            if s.kind == "float":
                add(fused, torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=device), self._load_values)
                if s.activations == "static":  # FP8 experts compute weight-only: the input scale is read, unused
                    add(f"{fused}_input_scale", torch.zeros(e, 2, device=device), self._load_ignored)
            elif self.checkpoint_format == "pack-quantized":
                add(f"{fused}_weight_packed", torch.empty(e, n, k, dtype=torch.int8, device=device), self._load_packed)
                add(f"{fused}_weight_shape", torch.zeros(2, dtype=torch.int64, device=device), self._check_shape)
                if not s.symmetric:
                    add(f"{fused}_weight_zero_point", torch.zeros(e, n, kb, dtype=torch.int8, device=device),
                        self._load_zero_point)
            else:  # int-quantized / naive-quantized: int8 values as they are
                add(fused, torch.empty(e, n, k, dtype=torch.int8, device=device), self._load_values)
            scale = "weight_scale_inv" if self.checkpoint_format == "deepseek-fp8" else "weight_scale"
            add(f"{fused}_{scale}", torch.empty(e, n, kb, device=device), self._load_scale)
            self.param_names[fused] = names

    def _place(self, experts: FusedExperts, fused: str, shard_id):
        """(local expert, first row, rows, Region of the checkpoint tensor) of one checkpoint tensor, or None for
        an expert this rank does not hold (expert parallel: its tensors are never read)."""
        if shard_id is None:
            raise ValueError("quantized experts load one checkpoint tensor per expert (experts.{e}.<proj>), not "
                             "all experts stacked in one tensor")
        if hasattr(experts, "owns"):
            if not experts.owns(shard_id):
                return None
            shard_id = experts._localize(shard_id)
        e = experts._expert(shard_id)
        if fused == "w13" and shard_id[1] not in (0, 1):
            raise ValueError(f"unknown shard id {shard_id!r} for w13: part must be 0 (gate) or 1 (up)")
        off, size = (shard_id[1] * experts.intermediate_size, experts.intermediate_size) if fused == "w13" else \
            (0, experts.hidden_size)
        own = getattr(experts, "shard_region", None)  # tensor parallel: a slice of every expert
        r = own(fused) if own is not None else sharding.Region.whole(size, self._cols(experts, fused))
        return e, off, size, r

    @staticmethod
    def _cols(experts: FusedExperts, fused: str) -> int:
        return experts.hidden_size if fused == "w13" else experts.intermediate_size

    def _load_values(self, experts, fused, param, w, shard_id) -> None:
        place = self._place(experts, fused, shard_id)
        if place is None:
            return
        e, off, size, r = place
        dtype = w.dtype if isinstance(w, torch.Tensor) else _SAFETENSORS_DTYPES.get(w.get_dtype())
        if dtype != param.dtype and not (dtype is not None and dtype.is_floating_point and dtype.itemsize == 1
                                         and param.dtype.is_floating_point):
            raise ValueError(f"expected {param.dtype} expert weights for {self.schemes[fused].describe()}, "
                             f"got {dtype}")
        if dtype == torch.float8_e5m2:
            raise ValueError("FP8 E5M2 weights are not supported (E4M3 is)")
        self._copy(param.data[e].narrow(0, off, size), sharding.values(w, r))

    def _load_packed(self, experts, fused, param, w, shard_id) -> None:
        place = self._place(experts, fused, shard_id)
        if place is not None:
            e, off, size, r = place
            self._copy(param.data[e].narrow(0, off, size), sharding.packed_values(w, r, self.schemes[fused].bits))

    def _load_zero_point(self, experts, fused, param, w, shard_id) -> None:
        place = self._place(experts, fused, shard_id)
        if place is not None:
            e, off, size, r = place
            self._copy(param.data[e].narrow(0, off, size), sharding.zero_points(w, r, self.schemes[fused]))

    def _check_shape(self, experts, fused, param, w, shard_id) -> None:
        place = self._place(experts, fused, shard_id)
        if place is not None:
            sharding.check_shape(w, place[3])

    def _load_scale(self, experts, fused, param, w, shard_id) -> None:
        place = self._place(experts, fused, shard_id)
        if place is not None:
            e, off, size, r = place
            self._copy(param.data[e].narrow(0, off, size), sharding.scales(w, r, self.schemes[fused]))

    def _load_ignored(self, experts, fused, param, w, shard_id) -> None:
        self._place(experts, fused, shard_id)

    @staticmethod
    def _copy(target: torch.Tensor, w: torch.Tensor) -> None:
        if target.shape != w.shape:
            raise ValueError(f"shape mismatch: expected {tuple(target.shape)}, checkpoint has {tuple(w.shape)}")
        target.copy_(w)

    # ---- after loading ------------------------------------------------------------------------------
    @torch.no_grad()
    def process_weights_after_loading(self, experts: FusedExperts) -> None:
        for fused, s in self.schemes.items():
            if s is None:
                continue
            k = self._cols(experts, fused)
            if self.checkpoint_format is None:  # float weights: quantize one expert at a time
                w = getattr(experts, fused).data
                delattr(experts, fused)
                agreed = _agreed_absmax(experts, fused, w, s)
                parts = [_quantize(w[e], s, None if agreed is None else (lambda a, g, _e=e: agreed[_e]))
                         for e in range(w.shape[0])]
                del w
            else:
                names = self.param_names[fused]
                values = getattr(experts, names[0]).data
                scale = getattr(experts, names[-1]).data
                zero = getattr(experts, f"{fused}_weight_zero_point").data \
                    if f"{fused}_weight_zero_point" in names else None
                parts = [(values[e], scale[e], None if zero is None else zero[e]) for e in range(values.shape[0])]
                for name in names:
                    delattr(experts, name)
            kernels = []
            for i in range(len(parts)):
                values, scale, zero = parts[i]
                kernels.append(make_kernel(s, values, scale, zero, None, _group_cols(s, k)))
                parts[i] = None  # each expert's unpacked values go as soon as its kernel holds them
            self.kernels[fused] = kernels
            self.stacks[fused] = _stack(kernels)

    def stored_bytes(self) -> int:
        """Bytes the quantized experts hold (each storage once)."""
        seen = {}
        for kernels in self.kernels.values():
            for kern in kernels:
                for t in vars(kern).values():
                    if isinstance(t, torch.Tensor):
                        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    # ---- compute ------------------------------------------------------------------------------------
    def _matrix(self, experts: FusedExperts, fused: str, e: int, x: torch.Tensor) -> torch.Tensor:
        if fused in self.kernels:
            return self.kernels[fused][e](x)
        return F.linear(x, getattr(experts, fused)[e])

    def apply(self, experts: FusedExperts, xs: torch.Tensor, counts: torch.Tensor,
              expert_ids: torch.Tensor) -> torch.Tensor:
        """xs [P, H]: the (token, expert) rows sorted by expert; counts [E]; expert_ids [P] (sorted)."""
        if torch.compiler.is_compiling() or (xs.is_cuda and torch.cuda.is_current_stream_capturing()):
            return self.apply_gathered(experts, xs, expert_ids)  # no host sync: compiled / CUDA-graph steps
        outs = []
        for e, x_e in enumerate(xs.split(counts.tolist())):
            if x_e.shape[0]:
                h = experts.act(self._matrix(experts, "w13", e, x_e))
                outs.append(self._matrix(experts, "w2", e, h))
        return torch.cat(outs)

    def apply_gathered(self, experts: FusedExperts, xs: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Shape-static (the compiled decode step): every pair against its own expert's matrix, dequantized
        from the gathered quantized rows (a decode step reads each chosen expert's bytes once per pair)."""
        h = experts.act(self._gathered(experts, "w13", expert_ids, xs))
        return self._gathered(experts, "w2", expert_ids, h)

    def _gathered(self, experts, fused, ids, x) -> torch.Tensor:
        if fused not in self.kernels:
            w = getattr(experts, fused).index_select(0, ids)
        else:
            w = _gathered_weight(self.kernels[fused][0], self.stacks[fused], ids, x.dtype)
        if w.shape[-1] != x.shape[-1]:  # the kernels' zero-padded columns
            x = F.pad(x, (0, w.shape[-1] - x.shape[-1]))
        y = torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)
        return y[:, :self.kernels[fused][0].n] if fused in self.kernels else y


def _agreed_absmax(experts: FusedExperts, fused: str, w: torch.Tensor, s: WeightScheme) -> torch.Tensor | None:
    """Tensor-parallel w2 [E, H, I/T] with one scale per row: every row's absmax over all ranks' columns (one
    all-reduce for all experts), so each rank's slice is quantized exactly as one process quantizes it."""
    if fused != "w2" or not hasattr(experts, "reduce_absmax") or s.strategy != "channel":
        return None  # w13's rows are whole on each rank; groups never straddle ranks (check_quantization)
    absmax = torch.stack([w[e].float().abs().amax(-1, keepdim=True) for e in range(w.shape[0])])
    return experts.reduce_absmax(absmax)


def _quantize(w: torch.Tensor, s: WeightScheme, reduce_absmax=None):
    if s.kind == "float":
        values, scale = formats.quantize_fp8(w, s.strategy, s.block or (128, 128), reduce_absmax=reduce_absmax)
        return values, formats.row_scales(scale, w.shape[0], w.shape[1], s.block if s.strategy == "block" else None), None
    values, scale = formats.quantize_int(w, s.bits, s.group_size, reduce_absmax=reduce_absmax)
    return values, scale, None


# Each kernel's tensors, stacked over the experts (the kernels then hold views: one storage per matrix).
_KERNEL_TENSORS = {Int8Kernel: ("q", "scale", "scale_f32"), Int4Kernel: ("packed", "scales_zeros", "w"),
                   Fp8Kernel: ("w", "scale")}


def _stack(kernels: list[nn.Module]) -> dict[str, torch.Tensor]:
    stacks = {}
    for attr in _KERNEL_TENSORS[type(kernels[0])]:
        if not isinstance(getattr(kernels[0], attr, None), torch.Tensor):
            continue
        stacks[attr] = _as_fp8(torch.stack([_as_bytes(getattr(kern, attr)) for kern in kernels]),
                               getattr(kernels[0], attr).dtype)
        for e, kern in enumerate(kernels):
            setattr(kern, attr, stacks[attr][e])
    return stacks


def _as_bytes(t: torch.Tensor) -> torch.Tensor:  # FP8 tensors stack and gather as their bytes
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


def _as_fp8(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.view(dtype) if t.dtype != dtype else t


def _gathered_weight(kern: nn.Module, stacks: dict, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[P, N, K'] float matrices of the experts `ids` from the stacked quantized tensors (K' >= K: padding)."""
    dtype = dtype if dtype.is_floating_point else torch.float32
    if isinstance(kern, Int8Kernel):  # q [E, G, N, g], scale_f32 [E, G, N]
        q, scale = stacks["q"].index_select(0, ids), stacks["scale_f32"].index_select(0, ids)
        w = q.to(dtype) * scale.to(dtype)[..., None]
        return w.permute(0, 2, 1, 3).reshape(ids.shape[0], kern.n, -1)
    if isinstance(kern, Fp8Kernel):  # w [E, N, K], scale [E, N, KB]
        w = _as_fp8(_as_bytes(stacks["w"]).index_select(0, ids), stacks["w"].dtype).to(dtype)
        scale = stacks["scale"].index_select(0, ids).to(dtype)
        return w * scale.repeat_interleave(kern.block_cols, dim=2)[..., :kern.k]
    if kern.kernel_g is None:  # no packed int4 kernel for this group size: a bfloat16 matrix per expert
        return stacks["w"].index_select(0, ids).to(dtype)
    if kern.layout is None:
        raise RuntimeError("int4 experts: this CPU's int4 packing layout is unknown, no shape-static path")
    packed, sz = stacks["packed"].index_select(0, ids), stacks["scales_zeros"].index_select(0, ids)
    rows = packed.shape[1]
    u = formats.unpack_int4pack_cpu(packed, rows, kern.kp, kern.layout).view(ids.shape[0], rows, -1, kern.kernel_g)
    return affine_int4(u, sz, dtype).view(ids.shape[0], rows, kern.kp)
