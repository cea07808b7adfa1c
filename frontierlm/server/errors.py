"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import re
from typing import Callable, TypeVar

from fastapi.responses import JSONResponse

from frontierlm.server.protocol import PASSTHROUGH

T = TypeVar("T")
# names a ValueError message may start with that are request fields (SamplingParams names the field first)
_FIELDS = set(PASSTHROUGH) | {"max_tokens", "logprobs", "prompt", "messages", "priority", "model", "top_logprobs",
                              "min_tokens", "n", "response_format", "structured_outputs", "grammar", "json_schema",
                              "tools", "tool_choice", "guided_json", "guided_regex", "guided_choice", "guided_grammar"}


class APIError(Exception):
    """`reason` is the request_failure_total label this error counts under (None: not counted)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, reason: str | None = "invalid_request", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.reason, self.headers = reason, headers

    def body(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status, headers=self.headers)

    @classmethod
    def from_value_error(cls, e: ValueError) -> "APIError":
        msg = str(e)
        m = re.match(r"([a-z_]+)", msg)
        param = m.group(1) if m and m.group(1) in _FIELDS else None
        code = "context_length_exceeded" if "max_model_len" in msg or "KV cache" in msg else None
        return cls(400, msg, param=param, code=code)

    @classmethod
    def wrap(cls, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ValueError as e:
            raise cls.from_value_error(e) from None
