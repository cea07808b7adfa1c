"""The loader's quantization hook (models/loader.py calls three functions, nothing else changes there):

1. `prepare(model, model_config, load_format)`: decide each linear layer's scheme and, for a quantized
   checkpoint, give it the checkpoint's parameters (linear_methods.py).
2. `QuantLoad.view(f)`: the names and tensors of one safetensors file as the model should see them: a layer
   that runs quantized (MoE experts included, quant/moe.py) gets its tensors as they are; a quantized tensor
   whose module stays in float (MLA's kv_b_proj, whose matrix the absorbed decode reads directly, routers) is
   dequantized first and offered under `...weight`; `k_scale` / `v_scale` are kept for the FP8 KV cache.
3. `QuantLoad.finalize(model)`: convert every quantized layer to its compute layout; quantize a float
   checkpoint that asked for `quantization=...`.
"""
from __future__ import annotations

import logging
import re

import torch
from safetensors import safe_open
from torch import nn

from frontierlm.layers.embedding import LMHead
from frontierlm.layers.linear import Linear
from frontierlm.layers.moe import FusedExperts
from frontierlm.quant import formats, sharding
from frontierlm.quant.config import QuantConfig, WeightScheme, resolve
from frontierlm.quant.linear_methods import QuantLinearMethod
from frontierlm.quant.moe import QuantExpertsMethod, expert_layers, expert_schemes

logger = logging.getLogger(__name__)

# Linear layers whose float matrix other code reads directly (MoE routers, MLA's absorbed kv_b_proj): they are
# never quantized at run time; quantized checkpoint tensors for them are dequantized on load.
FLOAT_ONLY = re.compile(r"(^|\.)(gate|shared_expert_gate|kv_b_proj)$")
PARTS = ("weight_packed", "weight_scale", "weight_scale_inv", "weight_zero_point", "weight_shape", "input_scale",
         "output_scale", "weight_g_idx")
KV_SCALES = ("k_scale", "v_scale")


def quantizable_linears(model: nn.Module):
    """Linear layers and an untied LM head (a tied one shares the embedding's matrix, which stays float: at
    batch 1 the float32 head of a small model is as many bytes as all its int8 layers)."""
    # (DeepSeek-V3's MTP proposer reads the head's matrix: such a head stays float too)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False) or \
        getattr(model, "num_mtp_layers", 0) > 0
    for name, m in model.named_modules():
        if (isinstance(m, Linear) or (isinstance(m, LMHead) and not tied)) and not FLOAT_ONLY.search(name):
            yield name, m


def checkpoint_modules(model: nn.Module, name: str, layer: nn.Module) -> list[str]:
    """The checkpoint module names a layer loads from (q_proj, k_proj, v_proj for our qkv_proj)."""
    from frontierlm.models.loader import _checkpoint_name

    shards = getattr(layer.weight, "shard_ids", (None,)) if hasattr(layer, "weight") else (None,)
    return [_checkpoint_name(f"{name}.weight", s, model).removesuffix(".weight") for s in shards]


def _split(name: str) -> tuple[str, str]:
    prefix, _, suffix = name.rpartition(".")
    return prefix, suffix


