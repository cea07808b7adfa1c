"""`frontierlm serve`: uvicorn around the app, with a graceful shutdown on SIGTERM / Ctrl-C."""
from __future__ import annotations

import threading
import time

import uvicorn

from frontierlm.engine.async_engine import AsyncEngine
from frontierlm.logger import init_logger

logger = init_logger(__name__)


class GracefulServer(uvicorn.Server):
    """First SIGTERM / Ctrl-C: refuse new requests (503), let running ones finish for `grace` seconds, abort
    the rest, then stop uvicorn. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, ctx, grace: float):
        super().__init__(config)
        self.engine, self.ctx, self.grace = engine, ctx, grace
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        # not calling super(): uvicorn would re-raise the signal after serving, and the exit status must be 0
        if self._draining:
            self.engine.abort_all("shutdown")
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        self.ctx.shutting_down = True
        logger.info("shutting down: refusing new requests, %.0fs grace for %d running",
                    self.grace, self.engine.num_unfinished)
        threading.Thread(target=self._drain, name="frontierlm-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.grace
        while (self.engine.num_unfinished or self.engine.queue_depth) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.engine.num_unfinished:
            logger.info("grace period over: aborting %d requests", self.engine.num_unfinished)
            self.engine.abort_all("shutdown")
            time.sleep(0.2)  # let the aborted streams write their last event
        self.should_exit = True


MMAP_THRESHOLD = 128 * 1024  # glibc's starting value, kept fixed


def pin_malloc_mmap_threshold() -> bool:
    """Keep glibc from raising its mmap threshold at run time. By default every freed large block (a step's
    activations) lifts the threshold to its size, up to 32 MiB; from then on such blocks come from the heap,
    whose free holes the allocator rarely hands back, so a long-running server's RSS creeps up with the mix
    of batch shapes (benchmarks/soak.py measured it). A fixed threshold sends them to mmap, which returns
    them on free. Skipped off glibc and when MALLOC_MMAP_THRESHOLD_ is set (the operator's choice wins)."""
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD in malloc.h
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False


def run_server(args) -> int:
    from frontierlm import cli_args
    from frontierlm.engine.llm_engine import LLMEngine
    from frontierlm.server.api import build_app
    from frontierlm.server.args import check_serve_args
    from frontierlm.server.metrics import ServerMetrics
    from frontierlm.server.security import options_from_args

    check_serve_args(args)
    # validates the flags before anything starts; a server compiles its decode graphs before the first request
    config = cli_args.engine_config(args, compile_decode_at_startup=True)
    security = options_from_args(args)
    pin_malloc_mmap_threshold()
    options = serve_options(args)
    name = options.served_model_names[0]
    engine = AsyncEngine(lambda: LLMEngine(config), ServerMetrics(name)).start()
    app = build_app(engine, name, args.max_queue, args.request_timeout, options=options, security=security)
    server = GracefulServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                           timeout_graceful_shutdown=5), engine, app.state.ctx, args.shutdown_grace)

    def watch_load():  # a model that fails to load ends the server instead of answering 503 forever
        try:
            engine.wait_ready()
        except BaseException:
            server.should_exit = True
            return
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:  # after uvicorn's own line: now requests are served
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(f"ready: serving {', '.join(options.served_model_names)} at http://{host}:{args.port}/v1",
                  flush=True)
        watch_workers(engine, server)

    threading.Thread(target=watch_load, daemon=True).start()
    server.run()
    engine.shutdown()
    if engine.load_error is not None:
        raise ValueError(f"the model failed to load: {engine.load_error}")
    if _lost_workers(engine):
        logger.error("exiting: %s", engine.dead)
        return 1
    return 0


DEAD_WORKER_EXIT_S = 3.0  # /health answers 503 this long before a server that lost a worker exits


def _lost_workers(engine: AsyncEngine) -> bool:
    from frontierlm.distributed.executor import WorkerFailure

    return isinstance(engine.dead, WorkerFailure)


def watch_workers(engine: AsyncEngine, server) -> None:
    """A parallel run that lost a worker cannot recover: requests fail, /health says 503, then the server exits."""
    while not server.should_exit:
        if _lost_workers(engine):
            time.sleep(DEAD_WORKER_EXIT_S)
            server.should_exit = True
            return
        time.sleep(0.1)


def serve_options(args):
    """The request-shaping flags, checked before the model loads (a bad one exits with one line)."""
    from frontierlm.server import tools
    from frontierlm.server.options import ServeOptions, generation_defaults, load_chat_template

    typed = getattr(args, "model_as_typed", args.model)
    return ServeOptions(
        served_model_names=args.served_model_name or [typed if typed is not None else "demo"],
        chat_template=load_chat_template(args.chat_template),
        tool_parser=tools.get_parser(args.tool_call_parser).names[0] if args.tool_call_parser else None,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        sampling_defaults=generation_defaults(args.generation_config, args.model),
        max_logprobs=args.max_logprobs, log_requests=not args.disable_log_requests)
