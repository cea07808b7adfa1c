"""API keys, CORS and the other options that decide who may reach the server and what it reveals.

The key rule (`--api-key` or FRONTIERLM_API_KEY): every route needs `Authorization: Bearer KEY` except
/health, /ping, /version and the /dashboard page itself (static HTML that holds no data; it asks for the key
and sends it with its /dashboard/state polls). /metrics, /dashboard/state, /v1/* and any route added later are
closed by default. CORS preflights (OPTIONS) carry no credentials by the Fetch standard, so they pass.
"""
from __future__ import annotations

import hmac
import json
import os
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from frontierlm.server.errors import APIError

API_KEY_ENV = "FRONTIERLM_API_KEY"
OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/dashboard"})
DEFAULT_MAX_REQUEST_BODY_BYTES = 32 * 2**20


@dataclass
class SecurityOptions:
    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()  # empty: no cross-origin access (no CORS headers at all)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    enable_docs: bool = False  # /docs, /redoc and /openapi.json
    max_request_body_bytes: int | None = DEFAULT_MAX_REQUEST_BODY_BYTES
    parse_special_tokens_in_content: bool = False  # chat: special-token text in messages read as control tokens

    def __post_init__(self):
        if any(not k for k in self.api_keys):
            raise ValueError("--api-key must not be empty")
        if self.max_request_body_bytes is not None and self.max_request_body_bytes < 1:
            raise ValueError(f"--max-request-body-bytes must be >= 1, got {self.max_request_body_bytes}")


def parse_list(value: str) -> list[str]:
    """vLLM's form (a JSON list: '["https://a.example"]') or a comma-separated list."""
    value = value.strip()
    if value.startswith("["):
        try:
            items = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a JSON list: {value!r} ({e})") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError(f"expected a JSON list of strings, got {value!r}")
        return items
    return [x.strip() for x in value.split(",") if x.strip()]


def options_from_args(args) -> SecurityOptions:
    keys = list(getattr(args, "api_key", None) or [])
    if not keys and os.environ.get(API_KEY_ENV):
        keys = [os.environ[API_KEY_ENV]]
    return SecurityOptions(
        api_keys=tuple(keys), allowed_origins=tuple(args.allowed_origins), allowed_methods=tuple(args.allowed_methods),
        allowed_headers=tuple(args.allowed_headers), allow_credentials=args.allow_credentials,
        enable_docs=args.enable_fastapi_docs, max_request_body_bytes=args.max_request_body_bytes or None,
        parse_special_tokens_in_content=args.parse_special_tokens_in_content)


class ApiKeyMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware, which would get between streaming responses and disconnect
    detection). Keys are compared in constant time (hmac.compare_digest), each against the whole header."""

    def __init__(self, app, api_keys: tuple[str, ...], on_reject=None):
        self.app = app
        self.expected = [f"Bearer {k}".encode() for k in api_keys]
        self.on_reject = on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        got = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        # compare against every key, so the time taken does not tell which one (if any) nearly matched
        ok = False
        for want in self.expected:
            ok |= got is not None and hmac.compare_digest(got, want)
        if ok:
            return await self.app(scope, receive, send)
        if self.on_reject is not None:
            self.on_reject("unauthorized")
        if got is None:
            err = APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                           code="missing_api_key", reason=None)
        else:
            err = APIError(401, "Incorrect API key provided.", code="invalid_api_key", reason=None)
        response = err.response()
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def add_api_key_check(app: FastAPI, opts: SecurityOptions, on_reject=None) -> None:
    if opts.api_keys:
        app.add_middleware(ApiKeyMiddleware, api_keys=opts.api_keys, on_reject=on_reject)


def add_cors(app: FastAPI, opts: SecurityOptions) -> None:
    """Add it last, as the outer layer: it answers preflights before the key check and puts its headers on
    401s and 500s too, so browsers let the page read them. No allowed origin: no CORS headers at all."""
    if opts.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(opts.allowed_origins),
                           allow_methods=list(opts.allowed_methods), allow_headers=list(opts.allowed_headers),
                           allow_credentials=opts.allow_credentials)


def docs_kwargs(opts: SecurityOptions) -> dict:
    """FastAPI(...) arguments: the interactive docs and the schema only when asked for."""
    if opts.enable_docs:
        return {}
    return {"docs_url": None, "redoc_url": None, "openapi_url": None}
