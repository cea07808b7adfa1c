"""`frontierlm quantize IN_DIR OUT_DIR --scheme fp8 | fp8-block | int8 | int4 [--group-size G]`: write a quantized
copy of a float HF checkpoint (also one that `frontierlm train` wrote).

* int8 / int4: compressed-tensors `pack-quantized` (what llm-compressor's W8A16 / W4A16 write; vLLM and
  transformers read it), symmetric, per channel (int8) or in groups of G columns (int4, default 32).
* fp8: compressed-tensors `float-quantized`, FP8 E4M3 per-channel weight scales with dynamic per-token
  activation scales (llm-compressor's FP8_DYNAMIC).
* fp8-block: DeepSeek-V3's format: FP8 E4M3 weights with a `weight_scale_inv` per 128x128 block and
  `quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128], ...}`.

Exactly the linear layers FrontierLM runs quantized are written quantized (the model is built on the meta device
to list them), MoE experts included; embeddings, norms, the LM head, MoE routers and MLA's kv_b_proj stay as
they are.
The compressed-tensors tensors come from that library's own compressors, so the format is theirs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from frontierlm.quant import formats
from frontierlm.quant.config import DEFAULT_INT4_GROUP, online_scheme

SCHEMES = ("fp8", "fp8-block", "int8", "int4")


def quantized_modules(model_dir: Path) -> set[str]:
    """Checkpoint module names (e.g. model.layers.0.self_attn.q_proj) that FrontierLM runs quantized."""
    from frontierlm.config import ModelConfig
    from frontierlm.models.registry import get_model_class
    from frontierlm.quant.loading import checkpoint_modules, quantizable_linears
    from frontierlm.quant.moe import FUSED, expert_checkpoint_modules, expert_layers

    mc = ModelConfig.from_pretrained(model_dir, "float32", load_format="dummy")
    with torch.device("meta"):
        model = get_model_class(mc.architecture)(mc)
    names = {p for name, layer in quantizable_linears(model) for p in checkpoint_modules(model, name, layer)}
    for name, experts in expert_layers(model):  # every expert's gate / up / down projection
        for fused in FUSED:
            names.update(expert_checkpoint_modules(model, name, experts, fused))
    return names


def _fitting_group(cols: int, group_size: int | None) -> int | None:
    """compressed-tensors needs groups that divide the row: halve the group until it does (688 columns in groups
    of 32 -> 16); None (per channel) when nothing down to 8 divides."""
    g = group_size
    while g and cols % g:
        g = g // 2 if g > 8 else None
    return g


def _ct_scheme(scheme: str, group_size: int | None, targets=("Linear",)):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if scheme == "fp8":
        return QuantizationScheme(
            targets=list(targets),
            weights=QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True),
            input_activations=QuantizationArgs(num_bits=8, type="float", strategy="token", symmetric=True,
                                               dynamic=True))
    bits = 8 if scheme == "int8" else 4
    strategy = "group" if group_size else "channel"
    return QuantizationScheme(targets=list(targets), weights=QuantizationArgs(
        num_bits=bits, type="int", strategy=strategy, group_size=group_size, symmetric=True))


def _read_all(model_dir: Path) -> tuple[dict, dict]:
    from frontierlm.config import _weight_files

    tensors, metadata = {}, {}
    for path in _weight_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata.update(f.metadata() or {})
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors, metadata


def quantize_checkpoint(in_dir, out_dir, scheme: str, group_size: int | None = None) -> dict:
    """Write the quantized checkpoint; returns a summary (tensors quantized, bytes before and after)."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if group_size is not None:
        if scheme not in ("int8", "int4"):
            raise ValueError(f"--group-size applies to int8 and int4, not {scheme}")
        if group_size < 1 or group_size % 16:
            raise ValueError(f"--group-size must be a positive multiple of 16 (32-128 are usual), got {group_size}")
    if scheme == "int4" and group_size is None:
        group_size = DEFAULT_INT4_GROUP
    config = json.loads((in_dir / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{in_dir} is already quantized ({config['quantization_config'].get('quant_method')}); "
                         "quantize a float checkpoint")
    if out_dir.resolve() == in_dir.resolve():
        raise ValueError("OUT_DIR must differ from IN_DIR")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} exists and is not empty; choose a new directory")
    targets = quantized_modules(in_dir)
    if scheme.startswith("fp8"):
        targets.discard("lm_head")  # see config.online_groups: the head is int8 under int schemes, else float
    tensors, metadata = _read_all(in_dir)
    out, count = {}, 0
    odd_groups: dict = {}  # group size (or "lm_head") -> modules with their own config group
    fmt = {"fp8": "float-quantized", "int8": "pack-quantized", "int4": "pack-quantized"}.get(scheme)
    for name, t in tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or module not in targets or t.dim() != 2:
            out[name] = t
            continue
        count += 1
        w = t.float()
        if scheme == "fp8-block":
            values, scale_inv = formats.quantize_fp8(w, "block", (128, 128))
            out[name], out[f"{module}.weight_scale_inv"] = values, scale_inv
            continue
        from compressed_tensors.compressors import BaseCompressor

        g, module_scheme = group_size, scheme
        if module == "lm_head":
            g, module_scheme = None, "int8"
            odd_groups.setdefault("lm_head", []).append(module)
        if scheme == "fp8":
            _, scale = formats.quantize_fp8(w, "channel")
        else:
            if module != "lm_head":
                g = _fitting_group(w.shape[1], group_size)
                if g != group_size:
                    odd_groups.setdefault(g, []).append(module)
            _, scale = formats.quantize_int(w, online_scheme(module_scheme, g).bits, g)
        ct = _ct_scheme(module_scheme, g)
        state = {"weight": w, "weight_scale": scale.to(t.dtype if t.dtype.is_floating_point else torch.float32),
                 "weight_zero_point": torch.zeros(scale.shape, dtype=torch.int8 if fmt == "pack-quantized"
                                                  else torch.float8_e4m3fn)}
        for k, v in BaseCompressor.load_from_registry(fmt).compress(state, ct).items():
            out[f"{module}.{k}"] = v.contiguous()
    if count == 0:
        raise ValueError(f"{in_dir}: no linear layer weights to quantize")
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in in_dir.iterdir():  # tokenizer, generation config, chat template, README ...
        if p.is_file() and p.suffix != ".safetensors" and p.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(p, out_dir / p.name)
    save_file(out, str(out_dir / "model.safetensors"), metadata={**metadata, "format": "pt"})
    groups = {"group_0": _ct_scheme(scheme, group_size)} if scheme != "fp8-block" else {}
    for i, (g, modules) in enumerate(sorted(odd_groups.items(), key=lambda kv: str(kv[0]))):
        groups[f"group_{i + 1}"] = (_ct_scheme("int8", None, modules) if g == "lm_head" else
                                    _ct_scheme(scheme, g, sorted(modules)))
    config["quantization_config"] = _quantization_config(scheme, groups, fmt, tensors, targets)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    before = sum(t.numel() * t.element_size() for t in tensors.values())
    after = sum(t.numel() * t.element_size() for t in out.values())
    return {"scheme": scheme, "group_size": group_size, "quantized_tensors": count, "bytes_before": before,
            "bytes_after": after, "out_dir": str(out_dir)}


def _quantization_config(scheme: str, groups: dict, fmt: str | None, tensors: dict, targets: set) -> dict:
    if scheme == "fp8-block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128]}
    from compressed_tensors.quantization import QuantizationConfig

    # every other Linear-shaped weight is listed as ignored, as llm-compressor does (lm_head, routers, ...)
    ignore = sorted(name.rpartition(".")[0] for name, t in tensors.items()
                    if name.endswith(".weight") and t.dim() == 2 and name.rpartition(".")[0] not in targets
                    and "embed" not in name)
    qc = QuantizationConfig(config_groups=groups, format=fmt, ignore=ignore,
                            quantization_status="compressed")
    return json.loads(qc.model_dump_json(exclude_none=True))
