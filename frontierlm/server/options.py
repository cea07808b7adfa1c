"""What `frontierlm serve` flags change in request handling (one object, so the app's signature stays small)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from frontierlm.engine.llm import generation_config_defaults


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
    if mode != "auto" and not (directory / "generation_config.json").is_file():
        raise ValueError(f"--generation-config: no generation_config.json in {directory}")
    try:
        return generation_config_defaults(directory)
    except ValueError as e:
        raise ValueError(f"--generation-config: {e}") from None
