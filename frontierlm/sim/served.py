"""Steps timed on the served path (`frontierlm serve --step-log FILE`, frontierlm/engine/step_log.py) as the
simulator's step model: read the log, cut it into the benchmark runs it spans, and make a "served" profile of
those steps, whose step model may be the tabulated one (frontierlm/sim/step_table.py).

A served step's time is its wall time plus, when the engine went straight on from the step before, the gap
between the two (the engine loop, the output hand-off, HTTP work for arriving requests under the same GIL):
the time from one step's start to the next's, which is what the simulator's instance spends per step. A gap after
an idle engine is waiting, not work, and is left out. What a server adds outside its engine loop (the client's
send, the socket) costs the engine nothing and stays a fitted ingress latency (frontierlm/sim/calibrate.py)."""
from __future__ import annotations

import csv

from frontierlm.engine.step_log import COLUMNS

INT_COLUMNS = ("busy_before", "prefill_tokens", "prefill_chunks", "prefill_pairs", "decode_rows", "decode_ctx",
               "num_tokens")


def read_step_log(path: str) -> list[dict]:
    """The log's steps as dicts of COLUMNS (a cut-off last line, from a server that was killed, is skipped)."""
    try:
        f = open(path, newline="")
    except OSError as e:
        raise ValueError(f"cannot read step log {path!r}: {e.strerror}") from None
    with f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"step log {path!r} has columns {reader.fieldnames}, expected {list(COLUMNS)}")
        steps = []
        for row in reader:
            if None in row or None in row.values() or "" in row.values():
                continue
            steps.append({k: (int(v) if k in INT_COLUMNS else float(v)) for k, v in row.items()})
    return steps


def step_points(steps: list[dict], start: float | None = None, end: float | None = None) -> list[dict]:
    """Profile points (frontierlm/sim/step_model.py's keys) of the steps that began in [start, end] (wall
    clock, time.time()), each timed as wall + the gap before it when the engine was busy."""
    out = []
    for s in steps:
        if (start is not None and s["t"] < start) or (end is not None and s["t"] > end):
            continue
        step_s = s["wall_s"] + (s["gap_s"] if s["busy_before"] else 0.0)
        if step_s <= 0:
            continue
        out.append({"prefill_tokens": s["prefill_tokens"], "prefill_chunks": s["prefill_chunks"],
                    "prefill_pairs": s["prefill_pairs"], "decode_reqs": s["decode_rows"],
                    "decode_ctx": s["decode_ctx"], "step_s": step_s})
    return out


def served_profile(points: list[dict], base: dict | None = None, fitted_on: list[str] | None = None) -> dict:
    """A profile of served steps; `base` (the engine's `frontierlm profile` JSON, or {}) gives the KV blocks
    and bytes per token the simulated instance needs. Overheads other than the ingress latency are zero: the
    served steps already hold them."""
    if not points:
        raise ValueError("no served steps to fit a step model to")
    keep = ("model", "device", "cpu", "torch", "threads", "dtype", "block_size", "num_blocks",
            "max_num_batched_tokens", "max_num_seqs", "max_model_len", "kv_bytes_per_token")
    data = {k: v for k, v in (base or {}).items() if k in keep}
    data.update({"source": "served", "fitted_on": list(fitted_on or []), "points": points})
    return data
