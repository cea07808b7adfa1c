"""OpenAI request bodies (pydantic) and their translation to SamplingParams.

Models are strict (a string where a number belongs is a 400, not a silent cast) and ignore unknown fields, as
OpenAI clients send fields a server may not know. Range checks live in SamplingParams, which names the field.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from frontierlm.sampling_params import SamplingParams, StructuredOutputsParams, warn_deprecated
from frontierlm.server.tools.protocol import ResumeToolStream, Tool, ToolCall, ToolChoice


# Server-side bounds that keep one request from holding too much (vLLM's defaults: max_logprobs=20; OpenAI: n<=128)
MAX_N = 128
MAX_LOGPROBS = 20
MAX_BAD_WORDS = 1024  # each is checked against the output at every step of every sequence

# request fields handed to SamplingParams unchanged (when given)
PASSTHROUGH = ("n", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias",
               "top_k", "min_p", "typical_p", "repetition_penalty", "mirostat_mode", "mirostat_tau", "mirostat_eta",
               "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens", "include_stop_str_in_output",
               "bad_words")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[str, int]] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class FieldError(ValueError):
    """A ValueError that knows the request field it is about (pydantic loses the location of errors raised
    by a model-level validator; api.py reads `param` back)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _surrogate_path(value: Any, path: str) -> str | None:
    """Where in `value` a string holds a lone surrogate ("\ud800" is valid JSON but not valid Unicode text,
    so no tokenizer can take it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, list):
        if set(map(type, value)) <= {int, float, bool}:  # token ids: skip without a Python-level loop
            return None
        return next((p for i, v in enumerate(value) if (p := _surrogate_path(v, f"{path}[{i}]"))), None)
    if isinstance(value, dict):
        for k, v in value.items():
            p = _surrogate_path(k, f"{path} (a key)") or _surrogate_path(v, f"{path}.{k}")
            if p:
                return p
    return None


def check_text_fields(data: Any) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            where = _surrogate_path(key, "a field name") or _surrogate_path(value, str(key))
            if where:
                param = key if isinstance(key, str) and where != "a field name" else None
                raise FieldError(param, f"{where}: the text holds a lone UTF-16 surrogate (such as \\ud800), "
                                 "which is not valid Unicode")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions, including the non-OpenAI ones that clients
    send through `extra_body` (the openai client merges them into the top level; a literal nested
    "extra_body" object is merged too)."""
    _constraint_field: Optional[str] = PrivateAttr(default=None)
    model: Optional[str] = None
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # extra sampling fields (vLLM's names)
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    typical_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    mirostat_mode: Optional[int] = None
    mirostat_tau: Optional[float] = None
    mirostat_eta: Optional[float] = None
    min_tokens: Optional[int] = None
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = Field(default=None, max_length=MAX_BAD_WORDS)  # tokenized at admission
    skip_special_tokens: Optional[bool] = None
    include_stop_str_in_output: Optional[bool] = None
    priority: int = 0
    # constrained output: OpenAI's response_format, vLLM's structured_outputs, llama.cpp's grammar / json_schema
    response_format: Optional[dict] = None
    structured_outputs: Optional[dict] = None
    grammar: Optional[str] = None
    json_schema: Optional[dict] = None
    # vLLM's older names (deprecated): aliases of structured_outputs' json / regex / choice / grammar
    guided_json: Optional[Union[dict, str]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    # between the router and an instance (vLLM's names where it has them): token ids in each choice, the
    # disaggregated-prefill parameters, and the output a resumed stream already has (engine/resume.py)
    return_token_ids: Optional[bool] = None
    kv_transfer_params: Optional[dict] = None
    resume_token_ids: Optional[list[int]] = None
    resume_text_chars: Optional[int] = None

    @model_validator(mode="before")
    @classmethod
    def _merge_extra_body(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("extra_body"), dict):
            data = {**data, **data["extra_body"]}
            data.pop("extra_body")
        check_text_fields(data)
        if isinstance(data, dict):
            # unknown fields are ignored, but these change what the client expects back: refuse them loudly
            if data.get("functions") or data.get("function_call"):
                raise ValueError("functions and function_call are not supported: send tools and tool_choice")
        return data

    def _sampling_kwargs(self, defaults: dict | None = None) -> dict:
        """defaults: the model's generation_config sampling values, for the fields this request leaves unset."""
        if self.n > MAX_N:
            raise ValueError(f"n must be <= {MAX_N}, got {self.n}")
        kw = {k: v for k, v in (defaults or {}).items() if k != "max_tokens"}
        kw.update({k: getattr(self, k) for k in PASSTHROUGH if getattr(self, k) is not None})
        constraint = self._structured_outputs()
        if constraint is not None:
            kw["structured_outputs"] = constraint
        extra = {k: getattr(self, k) for k in ("kv_transfer_params", "resume_token_ids", "resume_text_chars")
                 if getattr(self, k) is not None}
        if extra:
            kw["extra_args"] = extra
        return kw

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        asked = []
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type")
            if kind == "json_object":
                asked.append(StructuredOutputsParams(json_object=True))
            elif kind == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict):
                    raise ValueError("response_format.json_schema must be an object with a \"schema\" key, got "
                                     f"a {type(spec).__name__}")
                schema = spec.get("schema")
                if not isinstance(schema, dict):
                    raise ValueError("response_format.json_schema.schema must be a JSON schema object")
                asked.append(StructuredOutputsParams(json=schema))
            elif kind != "text":
                raise ValueError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")
        for name, kwargs in (("structured_outputs", self.structured_outputs),
                             ("grammar", None if self.grammar is None else {"grammar": self.grammar}),
                             ("json_schema", None if self.json_schema is None else {"json": self.json_schema})):
            if kwargs is not None:
                try:
                    asked.append(StructuredOutputsParams(**kwargs))
                except (TypeError, ValueError) as e:  # TypeError: an unknown key
                    raise ValueError(f"{name}: {e}") from None
                self._constraint_field = name
        for kind in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{kind}")
            if value is not None:
                warn_deprecated(f"the request field guided_{kind}", f"structured_outputs.{kind}")
                try:
                    asked.append(StructuredOutputsParams(**{kind: value}))
                except ValueError as e:
                    raise ValueError(f"guided_{kind}: {e}") from None
                self._constraint_field = f"guided_{kind}"
        if len(asked) > 1:
            raise ValueError("give only one of response_format, structured_outputs, grammar, json_schema and "
                             "guided_json / guided_regex / guided_choice / guided_grammar")
        return asked[0] if asked else None

    def constraint_field(self) -> str:
        """The request field that carried the output constraint (engine errors name it structured_outputs)."""
        return self._constraint_field or "response_format"


