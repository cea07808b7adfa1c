"""Which quantization a model runs with: read from the checkpoint's `quantization_config` (compressed-tensors,
or DeepSeek-V3's FP8 block format), or asked for with `LLM(..., quantization="fp8" | "int8" | "int4")`.

Every scheme is reduced to a `WeightScheme` (what the stored values and scales are) per linear module; anything
else (another quant_method, actorder / g_idx, NVFP4, sparsity, 2- or 3-bit weights) is refused with a ValueError
that names it, so nothing loads silently wrong.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

ONLINE_SCHEMES = ("fp8", "int8", "int4")  # LLM(quantization=...) on a float checkpoint
DEFAULT_INT4_GROUP = 32


@dataclass(frozen=True)
class WeightScheme:
    kind: str                    # "int" or "float" (FP8 E4M3)
    bits: int                    # 4 or 8
    strategy: str                # "tensor", "channel", "group" or "block"
    group_size: int | None = None
    block: tuple[int, int] | None = None  # (rows, cols) for "block"
    symmetric: bool = True
    # FP8 checkpoints also say how activations were meant to be scaled: None (weight-only), "dynamic", "static"
    activations: str | None = None

    def describe(self) -> str:
        name = "fp8" if self.kind == "float" else f"int{self.bits}"
        detail = {"tensor": "per-tensor", "channel": "per-channel",
                  "group": f"group {self.group_size}", "block": f"{self.block and self.block[0]}x"
                  f"{self.block and self.block[1]} blocks"}[self.strategy]
        act = f", {self.activations} activation scales" if self.activations else ""
        return f"{name} {detail}{'' if self.symmetric else ' asymmetric'}{act}"


def online_scheme(name: str, group_size: int | None = None) -> WeightScheme:
    """The scheme `quantization=name` (or `frontierlm quantize --scheme name`) applies to a float model."""
    if name == "fp8":
        return WeightScheme("float", 8, "channel", activations="dynamic")
    if name == "fp8-block":
        return WeightScheme("float", 8, "block", block=(128, 128), activations="dynamic")
    if name == "int8":
        return WeightScheme("int", 8, "group" if group_size else "channel", group_size)
    if name == "int4":
        return WeightScheme("int", 4, "group", group_size or DEFAULT_INT4_GROUP)
    raise ValueError(f"unknown quantization scheme {name!r}; supported: fp8, fp8-block, int8, int4")


def _match(name: str, patterns) -> bool:
    """compressed-tensors target matching: "re:REGEX" (re.match), an exact name, or a name suffix."""
    for p in patterns or ():
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


@dataclass
class QuantConfig:
    """The model-wide choice: `scheme_for(checkpoint module name)` gives each linear module's WeightScheme or
    None (left in float)."""
    method: str                           # "compressed-tensors", "fp8" (DeepSeek-V3 / HF fine-grained FP8), "online"
    groups: list = field(default_factory=list)  # [(targets, WeightScheme)]
    ignore: list = field(default_factory=list)
    checkpoint_format: str | None = None  # compressed-tensors "format"
    kv_cache_scheme: dict | None = None

    @property
    def from_checkpoint(self) -> bool:
        return self.method != "online"

    def scheme_for(self, module: str) -> WeightScheme | None:
        if _match(module, self.ignore):
            return None
        for targets, scheme in self.groups:  # names and regexes first, as compressed-tensors matches
            if _match(module, [t for t in targets if t != "Linear"]):
                return scheme
        return next((scheme for targets, scheme in self.groups if "Linear" in targets), None)

    def describe(self) -> str:
        schemes = sorted({s.describe() for _, s in self.groups})
        return f"{self.method} ({'; '.join(schemes)})"


def _ct_weight_scheme(group: str, args: dict, fmt: str | None, acts: dict | None) -> WeightScheme:
    where = f"compressed-tensors config group {group!r}"
    if args.get("actorder") not in (None, False, "static"):
        raise ValueError(f"{where}: activation ordering (actorder={args['actorder']!r}, g_idx) is not supported")
    kind, bits, strategy = args.get("type", "int"), int(args.get("num_bits", 8)), args.get("strategy", "tensor")
    if kind == "float":
        if bits != 8:
            raise ValueError(f"{where}: float{bits} weights (FP4 / NVFP4 / MXFP4) are not supported; FP8 E4M3 is")
        if strategy not in ("tensor", "channel", "block"):
            raise ValueError(f"{where}: FP8 weight strategy {strategy!r} is not supported (tensor, channel, block are)")
    elif kind == "int":
        if bits not in (4, 8):
            raise ValueError(f"{where}: int{bits} weights are not supported (int4 and int8 are)")
        if strategy not in ("channel", "group"):
            raise ValueError(f"{where}: int{bits} weight strategy {strategy!r} is not supported "
                             "(channel and group are)")
        if bits == 8 and not args.get("symmetric", True):
            raise ValueError(f"{where}: asymmetric int8 weights are not supported (symmetric int8, int4 either)")
    else:
        raise ValueError(f"{where}: weight type {kind!r} is not supported")
    block = tuple(args["block_structure"]) if strategy == "block" else None
    if strategy == "block" and (not block or len(block) != 2):
        raise ValueError(f"{where}: block strategy needs a 2-entry block_structure, got {args.get('block_structure')!r}")
    group_size = args.get("group_size") if strategy == "group" else None
    if strategy == "group" and not group_size:
        raise ValueError(f"{where}: group strategy without a group_size")
    act = None
    if acts:
        if acts.get("type", "int") == "float" or kind == "float":
            act = "dynamic" if acts.get("dynamic") else "static"
        else:  # W8A8 int: we compute weight-only (exact activations), which only removes error
            logger.info("%s: int activation quantization is not emulated; the weights run weight-only", where)
    return WeightScheme(kind, bits, strategy, group_size, block, bool(args.get("symmetric", True)), act)


_CT_FORMATS = ("pack-quantized", "float-quantized", "int-quantized", "naive-quantized")


def from_hf_config(qc: dict) -> QuantConfig:
    """A checkpoint's `quantization_config` -> QuantConfig, or a ValueError naming what is not supported."""
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        fmt = qc.get("format")
        if fmt not in _CT_FORMATS:
            raise ValueError(f"compressed-tensors format {fmt!r} is not supported; supported: {', '.join(_CT_FORMATS)}")
        if qc.get("sparsity_config"):
            raise ValueError("compressed-tensors sparsity_config (sparse checkpoints) is not supported")
        if qc.get("transform_config"):
            raise ValueError("compressed-tensors transform_config (rotated weights) is not supported")
        groups = []
        for name, g in (qc.get("config_groups") or {}).items():
            fmt_g = g.get("format") or fmt
            if fmt_g not in _CT_FORMATS:
                raise ValueError(f"compressed-tensors config group {name!r}: format {fmt_g!r} is not supported")
            if g.get("weights") is None:
                raise ValueError(f"compressed-tensors config group {name!r}: activation-only quantization "
                                 "is not supported")
            groups.append((list(g.get("targets") or []),
                           _ct_weight_scheme(name, g["weights"], fmt_g, g.get("input_activations"))))
        if not groups:
            raise ValueError("compressed-tensors quantization_config has no config_groups")
        status = qc.get("quantization_status", "compressed")
        if status not in ("compressed", "frozen"):
            raise ValueError(f"compressed-tensors quantization_status {status!r} is not supported (compressed is)")
        return QuantConfig("compressed-tensors", groups, list(qc.get("ignore") or []), fmt, qc.get("kv_cache_scheme"))
    if method == "fp8":
        fmt = qc.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"FP8 checkpoint format {fmt!r} is not supported (e4m3 is)")
        block = qc.get("weight_block_size")
        act = qc.get("activation_scheme", "dynamic")
        scheme = (WeightScheme("float", 8, "block", block=tuple(block), activations=act) if block else
                  WeightScheme("float", 8, "tensor", activations=act))
        ignore = list(qc.get("modules_to_not_convert") or qc.get("ignored_layers") or [])
        return QuantConfig("fp8", [(["Linear"], scheme)], ignore)
    raise ValueError(f"quantization method {method!r} is not supported; supported: compressed-tensors "
                     f"({', '.join(_CT_FORMATS)}), fp8 (per-tensor or DeepSeek-V3 block scales)")


