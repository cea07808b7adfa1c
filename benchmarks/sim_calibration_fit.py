"""The calibration's model side (benchmarks/sim_calibration.py runs the engine): the bench's arrival draws, the
closed-loop runs the server overheads are fitted to, the fit itself (frontierlm/sim/calibrate.py) and `replay`,
which refits a saved calibration directory and re-simulates its validation traces."""
from __future__ import annotations

import contextlib
import io
import json
import random
import time
from pathlib import Path

from frontierlm.cli import main as cli_main

LOADS = (("light", 0.3), ("near saturation", 0.9), ("overloaded", 1.5))
# One seed per validation run: the server keeps prefix caching on, and runs that repeated one seed's prompts
# (all three were seed 0 until 2026-12-02) found the earlier run's prompt blocks still cached, so the later
# runs prefilled 16 of 128 tokens per prompt while the simulator prefilled all 128.
VALIDATION_SEEDS = (10, 11, 12)
FIGURES = (("output_tok_s", ("output_throughput",)), ("ttft_p50_ms", ("ttft_ms", "p50")),
           ("ttft_p99_ms", ("ttft_ms", "p99")), ("tpot_p50_ms", ("tpot_ms", "p50")),
           ("tpot_p99_ms", ("tpot_ms", "p99")))
TOKEN_MAX = 500  # bench serve's --token-id-max


def load() -> str:
    return open("/proc/loadavg").read().split()[0]


def sim(argv: list[str]) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(["sim", *argv, "--json"])
    if rc != 0:
        raise RuntimeError(f"sim failed: {argv}")
    return json.loads(buf.getvalue())


def bench_requests(n: int, rate: float, input_len: int, seed: int, token_max: int = TOKEN_MAX
                   ) -> list[tuple[float, list[int]]]:
    """(arrival, prompt) as `frontierlm bench serve` draws them: one Random(seed) for prompts and gaps, in order."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        out.append((t, [rng.randrange(10, token_max) for _ in range(input_len)]))
        if i + 1 < n and rate != float("inf"):
            t += rng.expovariate(rate)
    return out


def bench_arrivals(n: int, rate: float, input_len: int, seed: int, token_max: int = TOKEN_MAX) -> list[float]:
    return [t for t, _ in bench_requests(n, rate, input_len, seed, token_max)]


def bench_trace(path: Path, n: int, rate: float, input_len: int, output_len: int, seed: int,
                token_max: int = TOKEN_MAX) -> None:
    rows = ["arrival_s,prompt_len,output_len"]
    rows += [f"{t:.6f},{input_len},{output_len}" for t in bench_arrivals(n, rate, input_len, seed, token_max)]
    path.write_text("\n".join(rows) + "\n")


def _err(sim_value, real_value):
    return None if not sim_value or not real_value else (sim_value - real_value) / real_value


def compare(real: dict, simulated: dict) -> dict:
    row = {}
    for key, path in FIGURES:
        r, s = real, simulated
        for p in path:
            r, s = r[p], s[p]
        row[key] = {"measured": r, "simulated": s, "error": _err(s, r)}
    return row


def closed_loop_specs(args, stagger_rate: float | None) -> list[tuple]:
    """(name, requests, concurrency, rate, input, output, seed, figures fitted), seeds other than the validation
    runs' (0): one request at a time (the bare per-token path); 8 and max_num_seqs at a time (per-row costs, and
    how they grow with the batch), the requests created at `stagger_rate` (the bare engine's capacity, so the
    prompts join a few at a time, as the profile measured, rather than all in one burst of steps the profile
    never timed); and many short requests (16 prompt tokens, 2 output) eight at a time, where the per-request
    costs are a large share of each request's time."""
    c, L, O = args.max_num_seqs, args.input_len, args.output_len
    rate = stagger_rate or float("inf")
    loop = ("ttft_p50", "tpot_p50", "output_throughput")
    return [("c1", 8, 1, float("inf"), L, O, 1, ("ttft_p50", "tpot_p50")),
            ("c8", 24, 8, rate, L, O, 4, loop),
            (f"c{c}", 3 * c, c, rate, L, O, 2, loop),
            ("short", 48, 8, float("inf"), 16, 2, 3, ("ttft_p50", "request_throughput"))]


