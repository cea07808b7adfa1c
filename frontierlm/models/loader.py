"""Build a model from a ModelConfig and load its safetensors weights, tensor by tensor.

Every parameter carries `weight_loader(param, loaded_weight, shard_id=None)`; a model's
`packed_modules_mapping` says which checkpoint tensors land in which packed parameter, so this one loader
serves every architecture.
"""
from __future__ import annotations

import contextlib
import logging

import torch
from safetensors import safe_open
from torch import nn

from frontierlm.config import ModelConfig
from frontierlm.layers.linear import default_weight_loader
from frontierlm.models.registry import get_model_class
from frontierlm.quant import loading as quant_loading

logger = logging.getLogger(__name__)

# Buffers some checkpoints carry that we recompute ourselves.
_SKIP_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(model_config: ModelConfig, device: torch.device | str = "cpu", load_format: str = "auto",
               seed: int = 0) -> nn.Module:
    """The model on `device`, in model_config.dtype, weights loaded (or random with load_format="dummy"),
    in eval mode."""
    model_cls = get_model_class(model_config.architecture)
    # Allocate parameters directly on the device and in the target dtype (no float32 copy on the host).
    with _default_dtype(model_config.dtype), torch.device(device):
        model = model_cls(model_config)
    quant = quant_loading.prepare(model, model_config, load_format)  # None for a float model (frontierlm/quant)
    if load_format == "dummy":
        init_dummy_weights(model, getattr(model_config.hf_config, "initializer_range", 0.02), seed)
    else:
        load_weights(model, model_config.weight_files, quant)
    if quant is not None:
        quant.finalize(model)
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: nn.Module, std: float = 0.02, seed: int | None = 0) -> None:
    """Random weights drawn on the model's device (no checkpoint, no host copy): normal(0, std) for every tensor
    of 2+ dims (embeddings, matrices, fused expert stacks), 1 for norm scales, 0 for other vectors (biases,
    routing biases). vLLM's dummy load format uses it to benchmark a real shape from its config.json; the trainer
    uses it as its initialisation. seed=None draws from torch's global generator."""
    gen = None
    for name, p in model.named_parameters():  # tied weights appear once
        if gen is None and seed is not None:
            gen = torch.Generator(device=p.device).manual_seed(seed)
        if p.dim() >= 2:
            p.normal_(0.0, std, generator=gen)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.zero_()


def _target(name: str, model: nn.Module) -> tuple[str, object]:
    """Checkpoint tensor name -> (parameter name, shard id): module renames first, then per-expert tensors
    into the fused expert parameters (shard id (expert, part)), then the packed-modules mapping."""
    renames = getattr(model, "checkpoint_renames", {})
    parts = [renames.get(p, p) for p in name.split(".")]
    experts = getattr(model, "expert_weights_mapping", {})
    if experts and "experts" in parts:
        i = parts.index("experts")
        if i + 2 < len(parts) and parts[i + 1].isdigit() and parts[i + 2] in experts:
            fused, part = experts[parts[i + 2]]
            # a quantized expert's other tensors (weight_packed, weight_scale, ...) -> w13_weight_scale, ...
            leaf = parts[i + 3] if i + 3 < len(parts) else "weight"
            return ".".join(parts[:i + 1] + [fused if leaf == "weight" else f"{fused}_{leaf}"]), \
                (int(parts[i + 1]), part)
    mapping = getattr(model, "packed_modules_mapping", {})
    for i, part in enumerate(parts):
        if part in mapping:
            packed, shard = mapping[part]
            return ".".join(parts[:i] + [packed] + parts[i + 1:]), shard
    return ".".join(parts), None


def _checkpoint_name(param_name: str, shard, model: nn.Module) -> str:
    """Inverse of _target, for error messages that name the tensor the user's checkpoint lacks."""
    parts = param_name.split(".")
    name = param_name
    if isinstance(shard, tuple) and len(parts) >= 2 and parts[-2] == "experts":
        for src, (fused, part) in getattr(model, "expert_weights_mapping", {}).items():
            if (parts[-1] == fused or parts[-1].startswith(fused + "_")) and part == shard[1]:
                leaf = parts[-1][len(fused) + 1:] or "weight"
                name = ".".join(parts[:-1] + [str(shard[0]), src, leaf])
    else:
        for src, (packed, sid) in getattr(model, "packed_modules_mapping", {}).items():
            if sid == shard and packed in parts:
                i = parts.index(packed)
                name = ".".join(parts[:i] + [src] + parts[i + 1:])
                break
    back = {ours: theirs for theirs, ours in getattr(model, "checkpoint_renames", {}).items()}
    return ".".join(back.get(p, p) for p in name.split("."))


def _on_other_stage(param_name: str, model: nn.Module) -> bool:
    """Pipeline parallel: a parameter of a module this stage does not hold (a MissingLayer / MissingEmbedding, or
    the LM head off stage 0)."""
    module, parts = model, param_name.split(".")[:-1]
    for part in parts:
        module = getattr(module, part, None) if not part.isdigit() else (
            module[int(part)] if isinstance(module, nn.ModuleList) and int(part) < len(module) else None)
        if module is None:
            return parts[0] == "lm_head"
        if getattr(module, "is_missing", False):
            return True
    return False


def load_weights(model: nn.Module, weight_files: list[str], quant=None) -> None:
    """quant: frontierlm/quant/loading.py's QuantLoad, which shows each file's tensors as the layers take them."""
    params = dict(model.named_parameters())  # tied weights appear once, under the embedding's name
    skip = getattr(model, "skip_checkpoint_weight", lambda name: False)
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    loaded, unexpected = set(), []
    for path in weight_files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise ValueError(f"cannot read weights file {path}: {e} (truncated or damaged? download it again)") from None
        with handle as f:
            names, get_tensor = (f.keys(), f.get_tensor) if quant is None else quant.view(f)
            for name in names:
                if name.endswith(_SKIP_SUFFIXES) or (tied and name == "lm_head.weight") or skip(name):
                    continue
                target, shard = _target(name, model)
                param = params.get(target)
                if param is None:
                    if not _on_other_stage(target, model):
                        unexpected.append(name)
                    continue
                loader = getattr(param, "weight_loader", default_weight_loader)
                # tensor-parallel parameters read only their shard from a lazy slice of the file
                # (quantized checkpoint tensors too: their loaders read only their region, quant/sharding.py)
                loaded_weight = f.get_slice(name) if getattr(param, "loads_slices", False) and \
                    (quant is None or quant.stored(name)) else get_tensor(name)
                try:
                    loader(param, loaded_weight, shard)
                except ValueError as e:
                    raise ValueError(f"cannot load {name!r} from {path}: {e}") from None
                loaded.add((target, shard))
    if unexpected:
        logger.warning("ignored %d checkpoint tensors the model does not use: %s", len(unexpected), unexpected[:8])
    missing = []
    for name, param in params.items():
        if (name, None) in loaded:
            continue
        for shard in getattr(param, "shard_ids", (None,)):
            if (name, shard) not in loaded:
                missing.append(_checkpoint_name(name, shard, model))
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights: {', '.join(missing)}")
