"""The served path's own step log (off unless EngineConfig.step_log names a file; `--step-log` on the command
line): one CSV line per engine step with its shape and wall time, which the simulator's calibration fits its
step model to (frontierlm/sim/served.py). Only the operator sets the path; no request can.

Why the served steps and not only `frontierlm profile`: a server's step also carries its engine loop, the output
thread and the HTTP work that share the core, and on CPU the step is not a straight line in the batch, so a
profile plus fitted overheads missed the served step by tens of percent (docs/benchmarks.md).

Cost: the shape is a loop over the step's rows, the line one buffered write (flushed every FLUSH_EVERY lines,
when the engine goes idle and at close), a few microseconds against steps of milliseconds."""
from __future__ import annotations

import time

COLUMNS = ("t", "wall_s", "gap_s", "busy_before", "prefill_tokens", "prefill_chunks", "prefill_pairs",
           "decode_rows", "decode_ctx", "num_tokens")
FLUSH_EVERY = 64


def step_shape(sched) -> tuple[int, int, int, int, int, int]:
    """(prefill tokens, prefill chunks, prefill attention pairs, decode rows, decode context, tokens) of a
    scheduled step, read before the step advances its requests. A decode row is a request past its prompt
    that computes its last token (plus any drafts); anything else is a prefill chunk."""
    pt = pc = pairs = dr = dctx = 0
    for s in sched.scheduled:
        r, q = s.request, s.num_new_tokens
        start = r.num_computed_tokens
        if r.num_output_tokens > 0 and s.samples and q <= 1 + len(s.spec_token_ids):
            dr += 1
            dctx += start + q
        else:
            pc += 1
            pt += q
            pairs += q * start + q * (q + 1) // 2  # causal keys of queries start .. start+q-1
    return pt, pc, pairs, dr, dctx, sched.num_tokens


class StepLog:
    def __init__(self, path: str):
        self.f = open(path, "w", buffering=1 << 16)
        self.f.write(",".join(COLUMNS) + "\n")
        self.lines = 0
        self.last_end: float | None = None  # perf_counter at the end of the previous step
        self.busy = False  # the previous step left unfinished requests: the gap since was the loop's own work

    def record(self, wall_t: float, t0: float, t1: float, shape: tuple, busy_after: bool) -> None:
        gap = t0 - self.last_end if self.last_end is not None else 0.0
        self.f.write(f"{wall_t:.6f},{t1 - t0:.6f},{gap:.6f},{int(self.busy)},"
                     + ",".join(str(v) for v in shape) + "\n")
        self.last_end, self.busy = t1, busy_after
        self.lines += 1
        if not busy_after or self.lines % FLUSH_EVERY == 0:  # idle: what was logged is on disk
            self.f.flush()

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()


def clock() -> tuple[float, float]:
    return time.time(), time.perf_counter()