def closed_loop_runs(stem: Path, args, bench=None, stagger_rate: float | None = None) -> list:
    """Run the closed-loop benches (bench(path, n, concurrency, rate, input, output, seed)) or, without one, read
    them back; runs not on disk are left out (a directory from before the short-request run still replays)."""
    from frontierlm.sim.calibrate import ClosedLoopRun

    runs = []
    for name, n, conc, rate, inp, outp, seed, figures in closed_loop_specs(args, stagger_rate):
        path = Path(f"{stem}_overhead_{name}.json")
        if bench is not None:
            bench(path, n, conc, rate, inp, outp, seed)
        if not path.is_file():
            continue
        rep = json.loads(path.read_text())
        cfg = rep["config"]
        rate = float(cfg.get("request_rate") or "inf")
        arrivals = None if rate == float("inf") else bench_arrivals(
            int(cfg["num_requests"]), rate, int(cfg["input_len"]), int(cfg["seed"]))
        runs.append(ClosedLoopRun.from_report(name, rep, figures, arrivals))
    return runs


def fit_server_overhead(prof: Path, runs: list, args, out: Path | None = None) -> tuple[Path, dict]:
    """Fit per step / per row / per request CPU / ingress latency by simulating the closed-loop runs;
    writes a copy of the profile with them as its overhead block."""
    from frontierlm.sim.calibrate import fit_overheads

    data = json.loads(prof.read_text())
    data.pop("overhead", None)
    timer, inst = bare_timer(data, args)
    t0 = time.time()
    fit = fit_overheads(timer, runs, inst, fixed={k: 0.0 for k in args.zero_overheads})
    data["overhead"] = fit.params
    if args.step_model:
        data["step_model"] = args.step_model
    served = (out or prof.parent) / f"{prof.stem}_served.json"
    served.write_text(json.dumps(data, indent=1))
    over = {**fit.describe(), "step_model": timer.model.form, "seconds": round(time.time() - t0, 1),
            "load_avg": load()}
    print(json.dumps({"server_overhead_ms": over["params_ms"], "step_model": timer.model.form}), flush=True)
    return served, over


def bare_timer(data: dict, args):
    """The profile's step model without overheads, and the instance the simulator runs (as `frontierlm sim`
    builds it from the same flags)."""
    from frontierlm.sim.instance import InstanceConfig
    from frontierlm.sim.timing import ProfileTimer

    data = {k: v for k, v in data.items() if k != "overhead"}
    inst = InstanceConfig(num_blocks=data["num_blocks"], block_size=16, max_num_seqs=args.max_num_seqs)
    return ProfileTimer(data, step_model=args.step_model), inst


