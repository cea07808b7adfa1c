"""Saving: an HF-format model directory that FrontierLM and transformers both load, and the resumable training
state (model + optimizer + scheduler + step + RNG) in its `checkpoint/` subfolder.

Export splits packed parameters back into checkpoint names, the inverse of the loader: a model's
`packed_modules_mapping` says which checkpoint names live in which packed parameter, and each packed layer's
`shard_offsets` says which rows they occupy.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from torch import nn

from frontierlm.logger import init_logger

logger = init_logger(__name__)

STATE_DIR = "checkpoint"
STATE_FILE = "state.pt"
WEIGHTS_FILE = "model.safetensors"

# Fused MoE experts (frontierlm/layers/moe.py, FusedExperts): `w13` [E, 2I, H] stacks each expert's gate rows
# then up rows, `w2` [E, H, I] holds its down projection; checkpoints store one tensor per expert. A model may
# name the per-expert tensors differently (Mixtral: w1 / w3 / w2) in its `expert_weights_mapping`.
DEFAULT_EXPERT_MAPPING = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}


def split_fused_experts(name: str, tensor: torch.Tensor,
                        expert_mapping: dict | None = None) -> dict[str, torch.Tensor] | None:
    """Hook for MoE: `...experts.w13` -> `...experts.{e}.gate_proj.weight` + `up_proj.weight`, and
    `...experts.w2` -> `...experts.{e}.down_proj.weight` (names from `expert_mapping`, the loader's
    {checkpoint name: (fused parameter, part)}); None for any other tensor."""
    parts = name.split(".")
    if len(parts) < 2 or parts[-2] != "experts" or tensor.dim() != 3:
        return None
    targets = [(src, part) for src, (fused, part) in (expert_mapping or DEFAULT_EXPERT_MAPPING).items()
               if fused == parts[-1]]
    if not targets:
        return None
    out = {}
    for e in range(tensor.shape[0]):
        halves = tensor[e].chunk(2, dim=0)
        for src, part in targets:  # part 0 / 1: gate / up half of w13; None: the whole expert tensor
            out[".".join(parts[:-1] + [str(e), src, "weight"])] = tensor[e] if part is None else halves[part]
    return out


def export_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint names (contiguous CPU copies), ready for safetensors: the inverse of
    the loader's packed-modules mapping, expert mapping and module renames, plus whatever the model's
    `checkpoint_extra_tensors()` adds (copies of shared tensors the loader skips). `state_dict`: the model's
    full tensors when its live parameters are shards (FSDP); by default model.state_dict()."""
    by_packed: dict[str, list] = {}
    for src, (packed, shard) in getattr(model, "packed_modules_mapping", {}).items():
        by_packed.setdefault(packed, []).append((src, shard))
    experts = getattr(model, "expert_weights_mapping", None) or DEFAULT_EXPERT_MAPPING
    renames = {ours: theirs for theirs, ours in getattr(model, "checkpoint_renames", {}).items()}
    modules = dict(model.named_modules())
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    state = model.state_dict() if state_dict is None else state_dict
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":  # the embedding is the checkpoint's only copy
            continue
        module_name, _, leaf = name.rpartition(".")
        parent, _, packed = module_name.rpartition(".")
        offsets = getattr(modules.get(module_name), "shard_offsets", None)
        if offsets is not None and packed in by_packed:
            shards = by_packed[packed]
            if {sid for _, sid in shards} != set(offsets):
                raise ValueError(f"packed_modules_mapping covers shards {[s for _, s in shards]} of {name}, "
                                 f"the layer has {list(offsets)}")
            for src, sid in shards:
                start, size = offsets[sid]
                out[".".join(p for p in (parent, src, leaf) if p)] = tensor.narrow(0, start, size)
            continue
        split = split_fused_experts(name, tensor, experts)
        out.update(split if split is not None else {name: tensor})
    extra = getattr(model, "checkpoint_extra_tensors", None)  # e.g. DeepSeek's per-MTP-module head copies
    if callable(extra):
        # Extras that are the model's own parameters come from `state` (under FSDP the live ones are shards).
        own: dict[int, list[str]] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            own.setdefault(id(p), []).append(n)
        out.update({k: next((state[n] for n in own.get(id(v), ()) if n in state), v) for k, v in extra().items()})
    return {".".join(renames.get(p, p) for p in k.split(".")): v.detach().to("cpu").contiguous().clone()
            for k, v in out.items()}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_model_dir(model: nn.Module, hf_config, out_dir: str | Path, tokenizer=None,
                   eos_token_ids: list[int] | None = None, state_dict: dict | None = None) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer files to `out_dir`
    (`state_dict`: see export_state_dict)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Leftover shards or an index from an earlier export would be loaded next to the new weights.
    for stale in [*out.glob("model-*-of-*.safetensors"), out / "model.safetensors.index.json"]:
        if stale.exists():
            logger.warning("removing stale %s from %s", stale.name, out)
            stale.unlink()
    tensors = export_state_dict(model, state_dict)
    _atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    hf_config.architectures = [type(model).__name__]
    hf_config.save_pretrained(str(out))
    gen = {"bos_token_id": hf_config.bos_token_id, "pad_token_id": hf_config.pad_token_id,
           "eos_token_id": eos_token_ids if eos_token_ids else hf_config.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None},
                                                           indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def has_train_state(out_dir: str | Path) -> bool:
    return (Path(out_dir) / STATE_DIR / STATE_FILE).is_file()


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(out_dir: str | Path, model: nn.Module, optimizer, scheduler, step: int,
                     extra: dict | None = None, model_state: dict | None = None,
                     optimizer_state: dict | None = None) -> Path:
    """OUT_DIR/checkpoint/state.pt: everything a resumed run needs to continue bit for bit (RNG state is
    this process's; under DDP / FSDP rank 0 writes it and every rank restores it). `model_state` /
    `optimizer_state`: full state dicts gathered from shards (FSDP), in place of the live objects' own."""
    path = Path(out_dir) / STATE_DIR
    path.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict() if model_state is None else model_state,
             "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
             "scheduler": scheduler.state_dict(), "step": step, "rng": _rng_state(), **(extra or {})}
    _atomic_write(path / STATE_FILE, lambda p: torch.save(state, p))
    return path / STATE_FILE


def read_train_state(out_dir: str | Path, device: torch.device | str = "cpu") -> dict:
    """OUT_DIR/checkpoint/state.pt as saved, tensors on `device`."""
    path = Path(out_dir) / STATE_DIR / STATE_FILE
    return torch.load(path, map_location=device, weights_only=False)  # our own file: holds RNG tuples


def load_train_state(out_dir: str | Path, model: nn.Module | None, optimizer, scheduler,
                     device: torch.device | str = "cpu", state: dict | None = None) -> dict:
    """Restore model, optimizer, scheduler and RNG from OUT_DIR/checkpoint; returns the whole state dict
    (step and whatever `extra` the saver added). `state`: already read by read_train_state (FSDP reshards its
    optimizer state first). A part passed as None is skipped (FSDP restores the weights before sharding and
    the rest after); the RNG goes with the scheduler."""
    path = Path(out_dir) / STATE_DIR / STATE_FILE
    if state is None:
        state = read_train_state(out_dir, device)
    try:
        if model is not None:
            model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as e:  # a different model section than the checkpoint was trained with
        raise ValueError(f"the training state in {path} does not fit this model config: {e}") from None
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        rng["torch"] = rng["torch"].cpu()
        if "cuda" in rng:
            rng["cuda"] = [s.cpu() for s in rng["cuda"]]
        _set_rng_state(rng)
    return state
