"""SpeculativeConfig: what `LLM(..., speculative_config={...})` and `--speculative-config JSON` accept (vLLM's
field names). Checked here on its own; what needs the models (the draft's vocabulary, MTP modules in the
target) is checked when the engine starts."""
from __future__ import annotations

from dataclasses import dataclass, fields

METHODS = ("draft_model", "ngram", "mtp")


@dataclass
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    model: str | None = None  # draft_model: the draft's HF-format directory
    prompt_lookup_min: int = 1  # ngram: shortest suffix to match
    prompt_lookup_max: int = 4  # ngram: longest suffix to match (tried first)
    adaptive: bool = True  # K follows acceptance and the measured step cost; False pins K

    @classmethod
    def from_dict(cls, value) -> "SpeculativeConfig":
        if isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown field(s) {unknown}; known: {sorted(known)}")
        value = dict(value)
        if "method" not in value:
            # vLLM infers the method: a draft directory means draft_model
            value["method"] = "draft_model" if value.get("model") else None
        for name in ("method", "num_speculative_tokens"):
            if value.get(name) is None:
                raise ValueError(f"speculative_config.{name} is required")
        return cls(**value)

    def __post_init__(self):
        def integer(name, lo):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"speculative_config.{name} must be an integer >= {lo}, got {v!r}")

        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {list(METHODS)}, got {self.method!r}")
        integer("num_speculative_tokens", 1)
        integer("prompt_lookup_min", 1)
        integer("prompt_lookup_max", 1)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) exceeds "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative_config.adaptive must be true or false, got {self.adaptive!r}")
        if self.method == "draft_model":
            if not self.model or not isinstance(self.model, str):
                raise ValueError("speculative_config.model (the draft model's directory) is required for "
                                 "method 'draft_model'")
        elif self.model is not None:
            raise ValueError(f"speculative_config.model is only used by method 'draft_model', "
                             f"not {self.method!r}")
