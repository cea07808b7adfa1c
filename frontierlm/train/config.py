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


# The MoE / MLA / MTP fields each architecture takes: our name -> the transformers config field it sets.
# Qwen's first_k_dense_replace becomes mlp_only_layers = [0, k), Qwen2-MoE's num_shared_experts a shared expert
# of n * moe_intermediate_size (see modeling.build_hf_config).
_QWEN_MOE = {"num_experts": "num_experts", "num_experts_per_tok": "num_experts_per_tok",
             "moe_intermediate_size": "moe_intermediate_size", "first_k_dense_replace": "mlp_only_layers"}
_DEEPSEEK = {"num_experts": "n_routed_experts", "num_experts_per_tok": "num_experts_per_tok",
             "moe_intermediate_size": "moe_intermediate_size", "num_shared_experts": "n_shared_experts",
             "first_k_dense_replace": "first_k_dense_replace", "n_group": "n_group", "topk_group": "topk_group",
             **{k: k for k in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                               "v_head_dim")}}
ARCH_FIELDS = {
    "MixtralForCausalLM": {"num_experts": "num_local_experts", "num_experts_per_tok": "num_experts_per_tok"},
    "Qwen2MoeForCausalLM": {**_QWEN_MOE, "num_shared_experts": "shared_expert_intermediate_size"},
    "Qwen3MoeForCausalLM": _QWEN_MOE,
    "DeepseekV2ForCausalLM": _DEEPSEEK,
    "DeepseekV3ForCausalLM": {**_DEEPSEEK, "num_nextn_predict_layers": "num_nextn_predict_layers"},
}
MLA_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
# The smallest value of each MoE / MLA / MTP field (when set).
_MOE_MLA_MINIMUM = {"num_experts": 1, "num_experts_per_tok": 1, "moe_intermediate_size": 1,
                    "num_shared_experts": 0, "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1,
                    "kv_lora_rank": 1, "q_lora_rank": 0, "qk_nope_head_dim": 1, "qk_rope_head_dim": 2,
                    "v_head_dim": 1, "num_nextn_predict_layers": 0}
PARALLEL_MODES = ("ddp", "fsdp")  # how torchrun's processes split the work (distributed.py)
# The only architecture whose router has a selection bias (DeepSeek-V3's e_score_correction_bias).
BIAS_BALANCED_ARCHITECTURES = ("DeepseekV3ForCausalLM",)