class QuantLoad:
    def __init__(self, config: QuantConfig | None, weight_files: list[str]):
        """config None: float weights; only the FP8 KV cache's k_scale / v_scale are taken."""
        self.config = config
        self.files = {}  # tensor name -> file, for parts that sit in another shard
        for path in weight_files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for n in f.keys():
                    self.files[n] = str(path)
        self.runtime: dict[str, nn.Module] = {}  # checkpoint module name -> our layer that runs quantized
        self.kv_scales: dict[str, float] = {}
        self.dequantized = 0
        self.virtual: dict[str, str] = {}  # of the file being read: dequantized weight name -> its module
        self.bytes_start = sharding.COUNTER.bytes

    # ---- 1. before loading --------------------------------------------------------------------------
    def prepare(self, model: nn.Module, load_format: str) -> None:
        qc = self.config
        if qc is None:
            return
        fmt = None
        if qc.from_checkpoint and load_format != "dummy":
            fmt = "deepseek-fp8" if qc.method == "fp8" else qc.checkpoint_format
        for name, layer in quantizable_linears(model):
            parts = checkpoint_modules(model, name, layer)
            schemes = {p: self._scheme(p) for p in parts}
            if len(set(schemes.values())) > 1:
                raise ValueError(f"the parts of {name} are quantized differently ({schemes}); FrontierLM packs "
                                 "them into one matrix and needs one scheme")
            scheme = schemes[parts[0]]
            if scheme is None:
                continue
            QuantLinearMethod(scheme, fmt).create_weights(layer)
            if fmt is not None:
                for p in parts:
                    self.runtime[p] = layer
        self._prepare_experts(model, fmt)

    def _prepare_experts(self, model: nn.Module, fmt: str | None) -> None:
        """MoE experts run quantized too (quant/moe.py); tensor / expert-parallel ones load their shard of a quantized
        checkpoint (or quantize it after loading a float one)."""
        for name, experts in expert_layers(model):
            plan = expert_schemes(model, name, experts, self._scheme)
            schemes = {fused: scheme for fused, (scheme, _) in plan.items()}
            if all(s is None for s in schemes.values()):
                continue
            QuantExpertsMethod(schemes, fmt).create_weights(experts)
            if fmt is not None:
                for scheme, parts in plan.values():
                    if scheme is not None:
                        self.runtime.update(dict.fromkeys(parts, experts))

    def _scheme(self, module: str) -> WeightScheme | None:
        scheme = self.config.scheme_for(module)
        if scheme is not None and self.config.method == "fp8" and self.files:
            # DeepSeek-V3's rule: a weight is FP8 exactly when its scale is stored beside it
            if f"{module}.weight_scale_inv" not in self.files and f"{module}.weight_scale" not in self.files:
                return None
        return scheme

    # ---- 2. while loading ---------------------------------------------------------------------------
    def stored(self, name: str) -> bool:
        """A tensor offered as it is stored (not dequantized here), so a loader may read a lazy slice of it."""
        return name not in self.virtual

    def view(self, f) -> tuple[list[str], callable]:
        names, virtual = [], {}
        keys = list(f.keys())
        quantized_modules = {_split(n)[0] for n in keys if _split(n)[1] in PARTS} if self.config else set()
        for n in keys:
            prefix, suffix = _split(n)
            if suffix in KV_SCALES:
                self.kv_scales[n] = float(f.get_tensor(n).float().max())
                continue
            if suffix == "weight_g_idx":
                raise ValueError(f"{n}: activation-ordered (g_idx / actorder) weights are not supported")
            if prefix in self.runtime or prefix not in quantized_modules:
                names.append(n)
                continue
            if suffix in ("weight", "weight_packed"):  # a float module: offer its dequantized weight
                virtual[f"{prefix}.weight"] = prefix
                names.append(f"{prefix}.weight")
            # its scales, zero points, shape and activation scales are consumed by the dequantization

        self.virtual = virtual

        def get(name):
            if name in virtual:
                return self._dequantize(virtual[name])
            return f.get_tensor(name)

        return names, get

    def _tensor(self, name: str) -> torch.Tensor | None:
        path = self.files.get(name)
        if path is None:
            return None
        with safe_open(path, framework="pt", device="cpu") as f:
            return sharding.COUNTER.add(f.get_tensor(name))

    def _dequantize(self, prefix: str) -> torch.Tensor:
        """The float weight of a quantized checkpoint module that runs in float (reference dequantization)."""
        scheme = self.config.scheme_for(prefix) or next(iter(s for _, s in self.config.groups))
        packed = self._tensor(f"{prefix}.weight_packed")
        scale = self._tensor(f"{prefix}.weight_scale_inv")
        if scale is None:
            scale = self._tensor(f"{prefix}.weight_scale")
        if scale is None:
            raise ValueError(f"{prefix}: quantized weight without weight_scale / weight_scale_inv")
        zero = self._tensor(f"{prefix}.weight_zero_point")
        if packed is not None:
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

            shape = self._tensor(f"{prefix}.weight_shape")
            if shape is None:
                raise ValueError(f"{prefix}: weight_packed without weight_shape")
            rows, cols = (int(v) for v in shape.flatten())
            values = unpack_from_int32(packed, scheme.bits, torch.Size((rows, cols)))
            if zero is not None and zero.dtype == torch.int32:
                zero = unpack_from_int32(zero, scheme.bits, torch.Size((rows, scale.shape[-1])), packed_dim=0)
        else:
            values = self._tensor(f"{prefix}.weight")
            rows, cols = values.shape
        block = scheme.block if scheme.strategy == "block" else None
        group = scheme.group_size if scheme.strategy == "group" else block[1] if block else cols
        self.dequantized += 1
        return formats.dequantize(values, formats.row_scales(scale, rows, cols, block),
                                  None if zero is None else zero.reshape(rows, -1), group=group)

    # ---- 3. after loading ---------------------------------------------------------------------------
    def finalize(self, model: nn.Module) -> None:
        count = 0
        for name, layer in quantizable_linears(model):
            method = getattr(layer, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(layer)
                count += 1
        for _, experts in expert_layers(model):
            if experts.quant_method is not None:
                experts.quant_method.process_weights_after_loading(experts)
                count += 1
        apply_kv_scales(model, self.kv_scales)
        # bytes of quantized checkpoint tensors this process read (each rank: its own shards and stage)
        model.quant_bytes_read = sharding.COUNTER.bytes - self.bytes_start
        if self.config is None:
            return
        logger.info("quantized linear layers and expert groups: %d (%s)%s", count, self.config.describe(),
                    f"; {self.dequantized} quantized checkpoint tensors of float-only modules dequantized"
                    if self.dequantized else "")


def apply_kv_scales(model: nn.Module, scales: dict[str, float]) -> None:
    """Checkpoint `model.layers.{i}.self_attn.{k,v}_scale` -> the layer's attention module (used by an FP8
    KV cache; a float cache ignores them)."""
    if not scales:
        return
    modules = model.kv_cache_modules()
    for name, value in scales.items():
        m = re.search(r"layers\.(\d+)\.", name)
        if m is None or int(m.group(1)) >= len(modules):
            continue
        setattr(modules[int(m.group(1))], name.rpartition(".")[2], value)


def prepare(model: nn.Module, model_config, load_format: str = "auto") -> QuantLoad | None:
    """The hook's entry point: None for a float model with no quantization asked for."""
    config = resolve(model_config.hf_config, getattr(model_config, "quantization", None),
                     getattr(model_config, "quantization_group_size", None))
    if config is None and getattr(model_config, "kv_cache_dtype", None) is None:
        return None  # a float model with a float cache: nothing to do (k_scale / v_scale are then ignored)
    files = model_config.weight_files if load_format != "dummy" else []
    load = QuantLoad(config, files)
    load.prepare(model, load_format)
    return load
