"""TrainConfig: the model / data / optim / distill sections plus run settings, validated on construction.

Loaded from YAML (sections as mappings, run settings at the top level) and/or command-line flags; a bad
value raises ValueError naming the field as `section.field`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path


def _check_int(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_range(name: str, value, lo: float, hi: float, lo_open=False, hi_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, "
                         f"got {value!r}")


@dataclass
class ModelSection:
    """The student architecture; names follow transformers' config fields. vocab_size comes from the
    tokenizer. `extra` passes further fields to the transformers config class (e.g. MoE sizes)."""

    architecture: str = "LlamaForCausalLM"
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # None: as many as attention heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        from frontierlm.models.registry import supported_architectures

        if self.architecture not in supported_architectures():
            raise ValueError(f"model.architecture must be one of {supported_architectures()}, "
                             f"got {self.architecture!r}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            _check_int(f"model.{name}", getattr(self, name))
        if self.num_key_value_heads is not None:
            _check_int("model.num_key_value_heads", self.num_key_value_heads)
            if self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(f"model.num_key_value_heads ({self.num_key_value_heads}) must divide "
                                 f"model.num_attention_heads ({self.num_attention_heads})")
        if self.head_dim is not None:
            _check_int("model.head_dim", self.head_dim, 2)
        elif self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.num_attention_heads ({self.num_attention_heads}) must divide "
                             f"model.hidden_size ({self.hidden_size}) unless model.head_dim is set")
        if (self.head_dim or self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("model.head_dim must be even (rotary embeddings rotate pairs of dims)")
        _check_range("model.rope_theta", self.rope_theta, 0, float("inf"), lo_open=True)
        _check_range("model.rms_norm_eps", self.rms_norm_eps, 0, 1, lo_open=True)
        _check_range("model.initializer_range", self.initializer_range, 0, 1, lo_open=True)
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"model.tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"model.extra must be a mapping, got {self.extra!r}")


@dataclass
class DataSection:
    corpus: str = "python-docs"  # python-docs, a text file, or a folder of text files
    max_chars: int | None = None  # cap on corpus characters (None: all)
    val_fraction: float = 0.05
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch, over all data-parallel ranks
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_batches: int = 8  # validation micro-batches per evaluation
    tokenizer: str | None = None  # tokenizer directory; None: train one on the corpus into OUT_DIR/tokenizer
    tokenizer_vocab_size: int = 4096

    def validate(self) -> None:
        from frontierlm.train.corpus import PYTHON_DOCS

        if self.corpus != PYTHON_DOCS and not Path(self.corpus).exists():
            raise ValueError(f"data.corpus must be {PYTHON_DOCS!r}, a text file or a folder; "
                             f"{self.corpus!r} does not exist")
        if self.max_chars is not None:
            _check_int("data.max_chars", self.max_chars)
        _check_range("data.val_fraction", self.val_fraction, 0, 1, lo_open=True, hi_open=True)
        for name in ("seq_len", "batch_size", "grad_accum", "eval_batches"):
            _check_int(f"data.{name}", getattr(self, name))
        if self.tokenizer is not None and not Path(self.tokenizer).is_dir():
            raise ValueError(f"data.tokenizer must be a tokenizer directory; {self.tokenizer!r} is not one")
        _check_int("data.tokenizer_vocab_size", self.tokenizer_vocab_size, 264)


@dataclass
class OptimSection:
    """AdamW with linear warmup then cosine decay to min_lr at the last step."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # matrices only; norms and biases are not decayed
    warmup_steps: int = 100
    grad_clip: float = 1.0  # max global grad norm; 0 = off

    def validate(self) -> None:
        _check_range("optim.lr", self.lr, 0, float("inf"), lo_open=True)
        _check_range("optim.min_lr", self.min_lr, 0, self.lr)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise ValueError(f"optim.betas must be two numbers, got {self.betas!r}")
        for b in self.betas:
            _check_range("optim.betas", b, 0, 1, hi_open=True)
        self.betas = tuple(self.betas)
        _check_range("optim.eps", self.eps, 0, 1, lo_open=True)
        _check_range("optim.weight_decay", self.weight_decay, 0, float("inf"))
        _check_int("optim.warmup_steps", self.warmup_steps, 0)
        _check_range("optim.grad_clip", self.grad_clip, 0, float("inf"))


