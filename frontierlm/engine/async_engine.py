"""The engine loop in a background thread, with asyncio streams for the server.

The engine is not thread-safe, so only its own thread ever touches it: callers send commands (add, abort, a
read-only snapshot) through a queue that the thread drains between steps, and outputs come back to each
request's asyncio.Queue through loop.call_soon_threadsafe. HTTP handling therefore never waits for a step,
and a step never waits for HTTP.

Text is made off the engine thread too: the engine's steps return token deltas, and an output thread turns
them into RequestOutputs (engine/output_processor.py: incremental detokenization, stop strings, which it
reports back as a command that finishes the request) and delivers them with the request's metrics.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from frontierlm.engine.output_processor import OutputProcessor, output_copy
from frontierlm.engine.request import RequestStatus
from frontierlm.logger import init_logger
from frontierlm.outputs import RequestOutput
from frontierlm.sampling_params import SamplingParams

logger = init_logger(__name__)


class RequestAborted(Exception):
    """The server aborted the request (shutdown, timeout); `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(f"request aborted: {reason}")
        self.reason = reason


class EngineDeadError(RuntimeError):
    pass


class StatsSink:
    """What the engine reports; metrics.ServerMetrics implements it. Methods are called from the engine thread
    and the output thread (prometheus-client is thread-safe)."""

    def on_step(self, stats: dict) -> None: ...
    def on_scheduled(self, queue_time: float) -> None: ...
    def on_first_token(self, ttft: float, num_prompt_tokens: int) -> None: ...
    def on_new_tokens(self, count: int) -> None: ...
    def on_inter_token(self, itl: float) -> None: ...
    def on_time_per_output_token(self, tpot: float) -> None: ...
    def on_finished(self, reasons: list[str], e2e: float) -> None: ...
    def on_failure(self, reason: str) -> None: ...


class _SafeStats:
    """Forwards to the sink but logs its exceptions: a metrics bug must never stop the engine loop."""

    def __init__(self, owner: "AsyncEngine"):
        self._owner = owner

    def __getattr__(self, name):
        method = getattr(self._owner.stats, name)

        def call(*args):
            try:
                method(*args)
            except Exception:
                logger.exception("stats sink %s failed", name)
        return call


@dataclass(eq=False)
class _Track:
    """Per-request bookkeeping, owned by the engine thread after creation."""
    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    children: list = field(default_factory=list)
    num_prompt_tokens: int = 0
    scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_gen_tokens: int = 0
    finished: bool = False

    def push(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone; nobody is listening
            pass


class AsyncEngine:
    """Owns an LLMEngine in a background thread. `engine_factory` is called on that thread, so the server can
    answer /health (503) while the model loads."""

    def __init__(self, engine_factory: Callable[[], Any], stats: StatsSink | None = None):
        self._factory = engine_factory
        self.stats = stats or StatsSink()  # may be replaced at any time; always called through _SafeStats
        self._stats = _SafeStats(self)
        self.engine = None
        self.load_error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._tracks: dict[str, _Track] = {}
        self._unscheduled: dict[str, _Track] = {}
        self._ready = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pending_adds = 0  # adds sent but not yet run (counted into the queue depth)
        self.num_running = 0  # children, snapshot after the last step/command (read from other threads)
        self.num_waiting = 0
        self.dead: BaseException | None = None
        self._processor: OutputProcessor | None = None  # set once the engine is built (see _start_output)
        self._outputs: queue.SimpleQueue = queue.SimpleQueue()  # engine thread -> output thread, in order
        self._output_thread: threading.Thread | None = None

    @classmethod
    def from_engine(cls, engine, stats: StatsSink | None = None) -> "AsyncEngine":
        return cls(lambda: engine, stats)

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="frontierlm-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self.engine is not None and self.dead is None

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        if self.load_error is not None:
            raise self.load_error
        return self.is_ready

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort everything in flight and stop the thread."""
        if self._thread is None:
            return
        if self.is_ready:
            self.abort_all("shutdown")
        self._stopping = True
        self._commands.put(None)  # wake the thread
        self._thread.join(timeout)
        self._thread = None
        if self._output_thread is not None:
            self._outputs.put(None)
            self._output_thread.join(timeout)
            self._output_thread = None
            self.engine.detokenize_in_step = True  # the engine may be stepped directly again (LLMEngine.step)
        summary = self.engine.spec_decode_summary() if self.is_ready else None
        if summary:
            logger.info(summary)

    # ---- commands (any thread) -----------------------------------------------------------------------
    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        if self.dead is not None:
            raise EngineDeadError(f"the engine loop died: {self.dead!r}")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, fut))
        return fut

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps (for consistent snapshots)."""
        return await asyncio.wrap_future(self._submit(lambda: fn(self.engine)))

    async def add_request(self, request_id: str, prompt, params: SamplingParams, priority: int = 0) -> _Track:
        """Queue a request; raises ValueError (from the engine's checks) if it can never run."""
        loop = asyncio.get_running_loop()
        track = _Track(request_id, loop, asyncio.Queue(), time.monotonic())
        self._pending_adds += 1
        try:
            return await asyncio.wrap_future(self._submit(lambda: self._do_add(track, prompt, params, priority)))
        finally:
            self._pending_adds -= 1

    def abort(self, request_id: str, reason: str | None = "client_disconnect") -> None:
        """Non-blocking: the engine thread frees the request's blocks before its next step. `reason` is the
        request_failure_total label (None: not counted)."""
        if self.dead is None:
            self._commands.put((lambda: self._do_abort(request_id, reason), None))

    def abort_all(self, reason: str) -> None:
        if self.dead is None:
            self._commands.put((lambda: [self._do_abort(rid, reason) for rid in list(self._tracks)], None))

    @property
    def num_unfinished(self) -> int:
        """User requests added and not yet finished or aborted (exact: no snapshot lag)."""
        return len(self._tracks)

    @property
    def queue_depth(self) -> int:
        """Requests accepted but not yet running (waiting children + adds in transit)."""
        return self.num_waiting + self._pending_adds

    async def stream(self, track: _Track) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (cumulative; several queued ones are merged into the latest) until it
        finishes. If the consumer stops early (disconnect, cancel), the request is aborted."""
        done = False
        try:
            while True:
                item = await track.queue.get()
                while not track.queue.empty() and not isinstance(item, BaseException):
                    item = track.queue.get_nowait()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finished
                yield item
                if done:
                    return
        finally:
            if not done:
                self.abort(track.request_id, "client_disconnect")

    # ---- engine thread ---------------------------------------------------------------------------------
    def _do_add(self, track: _Track, prompt, params: SamplingParams, priority: int) -> _Track:
        eng = self.engine
        eng.add_request(track.request_id, prompt, params, priority=priority, arrival_time=track.arrival)
        track.children = eng.get_requests(track.request_id)
        track.num_prompt_tokens = track.children[0].num_prompt_tokens
        self._tracks[track.request_id] = track
        self._unscheduled[track.request_id] = track
        if self._processor is not None:
            self._outputs.put((self._processor.add, output_copy(eng.groups[track.request_id])))
        self._refresh_counts()  # before the caller hears back, so the queue depth it reads includes this one
        return track

    def _do_abort(self, request_id: str, reason: str | None) -> None:
        track = self._tracks.pop(request_id, None)
        if track is None:
            return
        self._unscheduled.pop(request_id, None)
        self.engine.abort_request(request_id)
        if self._processor is not None:
            self._outputs.put((self._processor.abort, request_id))
        self._refresh_counts()
        if reason is not None:
            self._stats.on_failure(reason)
        track.push(RequestAborted(reason or "aborted"))

    def _run_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=0.05) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if cmd is not None:  # None only wakes the thread
                fn, fut = cmd
                # A caller that gave up (cancelled await) has cancelled its future: the command still runs
                # (an abort must happen), but its result goes nowhere instead of raising InvalidStateError.
                wanted = fut is not None and fut.set_running_or_notify_cancel()
                try:
                    result = fn()
                    if wanted:
                        fut.set_result(result)
                except BaseException as e:  # a bad add must reach its caller, not kill the loop
                    if wanted:
                        fut.set_exception(e)
                    else:
                        logger.exception("engine command failed")
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _refresh_counts(self) -> None:
        sched = self.engine.scheduler
        self.num_running, self.num_waiting = len(sched.running), len(sched.waiting)

    def _run(self) -> None:
        try:
            self.engine = self._factory()
        except BaseException as e:
            if isinstance(e, (ValueError, OSError)):  # a clear message is enough (bad path, unsupported model)
                logger.error("engine failed to load: %s", e)
            else:
                logger.exception("engine failed to load")
            self.load_error = e
            self._ready.set()
            return
        self._start_output()
        self._ready.set()
        try:
            while not self._stopping:
                self._loop_once()
        except BaseException as e:  # fail every request (and queued command) rather than hang them
            logger.exception("engine loop failed; failing all requests")
            self.dead = e
            for track in self._tracks.values():
                track.push(EngineDeadError(f"engine step failed: {e!r}"))
            self._tracks.clear()
            while True:
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd is not None and cmd[1] is not None:
                    cmd[1].set_exception(EngineDeadError(f"the engine loop died: {e!r}"))

    def _loop_once(self) -> None:
        self._run_commands(block=not self.engine.has_unfinished_requests())
        self.engine.check_health()  # a parallel run whose worker died ends the loop even while idle
        if not self._stopping and self.engine.has_unfinished_requests():
            t0 = time.monotonic()
            outputs = self.engine.step()
            self._mark_scheduled(t0)
            if self._processor is not None:
                self._outputs.put((self._process, (outputs, time.monotonic())))
            else:
                self._deliver(outputs, time.monotonic())
        elif hasattr(self.engine, "poll_idle"):
            self.engine.poll_idle()
        self._refresh_counts()
        self._stats.on_step(self.engine.get_stats())

    # ---- output thread -------------------------------------------------------------------------------------
    def _start_output(self) -> None:
        """Detokenize on an output thread, unless the engine cannot hand that off (a stand-in engine, or a KV
        connector, whose transfer parameters are made with each finished output on the engine thread)."""
        eng = self.engine
        if getattr(eng, "detokenize_in_step", None) is None or getattr(eng, "kv_connector", None) is not None:
            return
        eng.detokenize_in_step = False
        self._processor = OutputProcessor(eng._decode_one, self._finish_late)
        self._output_thread = threading.Thread(target=self._output_loop, name="frontierlm-output", daemon=True)
        self._output_thread.start()

    def _finish_late(self, request_id: str, stop: str) -> None:
        """(output thread) A stop string ended a sample: the engine finishes it before its next step."""
        self._commands.put((lambda: self.engine.finish_late(request_id, stop), None))

    def _output_loop(self) -> None:
        while True:
            item = self._outputs.get()
            if item is None:
                return
            fn, arg = item
            try:
                fn(arg)
            except Exception:  # a failure here must not stop later outputs; the engine thread is unaffected
                logger.exception("output processing failed")

    def _process(self, arg) -> None:
        deltas, now = arg
        outputs = []
        for delta in deltas:
            try:
                out = self._processor.process(delta)
            except Exception as e:  # fail this request alone
                logger.exception("output processing failed for %s", delta.request_id)
                rid = delta.request_id
                self._processor.abort(rid)
                track = self._tracks.pop(rid, None)
                if track is not None:
                    track.push(e)
                self._commands.put((lambda: self.engine.abort_request(rid), None))
                continue
            if out is not None:
                outputs.append(out)
        self._deliver(outputs, now)

    def _mark_scheduled(self, step_start: float) -> None:
        for rid, track in list(self._unscheduled.items()):
            if track.children[0].status != RequestStatus.WAITING:
                track.scheduled_time = step_start
                self._stats.on_scheduled(step_start - track.arrival)
                del self._unscheduled[rid]

    def _deliver(self, outputs: list[RequestOutput], now: float) -> None:
        """Push outputs to their streams, with the token metrics (output thread, or engine thread without one)."""
        for out in outputs:
            track = self._tracks.get(out.request_id)
            if track is None:
                continue
            num_gen = sum(len(c.token_ids) for c in out.outputs)
            new = num_gen - track.num_gen_tokens
            if new > 0:
                if track.first_token_time is None:
                    track.first_token_time = now
                    self._stats.on_first_token(now - track.arrival, track.num_prompt_tokens)
                else:  # one gap per step, however many samples (n) advanced in it
                    self._stats.on_inter_token(now - track.last_token_time)
                track.last_token_time = now
                track.num_gen_tokens = num_gen
                self._stats.on_new_tokens(new)
            track.push(out)
            if out.finished:
                self._tracks.pop(out.request_id, None)
                if track.first_token_time is not None and track.num_gen_tokens > 1:
                    self._stats.on_time_per_output_token((now - track.first_token_time) / (track.num_gen_tokens - 1))
                self._stats.on_finished([c.finish_reason or "abort" for c in out.outputs], now - track.arrival)
