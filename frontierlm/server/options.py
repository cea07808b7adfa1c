"""What `frontierlm serve` flags change in request handling (one object, so the app's signature stays small)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# generation_config.json keys that are sampling defaults, and the SamplingParams field each sets (vLLM's set)
GENERATION_DEFAULTS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                       "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


@dataclass
class ServeOptions:
    served_model_names: list[str] = field(default_factory=list)  # the first is the one responses carry
    chat_template: str | None = None       # overrides the tokenizer's (--chat-template)
    tool_parser: str | None = None         # --tool-call-parser; None: read the format off the chat template
    enable_auto_tool_choice: bool = False
    sampling_defaults: dict = field(default_factory=dict)  # from generation_config.json (--generation-config)
    max_logprobs: int = 20
    log_requests: bool = True


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the argument itself when it is an inline Jinja template."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text()
    if "{" in value:  # inline: Jinja needs braces; anything else was meant as a path
        return value
    raise ValueError(f"--chat-template: {value} is neither a file nor an inline Jinja template")


def generation_defaults(mode: str, model_dir: str) -> dict:
    """--generation-config: `auto` reads the model directory's generation_config.json, `vllm` ignores it, any
    other value is a directory holding one. Returns SamplingParams defaults for fields a request leaves unset."""
    if mode == "vllm":
        return {}
    directory = Path(model_dir if mode == "auto" else mode)
    if mode != "auto" and not directory.is_dir():
        raise ValueError(f"--generation-config: {mode} is not 'auto', 'vllm' or a directory")
    path = directory / "generation_config.json"
    if not path.is_file():
        if mode != "auto":
            raise ValueError(f"--generation-config: no generation_config.json in {directory}")
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"--generation-config: {path} is not valid JSON: {e}") from None
    defaults = {ours: config[key] for key, ours in GENERATION_DEFAULTS.items() if config.get(key) is not None}
    if config.get("do_sample") is False:  # transformers' greedy flag (as LLM.get_default_sampling_params reads it)
        defaults["temperature"] = 0.0
    return defaults
