"""Fit what a live server adds around the engine step, by simulating closed-loop `bench serve` runs.

The profile times the engine's step alone. A server also spends time per step (its engine loop), per request in
a step (each token goes through the output thread and out as an SSE chunk) and per request in a step squared
(contention that grows with the batch), per request (HTTP parsing, admission, the stream's set-up and
tear-down: CPU under the same GIL as the engine thread, so it delays the engine) and in latency that costs the
engine nothing (the client's send, the socket). Those five numbers
(ProfileTimer's overhead block) are fitted here to closed-loop runs (a fixed number of requests in flight, other
seeds than any validation run) by running the simulator itself on each run's workload and adjusting the numbers
until its TTFT / TPOT / throughput match the measured ones (Levenberg-Marquardt on log ratios, numbers >= 0).
Simulating the runs, rather than solving closed forms, keeps the fit true to what the scheduler does with the
prompts that join as others finish, and to the burst of prompts a closed loop sends at its start.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np

from frontierlm.sim.fleet import FleetConfig, simulate
from frontierlm.sim.instance import InstanceConfig
from frontierlm.sim.metrics import summarize
from frontierlm.sim.timing import BatchShape, ProfileTimer
from frontierlm.sim.workload import SimRequest

PARAMS = ("step_s", "row_s", "row2_s", "request_s", "ingress_s")
# each overhead's unit in the search, as a share of the one-row engine step (row costs are small per row)
UNITS = {"step_s": 1.0, "row_s": 1 / 8, "row2_s": 1 / 256, "request_s": 1.0, "ingress_s": 1.0}
METRICS = {  # name -> how to read it from a `bench serve` / `frontierlm sim` report (seconds or per second)
    "ttft_p50": lambda r: r["ttft_ms"]["p50"] / 1e3,
    "tpot_p50": lambda r: r["tpot_ms"]["p50"] / 1e3,
    "output_throughput": lambda r: r["output_throughput"],
    "request_throughput": lambda r: r["request_throughput"],
}


@dataclass
class ClosedLoopRun:
    """One closed-loop `bench serve` run: its workload and the measured figures the fit should reproduce."""
    name: str
    num_requests: int
    concurrency: int
    input_len: int
    output_len: int
    measured: dict[str, float]  # METRICS name -> value
    fit_metrics: tuple[str, ...] = ("ttft_p50", "tpot_p50")
    arrivals: list[float] | None = None  # when the client creates each request (None: all at 0)

    def __post_init__(self):
        bad = [m for m in self.fit_metrics if m not in METRICS or not self.measured.get(m)]
        if bad:
            raise ValueError(f"run {self.name!r}: no measured value for {bad} (known: {', '.join(METRICS)})")
        if self.arrivals is not None and len(self.arrivals) != self.num_requests:
            raise ValueError(f"run {self.name!r}: {len(self.arrivals)} arrival times for {self.num_requests} requests")

    @classmethod
    def from_report(cls, name: str, report: dict, fit_metrics: tuple[str, ...],
                    arrivals: list[float] | None = None) -> "ClosedLoopRun":
        cfg = report["config"]
        return cls(name, int(cfg["num_requests"]), int(cfg["max_concurrency"]), int(cfg["input_len"]),
                   int(cfg["output_len"]), {m: METRICS[m](report) for m in METRICS if report.get("completed")},
                   fit_metrics, arrivals)


@dataclass
class OverheadFit:
    params: dict[str, float]
    rows: list[dict] = field(default_factory=list)  # per run and metric: measured, simulated, error
    iterations: int = 0

    def describe(self) -> dict:
        return {"params_ms": {k: v * 1e3 for k, v in self.params.items()}, "iterations": self.iterations,
                "runs": self.rows}


def simulate_run(timer: ProfileTimer, run: ClosedLoopRun, instance: InstanceConfig, ingress_s: float) -> dict:
    arrivals = run.arrivals or [0.0] * run.num_requests
    wl = [SimRequest(f"r{i}", t, run.input_len, run.output_len) for i, t in enumerate(arrivals)]
    res = simulate(wl, timer, FleetConfig(instance, ingress_latency=ingress_s, max_concurrency=run.concurrency))
    return summarize(res)


def _with(timer: ProfileTimer, p: dict) -> ProfileTimer:
    t = copy.copy(timer)
    t.step_overhead_s, t.row_overhead_s, t.row2_overhead_s = p["step_s"], p["row_s"], p["row2_s"]
    t.request_overhead_s = p["request_s"]
    t.ingress_latency_s = p["ingress_s"]
    return t


def fit_overheads(timer: ProfileTimer, runs: list[ClosedLoopRun], instance: InstanceConfig,
                  fixed: dict[str, float] | None = None, iterations: int = 12) -> OverheadFit:
    """The overheads (seconds, >= 0) that make the simulated closed-loop runs match the measured ones; those in
    `fixed` are held at the value given."""
    if not runs:
        raise ValueError("fitting the server overheads needs at least one closed-loop run")
    fixed = dict(fixed or {})
    unknown = sorted(set(fixed) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown overheads {unknown}; they are {', '.join(PARAMS)}")
    free = [k for k in PARAMS if k not in fixed]
    one_row = max(timer.engine_time(BatchShape(decode_reqs=1, decode_ctx=1, rows=1)), 1e-4)
    scale = np.array([one_row * UNITS[k] for k in free])

    def params(u: np.ndarray) -> dict[str, float]:
        return {**fixed, **dict(zip(free, (u * scale).tolist()))}

    def residuals(u: np.ndarray) -> tuple[np.ndarray, list[dict]]:
        p = params(u)
        t = _with(timer, p)
        res, rows = [], []
        for run in runs:
            rep = simulate_run(t, run, instance, p["ingress_s"])
            for m in run.fit_metrics:
                sim, meas = METRICS[m](rep), run.measured[m]
                res.append(math.log(max(sim, 1e-12) / meas))
                rows.append({"run": run.name, "metric": m, "measured": meas, "simulated": sim,
                             "error": sim / meas - 1})
        return np.array(res), rows

    u = np.zeros(len(free))
    r, rows = residuals(u)
    cost, lam, it = float(r @ r), 1e-2, 0
    for it in range(1, iterations + 1 if free else 1):
        h = np.maximum(0.05 * u, 0.02)
        jac = np.empty((len(r), len(u)))
        for i in range(len(u)):
            step = u.copy()
            step[i] += h[i]
            jac[:, i] = (residuals(step)[0] - r) / h[i]
        jtj, g = jac.T @ jac, jac.T @ r
        improved = False
        while lam < 1e6:
            delta = np.linalg.solve(jtj + lam * (np.diag(np.diag(jtj)) + 1e-9 * np.eye(len(u))), -g)
            cand = np.maximum(u + delta, 0.0)
            r2, rows2 = residuals(cand)
            if float(r2 @ r2) < cost:
                u, r, rows, cost, lam, improved = cand, r2, rows2, float(r2 @ r2), max(lam / 3, 1e-4), True
                break
            lam *= 4
        if not free or not improved or float(np.abs(delta).max()) < 1e-3:
            break
    return OverheadFit(params(u), rows, it)
