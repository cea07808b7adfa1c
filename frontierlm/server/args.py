"""`frontierlm serve` flags (kept free of heavy imports so `frontierlm --help` stays fast), with vLLM's names."""
from __future__ import annotations

import argparse

# vLLM flags whose features FrontierLM does not have yet: (flag, dest, the value that means "off")
NOT_YET = [("--tensor-parallel-size", "tensor_parallel_size", 1, "tensor parallelism (one device per server)")]
TOOL_PARSERS = ("hermes", "qwen3", "qwen2_5", "llama3_json", "llama", "mistral", "deepseek_v3")  # tools.PARSERS


def _add_once(parser: argparse.ArgumentParser, *flags: str, **kwargs) -> None:
    """Add a flag unless the engine flags (shared with generate / chat) already define it."""
    if not any(f in parser._option_string_actions for f in flags):
        parser.add_argument(*flags, **kwargs)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                        help="the model directory, as an alternative to the positional MODEL (vLLM's spelling)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="names clients may send as `model`; the first is the one responses carry "
                             "(default: MODEL as typed, or 'demo' for the packaged model)")
    parser.add_argument("--chat-template", default=None,
                        help="a Jinja chat template file, or the template itself inline (default: the tokenizer's)")
    parser.add_argument("--generation-config", default="auto",
                        help="'auto': the model's generation_config.json sampling defaults (temperature, top_p, "
                             "top_k, min_p, repetition_penalty, max_new_tokens) apply where a request leaves them "
                             "unset; 'vllm': ignore it; or a directory holding a generation_config.json")
    parser.add_argument("--max-logprobs", type=int, default=20, help="most logprobs / top_logprobs a request may ask")
    parser.add_argument("--tool-call-parser", choices=TOOL_PARSERS, default=None,
                        help="the model's tool-call format (default: read off the chat template, else hermes)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='allow tool_choice "auto" (the model chooses text or calls; a call is constrained '
                             "to its schema once it begins)")
    parser.add_argument("--disable-log-requests", action="store_true", help="do not log each request at INFO")
    parser.add_argument("--max-queue", type=int, default=None,
                        help="most sequences (prompts x n) waiting for a free slot of --max-num-seqs; beyond it "
                             "429 with Retry-After; a request that could never fit is a 400 (default: no bound)")
    parser.add_argument("--request-timeout", type=float, default=None,
                        help="seconds before a request is aborted (504 / an error event); default: none")
    parser.add_argument("--shutdown-grace", type=float, default=10.0,
                        help="seconds running requests may finish after SIGTERM before they are aborted")
    parser.add_argument("--uvicorn-log-level", default="info")
    _add_once(parser, "--trust-remote-code", action="store_true",
              help="accepted for vLLM compatibility; FrontierLM never runs code from a model directory (it "
                   "implements each architecture itself), so this changes nothing")
    for flag, dest, off, what in NOT_YET:
        _add_once(parser, flag, dest=dest, default=off, type=int if isinstance(off, int) else str,
                  help=f"{what}: not supported yet; only {off!r} is accepted")
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


def resolve_model(args: argparse.Namespace) -> None:
    """--model or the positional MODEL (not two different ones); remember the name as typed for the model id."""
    option = getattr(args, "model_option", None)
    if option is not None:
        if args.model is not None and args.model != option:
            raise ValueError(f"the model is given twice: {args.model} and --model {option}")
        args.model = option
    args.model_as_typed = args.model


def check_serve_args(args: argparse.Namespace) -> None:
    """Refuse, in one line, the vLLM flags whose features are not here yet (never 'unrecognized arguments')."""
    for flag, dest, off, what in NOT_YET:
        value = getattr(args, dest, off)
        if value is not None and value != off:
            raise ValueError(f"{flag} {value}: {what} is not supported yet in FrontierLM")
    if args.max_logprobs is not None and args.max_logprobs < 0:
        raise ValueError(f"--max-logprobs must be >= 0, got {args.max_logprobs}")