def sim_common(profile: Path, args) -> list[str]:
    """The served profile carries the fitted overheads and the ingress latency."""
    argv = ["--profile", str(profile), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--max-num-seqs", str(args.max_num_seqs)]
    return argv + (["--step-model", args.step_model] if args.step_model else [])


def replay_chained(src: Path, label: str, served: Path, args) -> list[dict]:
    """The three validation runs on one simulated instance, in the order they ran and with the prompts the bench
    sent, the prefix cache on as in the server: where runs repeated a seed, a later run finds an earlier one's
    prompt blocks cached, as the server did. Each run starts after the previous one's measured duration, doubled
    (the bench started the next when the last ended; doubling keeps a slower simulated run from overlapping)."""
    from frontierlm.sim.fleet import FleetConfig, SimResult, simulate
    from frontierlm.sim.instance import InstanceConfig
    from frontierlm.sim.metrics import summarize
    from frontierlm.sim.timing import ProfileTimer
    from frontierlm.sim.workload import SimRequest

    timer = ProfileTimer.load(str(served), step_model=args.step_model)
    inst = InstanceConfig(num_blocks=timer.profile["num_blocks"], block_size=16, max_num_seqs=args.max_num_seqs,
                          enable_prefix_caching=True)
    workload, segments, offset = [], [], 0.0
    for name, _ in LOADS:
        real = json.loads((src / f"{label}_{name.replace(' ', '_')}_bench.json").read_text())
        cfg = real["config"]
        reqs = bench_requests(int(cfg["num_requests"]), float(cfg["request_rate"]), int(cfg["input_len"]),
                              int(cfg["seed"]))
        ids = [f"{name}/{i}" for i in range(len(reqs))]
        workload += [SimRequest(rid, offset + t, len(p), int(cfg["output_len"]), 0, tuple(p))
                     for rid, (t, p) in zip(ids, reqs)]
        segments.append((name, real, set(ids)))
        offset += 2 * real["duration_s"] + 1.0
    res = simulate(workload, timer, FleetConfig(inst, ingress_latency=timer.ingress_latency_s))
    rows = []
    for name, real, ids in segments:
        recs = [r for r in res.records if r.request_id in ids]
        part = SimResult(recs, res.instances, res.roles, max(r.finish for r in recs), min(r.arrival for r in recs))
        rows.append({"load": name, "rate": float(real["config"]["request_rate"]), "seed": real["config"]["seed"],
                     **compare(real, summarize(part))})
    hits = res.instances[0].kv.prefix_hits / max(res.instances[0].kv.prefix_queries, 1)
    print(f"{label}: chained replay with the prefix cache, {hits:.0%} of prompt tokens were cache hits", flush=True)
    return rows


def cmd_replay(args) -> None:
    """Refit from a calibration directory's profiles and closed-loop runs and re-simulate its three traces:
    a new model tried on old measurements (which it may have been diagnosed on: not an independent test)."""
    from sim_calibration_served import served_replay  # (it imports this module)

    src, out = Path(args.dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / "calibration.json").read_text()) if (src / "calibration.json").is_file() else {}
    for k, v in meta.get("workload", {}).items():
        setattr(args, k, v)
    results = {"source": str(src), "step_model": args.step_model, "zero_overheads": args.zero_overheads,
               "models": []}
    for label in args.models.split(","):
        prof = src / f"{label}_profile.json"
        if not prof.is_file():
            continue
        served, over = fit_server_overhead(prof, closed_loop_runs(src / label, args), args, out)
        rows = []
        for name, _ in LOADS:
            stem = f"{label}_{name.replace(' ', '_')}"
            real = json.loads((src / f"{stem}_bench.json").read_text())
            simulated = sim(sim_common(served, args) + ["--workload", "trace", "--trace",
                                                        str(src / f"{stem}_trace.csv")])
            rows.append({"load": name, "rate": float(real["config"]["request_rate"]), **compare(real, simulated)})
        entry = {"model": label, "server_overhead": over, "rates": rows,
                 "rates_chained": replay_chained(src, label, served, args),
                 "served_steps": served_replay(src, label, args, out)}
        for key in ("rates", "rates_chained"):
            for row in entry[key]:
                print(label, key, row["load"], " ".join(f"{k} {v['measured']:.1f}/{v['simulated']:.1f} "
                                                       f"({v['error']:+.0%})" for k, v in row.items()
                                                       if isinstance(v, dict)), flush=True)
        results["models"].append(entry)
    (out / "replay.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    print(f"wrote {out / 'replay.json'}")


def print_table(results: dict) -> None:
    """Simulated vs measured, per model and load: the profile + fitted overheads model and the served-step
    model under each fitting scheme (errors of output tok/s / TTFT p50 / TTFT p99 / TPOT p50 / TPOT p99)."""
    keys = [k for k, _ in FIGURES]
    print("\n| model | load | model (fitted on) | measured " + " / ".join(keys) + " | simulated error |")
    print("|---|---|---|---|---|")
    for entry in results["models"]:
        variants = [("profile + overheads (closed loops)", entry["rates"])]
        for scheme, res in (entry.get("served_steps") or {}).items():
            variants.append((f"served steps ({scheme})", res["rates"]))
        for load_name, _ in LOADS:
            for name, rows in variants:
                row = next((r for r in rows if r["load"] == load_name), None)
                if row is None:
                    continue
                meas = " / ".join(f"{row[k]['measured']:.4g}" for k in keys)
                err = " / ".join("n/a" if row[k]["error"] is None else f"{row[k]['error']:+.1%}" for k in keys)
                print(f"| {entry['model']} | {load_name} | {name} | {meas} | {err} |")
        for scheme, res in (entry.get("served_steps") or {}).items():
            for fit in res["fits"]:
                print(f"{entry['model']} served steps ({scheme}), fitted on {','.join(fit['fitted_on'])}: "
                      f"{fit['steps']} steps, {fit['step_model']}, CV error {fit['cv_rel_err_mean']}, "
                      f"ingress {fit['ingress_ms']:.2f} ms")