def resolve(hf_config, quantization: str | None, group_size: int | None = None) -> QuantConfig | None:
    """The model's QuantConfig from its HF config and the `quantization` argument (None: whatever the checkpoint
    says). A quantized checkpoint runs its own scheme: asking for another one is an error."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    if qc:
        config = from_hf_config(qc)
        if quantization not in (None, config.method):
            raise ValueError(f"quantization={quantization!r}: this checkpoint is already quantized "
                             f"({config.describe()}); leave quantization unset or pass {config.method!r}")
        return config
    if quantization is None:
        return None
    if quantization not in ONLINE_SCHEMES:
        raise ValueError(f"quantization={quantization!r} is not supported; on a float checkpoint use one of "
                         f"{', '.join(ONLINE_SCHEMES)} (quantized checkpoints are detected from config.json)")
    return QuantConfig("online", *online_groups(quantization, group_size))


def online_groups(name: str, group_size: int | None = None) -> tuple[list, list]:
    """(config groups, ignore) of `quantization=name`: an untied LM head gets int8 per channel under the int
    schemes (llama.cpp also keeps the output matrix at higher precision: int4 logits drift) and stays float
    under FP8 (llm-compressor's FP8 recipes leave it out)."""
    scheme = online_scheme(name, group_size)
    if scheme.kind == "int":
        return [(["lm_head"], online_scheme("int8")), (["Linear"], scheme)], []
    return [(["Linear"], scheme)], ["lm_head"]


def check_quantization_arg(value) -> None:
    """EngineConfig's check of `quantization` (the checkpoint-dependent checks come when the model loads)."""
    allowed = ONLINE_SCHEMES + ("compressed-tensors",)
    if value is not None and value not in allowed:
        raise ValueError(f"quantization must be None (the checkpoint's own) or one of {', '.join(allowed)}, "
                         f"got {value!r}")
