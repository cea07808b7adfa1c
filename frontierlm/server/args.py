"""`frontierlm serve` flags (kept free of heavy imports so `frontierlm --help` stays fast)."""
from __future__ import annotations

import argparse


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="model name clients send (default: MODEL)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="most sequences (prompts x n) waiting for a free slot of --max-num-seqs; beyond it "
                             "429 with Retry-After; a request that could never fit is a 400 (default: no bound)")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help="seconds before a request is aborted (504 / an error event); default: none")
    parser.add_argument("--shutdown-grace", type=float, default=10.0,
                        help="seconds running requests may finish after SIGTERM before they are aborted")
    parser.add_argument("--uvicorn-log-level", default="info")
    add_security_args(parser)


def _list(value: str) -> list[str]:
    from frontierlm.server.security import parse_list  # lazy: keeps `frontierlm --help` free of FastAPI

    try:
        return parse_list(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_security_args(parser: argparse.ArgumentParser) -> None:
    """vLLM's names for keys and CORS; the defaults are closed (no key check only because none is set)."""
    parser.add_argument("--api-key", action="append", default=None,
                        help="require 'Authorization: Bearer KEY' on every route but /health, /ping, /version and "
                             "the /dashboard page (repeat for several keys; default: $FRONTIERLM_API_KEY)")
    parser.add_argument("--allowed-origins", type=_list, default=[],
                        help='origins allowed cross-origin (CORS), a JSON list or comma-separated, e.g. '
                             '\'["https://app.example"]\' or "*" (default: none, no cross-origin access)')
    parser.add_argument("--allowed-methods", type=_list, default=["*"], help="CORS methods (default: all)")
    parser.add_argument("--allowed-headers", type=_list, default=["*"], help="CORS request headers (default: all)")
    parser.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials (cookies)")
    parser.add_argument("--enable-fastapi-docs", action="store_true",
                        help="serve /docs, /redoc and /openapi.json (default: off)")
    parser.add_argument("--disable-fastapi-docs", action="store_false", dest="enable_fastapi_docs",
                        help="vLLM's flag, accepted: the docs are off by default")
    parser.add_argument("--max-request-body-bytes", type=int, default=32 * 2**20,
                        help="larger request bodies get 413 (default: 32 MiB; 0: no limit)")
    parser.add_argument("--parse-special-tokens-in-content", action="store_true",
                        help="chat: read special-token text in messages (e.g. '<|end|>') as control tokens "
                             "instead of plain text (default: off; only for trusted clients)")
