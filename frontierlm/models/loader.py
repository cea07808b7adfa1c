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


def load_model(model_config: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The model on `device`, in model_config.dtype, weights loaded, in eval mode."""
    model_cls = get_model_class(model_config.architecture)
    # Allocate parameters directly on the device and in the target dtype (no float32 copy on the host).
    with _default_dtype(model_config.dtype), torch.device(device):
        model = model_cls(model_config)
    load_weights(model, model_config.weight_files)
    return model.eval()


def _target(name: str, mapping: dict) -> tuple[str, object]:
    """Checkpoint tensor name -> (parameter name, shard id) via the packed-modules mapping."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in mapping:
            packed, shard = mapping[part]
            return ".".join(parts[:i] + [packed] + parts[i + 1:]), shard
    return name, None


def _checkpoint_name(param_name: str, shard, mapping: dict) -> str:
    """Inverse of _target, for error messages that name the tensor the user's checkpoint lacks."""
    parts = param_name.split(".")
    for src, (packed, sid) in mapping.items():
        if sid == shard and packed in parts:
            i = parts.index(packed)
            return ".".join(parts[:i] + [src] + parts[i + 1:])
    return param_name


def load_weights(model: nn.Module, weight_files: list[str]) -> None:
    params = dict(model.named_parameters())  # tied weights appear once, under the embedding's name
    mapping = getattr(model, "packed_modules_mapping", {})
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    loaded, unexpected = set(), []
    for path in weight_files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_SKIP_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                target, shard = _target(name, mapping)
                param = params.get(target)
                if param is None:
                    unexpected.append(name)
                    continue
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    loader(param, f.get_tensor(name), shard)
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
                missing.append(_checkpoint_name(name, shard, mapping))
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights: {', '.join(missing)}")
