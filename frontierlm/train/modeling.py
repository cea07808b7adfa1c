"""Build a trainable engine model from a ModelSection: the transformers config (what config.json will hold),
the in-memory ModelConfig, initialised parameters, and the loss hooks model-specific code plugs into."""
from __future__ import annotations

import inspect

import torch
from torch import nn

from frontierlm.config import ModelConfig
from frontierlm.models.loader import init_dummy_weights
from frontierlm.models.registry import get_model_class
from frontierlm.train.config import ARCH_FIELDS, MLA_ARCHITECTURES, ModelSection


def hf_config_class(architecture: str):
    """The transformers config class of an architecture name (LlamaForCausalLM -> LlamaConfig)."""
    import transformers

    model_cls = getattr(transformers, architecture, None)
    config_cls = getattr(model_cls, "config_class", None)
    if config_cls is None:
        raise ValueError(f"model.architecture {architecture!r} has no transformers config class")
    return config_cls


def build_hf_config(section: ModelSection, vocab_size: int, bos_token_id: int | None = None,
                    eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None):
    """The transformers config for `section` (architectures set, float32); `section.extra` goes in as-is."""
    kw = dict(
        vocab_size=vocab_size, hidden_size=section.hidden_size, intermediate_size=section.intermediate_size,
        num_hidden_layers=section.num_hidden_layers, num_attention_heads=section.num_attention_heads,
        num_key_value_heads=section.num_key_value_heads or section.num_attention_heads,
        max_position_embeddings=section.max_position_embeddings, rms_norm_eps=section.rms_norm_eps,
        tie_word_embeddings=section.tie_word_embeddings, initializer_range=section.initializer_range,
        rope_theta=section.rope_theta, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, architectures=[section.architecture], dtype="float32",
    )
    if section.head_dim is not None:
        kw["head_dim"] = section.head_dim
    kw.update(_moe_mla_fields(section))
    kw.update(section.extra)
    try:
        hf_config = hf_config_class(section.architecture)(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid model config for {section.architecture}: {e}") from None
    if section.num_shared_experts is not None and section.architecture == "Qwen2MoeForCausalLM":
        # Qwen2-MoE has one shared expert of shared_expert_intermediate_size units; set after construction so
        # that the architecture's default moe_intermediate_size counts when that field is unset.
        hf_config.shared_expert_intermediate_size = section.num_shared_experts * hf_config.moe_intermediate_size
    return hf_config


def _moe_mla_fields(section: ModelSection) -> dict:
    """The MoE / MLA / MTP fields of `section` under the architecture's transformers names (ARCH_FIELDS)."""
    out = {}
    for ours, theirs in ARCH_FIELDS.get(section.architecture, {}).items():
        value = getattr(section, ours)
        if value is None or theirs == "shared_expert_intermediate_size":  # Qwen2-MoE's: set after building
            continue
        if theirs == "mlp_only_layers":
            value = list(range(value))
        elif ours == "q_lora_rank" and value == 0:
            value = None  # transformers' spelling of "no query compression"
        out[theirs] = value
    if section.architecture in MLA_ARCHITECTURES:
        out["num_key_value_heads"] = section.num_attention_heads  # transformers' MLA repeats KV heads otherwise
        if section.n_group is None:
            # No group limit: transformers' V3 default (8 groups, top 4) assumes 256 experts.
            out.update(n_group=1, topk_group=1)
        elif section.architecture == "DeepseekV2ForCausalLM":
            out["topk_method"] = "group_limited_greedy"  # V2 applies groups only with this method
    return out


def model_config_from_hf(hf_config, dtype: torch.dtype = torch.float32) -> ModelConfig:
    """An in-memory ModelConfig (no directory, no weight files) for building a model to train."""
    eos = hf_config.eos_token_id
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    return ModelConfig("", hf_config, dtype, eos, hf_config.bos_token_id, [])


def init_weights(model: nn.Module, std: float) -> None:
    """Training init for models whose parameters start as torch.empty: normal(0, std) for matrices and
    embeddings (any tensor of 2+ dims, so fused expert stacks too), ones for norm scales, zeros for the other
    vectors (biases, routing biases); the loader's dummy format follows the same rule.
    A module needing another rule defines `init_weights(std)`; it runs after the generic pass."""
    init_dummy_weights(model, std, seed=None)  # the generic rule, from the global generator (the run's seed)
    with torch.no_grad():
        for module in model.modules():
            if module is not model and callable(getattr(module, "init_weights", None)):
                module.init_weights(std)


def build_model(hf_config, device: torch.device | str = "cpu", seed: int | None = None) -> nn.Module:
    """A freshly initialised float32 engine model for `hf_config`, in train mode."""
    model_config = model_config_from_hf(hf_config)
    model_cls = get_model_class(model_config.architecture)
    kwargs = {}
    if "num_mtp_layers" in inspect.signature(model_cls).parameters:  # MTP modules from scratch, not a checkpoint
        kwargs["num_mtp_layers"] = int(getattr(hf_config, "num_nextn_predict_layers", 0) or 0)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(model_config, **kwargs)
    init_weights(model, hf_config.initializer_range)
    return model.train()


class CausalLM(nn.Module):
    """An engine model as one module whose forward returns (hidden, logits): the unit DDP wraps, so every
    parameter used by the loss is inside the synchronised forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        hidden = self.model(input_ids, positions)  # attn_meta=None: plain causal attention
        return hidden, self.model.compute_logits(hidden)


def auxiliary_losses(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                     labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model-specific loss terms the trainer adds to the language-modelling loss (already weighted).

    Hooks (not used by the dense models; MoE and MTP models plug in here):
    * `aux_loss`: any module may set `self.aux_loss` to a scalar tensor during a training forward (e.g. MoE
      load balancing, weighted by its own coefficient). They are summed here and reset to None so that no
      autograd graph outlives its step.
    * `mtp_loss`: a model with multi-token-prediction heads defines
      `mtp_loss(hidden, input_ids, labels) -> scalar tensor` (None when it has no MTP modules), called on the
      main model's final hidden states. It runs first: MoE layers inside MTP modules set aux losses too.
    """
    out = {}
    mtp = getattr(model, "mtp_loss", None)
    mtp = mtp(hidden, input_ids, labels) if callable(mtp) else None
    aux = []
    for module in model.modules():
        value = getattr(module, "aux_loss", None)
        if isinstance(value, torch.Tensor):
            aux.append(value)
            module.aux_loss = None
    if aux:
        out["aux"] = torch.stack([a.float() for a in aux]).sum()
    if mtp is not None:
        out["mtp"] = mtp
    return out