@dataclass
class DistillSection:
    """Used by `frontierlm distill` only: loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE."""

    alpha: float = 0.9
    temperature: float = 2.0

    def validate(self) -> None:
        _check_range("distill.alpha", self.alpha, 0, 1)
        _check_range("distill.temperature", self.temperature, 0, float("inf"), lo_open=True)


SECTIONS = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "distill": DistillSection}


@dataclass
class TrainConfig:
    out_dir: str = "runs/frontierlm"  # the HF model directory written; training state in OUT_DIR/checkpoint
    steps: int = 1000
    eval_every: int = 100  # 0 = evaluate at the end only
    save_every: int = 500  # 0 = save at the end only
    log_every: int = 10  # train-loss records in the JSON log
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda
    bf16: bool = True  # bf16 autocast (CUDA only; CPU trains in float32)
    resume: bool = False  # continue from OUT_DIR/checkpoint when it exists
    progress: bool = True  # tqdm progress line
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def __post_init__(self):
        for name in SECTIONS:
            getattr(self, name).validate()
        _check_int("steps", self.steps)
        for name in ("eval_every", "save_every", "log_every"):
            _check_int(name, getattr(self, name), 0)
        _check_int("seed", self.seed, 0)
        for name in ("bf16", "resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise ValueError(f"out_dir must be a directory path, got {self.out_dir!r}")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) must not exceed "
                             f"model.max_position_embeddings ({self.model.max_position_embeddings})")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"device {self.device!r} is not a valid torch device: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        """Nested mapping (as in the YAML file) -> TrainConfig; unknown keys are errors."""
        if not isinstance(raw, dict):
            raise ValueError(f"a train config must be a mapping, got {type(raw).__name__}")
        kwargs = {}
        hints = typing.get_type_hints(cls)
        for key, value in raw.items():
            if key in SECTIONS:
                if value is None:
                    continue
                if not isinstance(value, dict):
                    raise ValueError(f"{key} must be a mapping of fields, got {value!r}")
                kwargs[key] = _build_section(key, SECTIONS[key], value)
            elif key in hints:
                kwargs[key] = _coerce(key, hints[key], value)
            else:
                raise ValueError(f"unknown train config field {key!r}; known: {sorted(hints)}")
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict | None = None) -> "TrainConfig":
        """YAML file (optional) with `overrides` ({"section.field" or "field": value}) applied on top."""
        raw: dict = {}
        if path is not None:
            import yaml

            try:
                raw = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError) as e:
                raise ValueError(f"cannot read train config {path}: {e}") from None
            if not isinstance(raw, dict):
                raise ValueError(f"train config {path} must hold a mapping")
        for dotted, value in (overrides or {}).items():
            node = raw
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _build_section(prefix: str, section_cls, values: dict):
    hints = typing.get_type_hints(section_cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(f'{prefix}.{k}' for k in unknown)}; "
                         f"known: {sorted(hints)}")
    return section_cls(**{k: _coerce(f"{prefix}.{k}", hints[k], v) for k, v in values.items()})


def _coerce(name: str, hint, value):
    """YAML 1.1 reads `3e-4` as a string and flags arrive as strings: convert what is unambiguous."""
    args = typing.get_args(hint)
    if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    base = next((a for a in args if a is not type(None)), hint) if args and type(None) in args else hint
    if base is float and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if base is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if base is bool and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    if base is dict and isinstance(value, str):
        import json

        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(f"{name} must be a JSON object, got {value!r}") from None
    if typing.get_origin(base) is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a list of numbers, got {value!r}") from None
    return value


def flag_fields() -> list[tuple[str, str, object]]:
    """(flag, dotted field, type hint) for every config field: `--lr` -> optim.lr, `--steps` -> steps.
    Flag names are the field names with dashes; they are unique across sections."""
    out = []
    for name, hint in typing.get_type_hints(TrainConfig).items():
        if name in SECTIONS:
            out += [(f"--{k.replace('_', '-')}", f"{name}.{k}", h)
                    for k, h in typing.get_type_hints(SECTIONS[name]).items()]
        else:
            out.append((f"--{name.replace('_', '-')}", name, hint))
    flags = [f for f, _, _ in out]
    assert len(flags) == len(set(flags)), "train config field names must be unique across sections"
    return out
