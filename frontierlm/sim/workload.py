"""Workloads: arrival times with prompt and output lengths. Poisson, gamma (bursty: coefficient of variation
above 1), or a trace file (CSV with a header, or JSON lines) of arrival_s, prompt_len, output_len[, priority]; a
JSON-lines trace may give a row's prompt_ids (its tokens, for the prefix cache)."""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SimRequest:
    request_id: str
    arrival: float
    prompt_len: int
    output_len: int
    priority: int = 0
    prompt_ids: tuple[int, ...] | None = None  # the prompt's tokens, where prefix caching should see them


def parse_length(spec) -> tuple[int, int]:
    """'128' -> (128, 128); '64:256' -> uniform in [64, 256]."""
    text = str(spec)
    try:
        lo, _, hi = text.partition(":")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"a length must be N or MIN:MAX, got {text!r}") from None
    if not 0 < lo <= hi:
        raise ValueError(f"a length must satisfy 0 < MIN <= MAX, got {text!r}")
    return lo, hi


def synthetic(num_requests: int, rate: float, input_len="128", output_len="128", arrival: str = "poisson",
              cv: float = 1.0, seed: int = 0, priority_fraction: float = 0.0) -> list[SimRequest]:
    """`rate` requests/s (inf: all at t=0). Gamma gaps with shape 1/cv^2 keep the mean rate; cv=1 is Poisson.
    A `priority_fraction` of the requests get priority 0 (served first), the others 1."""
    if num_requests <= 0:
        raise ValueError(f"num_requests must be positive, got {num_requests}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 (or inf), got {rate}")
    if arrival not in ("poisson", "gamma"):
        raise ValueError(f"arrival must be poisson or gamma, got {arrival!r}")
    if not cv > 0:
        raise ValueError(f"cv must be > 0, got {cv}")
    if not 0 <= priority_fraction <= 1:
        raise ValueError(f"priority_fraction must be in [0, 1], got {priority_fraction}")
    rng = random.Random(seed)
    (pin, pmax), (oin, omax) = parse_length(input_len), parse_length(output_len)
    shape = 1.0 / (cv * cv) if arrival == "gamma" else 1.0
    out, t = [], 0.0
    for i in range(num_requests):
        if i and rate != float("inf"):
            t += rng.gammavariate(shape, 1.0 / (rate * shape))
        prio = 0 if rng.random() < priority_fraction else (1 if priority_fraction else 0)
        out.append(SimRequest(f"r{i}", t, rng.randint(pin, pmax), rng.randint(oin, omax), prio))
    return out


def load_trace(path: str) -> list[SimRequest]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"trace file {path!r} does not exist")
    text = p.read_text()
    if p.suffix in (".jsonl", ".json"):
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise ValueError(f"trace {path!r} is not JSON lines: {e}") from None
    else:
        rows = list(csv.DictReader(text.splitlines()))
    out = []
    for i, row in enumerate(rows):
        try:
            ids = row.get("prompt_ids")
            r = SimRequest(f"r{i}", float(row["arrival_s"]), int(row["prompt_len"]), int(row["output_len"]),
                           int(row.get("priority") or 0), None if ids is None else tuple(int(t) for t in ids))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"trace {path!r} row {i + 1} needs arrival_s, prompt_len, output_len "
                             f"(optional priority, prompt_ids): {e!r}") from None
        if r.prompt_len <= 0 or r.output_len <= 0 or r.arrival < 0:
            raise ValueError(f"trace {path!r} row {i + 1}: lengths must be positive and arrival_s >= 0")
        if r.prompt_ids is not None and len(r.prompt_ids) != r.prompt_len:
            raise ValueError(f"trace {path!r} row {i + 1}: {len(r.prompt_ids)} prompt_ids for prompt_len "
                             f"{r.prompt_len}")
        out.append(r)
    if not out:
        raise ValueError(f"trace {path!r} holds no requests")
    return sorted(out, key=lambda r: r.arrival)
