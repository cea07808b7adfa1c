"""OpenAI's tool fields (pydantic): `tools`, `tool_choice`, and the `tool_calls` of assistant messages."""
from __future__ import annotations

import json
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI's rule for function names (they also end up inside the grammar, so nothing else gets through)
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def check_function_name(name: str) -> str:
    if not 1 <= len(name) <= 64 or not set(name) <= _NAME_CHARS:
        raise ValueError(f"function names must be 1-64 letters, digits, '_' or '-', got {name!r}")
    return name


class FunctionDefinition(_Strict):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict] = None
    strict: Optional[bool] = None

    _name = field_validator("name")(classmethod(lambda cls, v: check_function_name(v)))

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, v):
        if v is not None and v.get("type", "object") != "object":
            raise ValueError("function parameters must be a JSON schema of an object")
        return v


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Union[Literal["none", "auto", "required"], NamedToolChoice]


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    """A call in an assistant message of the history (what the server answered earlier)."""
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: ToolCallFunction

    def template_dict(self) -> dict:
        # templates index arguments as a mapping (Llama 3.1, Qwen2.5 write `arguments | tojson`)
        try:
            args = json.loads(self.function.arguments)
        except ValueError:
            args = self.function.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.function.name, "arguments": args}}


class ResumedCall(_Strict):
    id: str
    arguments_chars: int = Field(ge=0)


class ResumeToolStream(_Strict):
    """What the client of a streamed choice with tools already has, sent by the router when it resumes the
    stream on another instance (router/migration.py): the characters of content, and per call (in index order)
    its id and the characters of arguments. That instance's ToolStreamer starts from them."""
    content_chars: int = Field(ge=0)
    calls: list[ResumedCall] = []