@dataclass
class ModelSection:
    """The student architecture; names follow transformers' config fields. vocab_size comes from the
    tokenizer. `extra` passes further fields to the transformers config class as-is (e.g. DeepSeek's
    routed_scaling_factor, norm_topk_prob).

    MoE / MLA / MTP fields (None: the architecture's transformers default, sized for the released models, so
    set them for a small one) apply to the architectures in ARCH_FIELDS; frontierlm/train/examples/
    deepseek_v3.yaml shows them all. Scoring follows the architecture (V2: softmax, V3: sigmoid with a
    correction bias); n_group / topk_group (DeepSeek group-limited routing) default to no group limit.
    """

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
    num_experts: int | None = None  # routed experts
    num_experts_per_tok: int | None = None  # top-k
    moe_intermediate_size: int | None = None  # per routed expert (Mixtral's experts use intermediate_size)
    num_shared_experts: int | None = None  # always-on experts of moe_intermediate_size
    first_k_dense_replace: int | None = None  # the first k layers keep a dense MLP
    n_group: int | None = None  # DeepSeek group-limited routing: experts split in n_group groups,
    topk_group: int | None = None  # a token picks its experts inside its topk_group best groups
    kv_lora_rank: int | None = None  # MLA (DeepSeek)
    q_lora_rank: int | None = None  # 0: queries are not compressed
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    num_nextn_predict_layers: int = 0  # DeepSeek-V3 multi-token-prediction depth D
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        from frontierlm.models.registry import supported_architectures

        if self.architecture not in supported_architectures():
            raise ValueError(f"model.architecture must be one of {supported_architectures()}, "
                             f"got {self.architecture!r}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            _check_int(f"model.{name}", getattr(self, name))
        if self.architecture in MLA_ARCHITECTURES:  # heads are sized by the MLA fields, one KV head per head
            self.num_key_value_heads = None
        elif self.num_key_value_heads is not None:
            _check_int("model.num_key_value_heads", self.num_key_value_heads)
            if self.num_attention_heads % self.num_key_value_heads:
                raise ValueError(f"model.num_key_value_heads ({self.num_key_value_heads}) must divide "
                                 f"model.num_attention_heads ({self.num_attention_heads})")
        if self.head_dim is not None:
            _check_int("model.head_dim", self.head_dim, 2)
        elif self.hidden_size % self.num_attention_heads and self.architecture not in MLA_ARCHITECTURES:
            raise ValueError(f"model.num_attention_heads ({self.num_attention_heads}) must divide "
                             f"model.hidden_size ({self.hidden_size}) unless model.head_dim is set")
        if self.architecture not in MLA_ARCHITECTURES and \
                (self.head_dim or self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("model.head_dim must be even (rotary embeddings rotate pairs of dims)")
        self._validate_moe_mla()
        _check_range("model.rope_theta", self.rope_theta, 0, float("inf"), lo_open=True)
        _check_range("model.rms_norm_eps", self.rms_norm_eps, 0, 1, lo_open=True)
        _check_range("model.initializer_range", self.initializer_range, 0, 1, lo_open=True)
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(f"model.tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"model.extra must be a mapping, got {self.extra!r}")

    def _validate_moe_mla(self) -> None:
        fields = ARCH_FIELDS.get(self.architecture, {})
        for name in _MOE_MLA_MINIMUM:
            value = getattr(self, name)
            if value is None or (name == "num_nextn_predict_layers" and value == 0):
                continue
            if name not in fields:
                takers = sorted(a for a, f in ARCH_FIELDS.items() if name in f)
                raise ValueError(f"model.{name} does not apply to {self.architecture} "
                                 f"(only to {', '.join(takers)})")
            _check_int(f"model.{name}", value, _MOE_MLA_MINIMUM[name])
        if None not in (self.num_experts, self.num_experts_per_tok) and self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"model.num_experts_per_tok ({self.num_experts_per_tok}) must not exceed "
                             f"model.num_experts ({self.num_experts})")
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError("model.n_group and model.topk_group go together (set both or neither)")
        if self.n_group is not None:
            if self.num_experts is None or self.num_experts % self.n_group:
                raise ValueError(f"model.n_group ({self.n_group}) must divide model.num_experts "
                                 f"({self.num_experts})")
            if self.topk_group > self.n_group:
                raise ValueError(f"model.topk_group ({self.topk_group}) must not exceed model.n_group "
                                 f"({self.n_group})")
        if self.qk_rope_head_dim is not None and self.qk_rope_head_dim % 2:
            raise ValueError("model.qk_rope_head_dim must be even (rotary embeddings rotate pairs of dims)")
        if self.first_k_dense_replace is not None and self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(f"model.first_k_dense_replace ({self.first_k_dense_replace}) exceeds "
                             f"model.num_hidden_layers ({self.num_hidden_layers})")


@dataclass
class DataSection:
    corpus: str = "python-docs"  # python-docs, python-stdlib, a text file, or a folder of text files
    max_chars: int | None = None  # cap on corpus characters (None: all)
    val_fraction: float = 0.05
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch, over all data-parallel ranks
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_batches: int = 8  # validation micro-batches per evaluation
    tokenizer: str | None = None  # tokenizer directory; None: train one on the corpus into OUT_DIR/tokenizer
    tokenizer_vocab_size: int = 4096
    tokenizer_pretokenizer: str = "auto"  # text, code (whitespace runs and indentation); auto: code for python-stdlib

    def validate(self) -> None:
        from frontierlm.train.corpus import BUILTIN_CORPORA
        from frontierlm.train.tokenizer import PRETOKENIZERS

        if self.corpus not in BUILTIN_CORPORA and not Path(self.corpus).exists():
            raise ValueError(f"data.corpus must be one of {', '.join(BUILTIN_CORPORA)}, a text file or a folder; "
                             f"{self.corpus!r} does not exist")
        if self.tokenizer_pretokenizer not in ("auto", *PRETOKENIZERS):
            raise ValueError(f"data.tokenizer_pretokenizer must be auto or one of {', '.join(PRETOKENIZERS)}, "
                             f"got {self.tokenizer_pretokenizer!r}")
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
    moe_aux_loss_coef: float = 0.0  # MoE load-balancing loss weight (e.g. 0.01); 0 = off
    moe_bias_update_speed: float = 0.0  # DeepSeek-V3 aux-loss-free balancing: bias step per optimizer step
    mtp_loss_weight: float = 0.3  # lambda: the MTP loss is lambda / D * (sum of the D depth losses)

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
        for name in ("moe_aux_loss_coef", "moe_bias_update_speed", "mtp_loss_weight"):
            _check_range(f"optim.{name}", getattr(self, name), 0, float("inf"))


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
    parallel: str = "ddp"  # under torchrun: ddp (replicate the model) or fsdp (shard it; see distributed.py)
    bf16: bool = True  # bf16 autocast on CUDA and on CPUs with AMX / AVX512-BF16 (precision.py); else float32
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
        arch = self.model.architecture
        if self.optim.moe_aux_loss_coef > 0 and "num_experts" not in ARCH_FIELDS.get(arch, {}):
            raise ValueError(f"optim.moe_aux_loss_coef needs an MoE architecture, {arch} is dense")
        if self.optim.moe_bias_update_speed > 0 and arch not in BIAS_BALANCED_ARCHITECTURES:
            raise ValueError(f"optim.moe_bias_update_speed (aux-loss-free balancing) needs a router with a "
                             f"correction bias: {', '.join(BIAS_BALANCED_ARCHITECTURES)}, not {arch}")
        if self.data.seq_len <= self.model.num_nextn_predict_layers:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) must exceed model.num_nextn_predict_layers "
                             f"({self.model.num_nextn_predict_layers}): MTP depth k predicts k + 1 tokens ahead")
        if self.parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {', '.join(PARALLEL_MODES)}, got {self.parallel!r}")
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
