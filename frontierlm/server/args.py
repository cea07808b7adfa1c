"""`frontierlm serve` flags (kept free of heavy imports so `frontierlm --help` stays fast)."""
from __future__ import annotations

import argparse


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="model name clients send (default: MODEL)")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="most requests waiting for a slot; beyond it the server answers 429 (default: no bound)")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help="seconds before a request is aborted (504 / an error event); default: none")
    parser.add_argument("--shutdown-grace", type=float, default=10.0,
                        help="seconds running requests may finish after SIGTERM before they are aborted")
    parser.add_argument("--uvicorn-log-level", default="info")