def _check_logprobs(name: str, v: int | None, limit: int = MAX_LOGPROBS) -> None:
    if v is not None and not 0 <= v <= limit:
        raise ValueError(f"{name} must be between 0 and {limit} (--max-logprobs), got {v}")


def _default_max_tokens(req, fields: tuple, defaults: dict | None):
    """The request's max_tokens, else generation_config's max_new_tokens, else the endpoint's default."""
    for f in fields:
        if getattr(req, f) is not None and f in req.model_fields_set:
            return getattr(req, f)
    if defaults and "max_tokens" in defaults:
        return defaults["max_tokens"]
    return next((getattr(req, f) for f in fields if getattr(req, f) is not None), None)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def prompts(self) -> list:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    @model_validator(mode="before")
    @classmethod
    def _no_tools(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tools"):
            raise ValueError("tools are accepted on /v1/chat/completions, not /v1/completions")
        return data

    def sampling_params(self, defaults: dict | None = None, max_logprobs: int = MAX_LOGPROBS) -> SamplingParams:
        kw = self._sampling_kwargs(defaults)
        kw["max_tokens"] = _default_max_tokens(self, ("max_tokens",), defaults)
        _check_logprobs("logprobs", self.logprobs, max_logprobs)
        if self.logprobs is not None:
            kw["logprobs"] = self.logprobs
        return SamplingParams(**kw)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


# content parts of OpenAI's other modalities: refused with a message that says why
MEDIA_PARTS = ("image_url", "input_image", "image", "input_audio", "audio", "audio_url", "video_url", "file")


class ChatMessage(_Strict):
    # validated: templates paste the role raw between control tokens, so a free-form role could inject them
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant turn that called tools
    tool_call_id: Optional[str] = None           # a tool turn: the call it answers

    def template_dict(self) -> dict:
        """The message as chat templates read it (HF's convention, arguments as a mapping)."""
        d = {"role": self.role, "content": self.text()}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.tool_calls:
            d["tool_calls"] = [c.template_dict() for c in self.tool_calls]
        return d

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in MEDIA_PARTS:
                    raise ValueError(f"this model takes text only; {kind} content parts are not supported")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    tools: Optional[list[Tool]] = None
    tool_choice: Optional[ToolChoice] = None
    parallel_tool_calls: Optional[bool] = None
    resume_tool_stream: Optional[ResumeToolStream] = None  # from the router only, with resume_token_ids

    def sampling_params(self, defaults: dict | None = None, max_logprobs: int = MAX_LOGPROBS) -> SamplingParams:
        kw = self._sampling_kwargs(defaults)
        # max_completion_tokens is OpenAI's newer name; it wins when both are given
        kw["max_tokens"] = _default_max_tokens(self, ("max_completion_tokens", "max_tokens"), defaults)
        _check_logprobs("top_logprobs", self.top_logprobs, max_logprobs)
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.logprobs:
            kw["logprobs"] = self.top_logprobs or 0
        return SamplingParams(**kw)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
