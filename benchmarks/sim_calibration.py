"""Calibrate the simulator against this engine, and a DistServe-style study on simulated H100s.

    python benchmarks/sim_calibration.py calibrate --out runs/calib          # tiny + 33.6M models on this CPU
    python benchmarks/sim_calibration.py replay --dir runs/calib --out runs/replay   # refit + re-simulate saved runs
    python benchmarks/sim_calibration.py distserve --out runs/distserve      # Llama-3-8B roofline, 8-64 H100s

calibrate: for each model, `frontierlm profile` measures the engine's step time (pinned to the server's core);
a live `frontierlm serve` (on that core) is loaded by `frontierlm bench serve` (on another core when there is
one): first three closed-loop runs, to which the server's overheads are fitted by simulating them
(benchmarks/sim_calibration_fit.py, frontierlm/sim/calibrate.py), then three open-loop request rates (light,
near saturation, overloaded: fractions of the capacity the fitted simulator predicts), which
`frontierlm sim --profile` replays (the bench's own seeded Poisson draws, rebuilt here) to compare throughput and
p50 / p99 TTFT and TPOT. Nothing is fitted to those three runs. The server also logs its own steps
(`serve --step-log`); `replay` fits the served-step model to them (benchmarks/sim_calibration_served.py: on the
closed-loop runs' steps, and leave-one-run-out) and compares it on the same three runs.

distserve: per-GPU goodput (the highest request rate at which 90% of requests meet both the TTFT and the TPOT SLO,
divided by the GPU count) of colocated replicas vs disaggregated N_p:N_d splits, from the planner's roofline.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))
from sim_calibration_fit import (LOADS, TOKEN_MAX, VALIDATION_SEEDS, bare_timer, bench_trace,  # noqa: E402
                                 closed_loop_runs, cmd_replay, compare, fit_server_overhead, load, sim, sim_common)


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), FRONTIERLM_LOG_LEVEL="WARNING")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _pinned(cpu: int | None):
    return None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))


def _cli(args: list[str], env: dict, cpu: int | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frontierlm.cli", *args], env=env, check=True,
                          preexec_fn=_pinned(cpu), **kw)


def cpus(args) -> tuple[int, int]:
    """(server CPU, client CPU): the server (and its profile) on one core, the bench client on another when this
    process may use two, so the client's work never shares the server's core and the server's threads (engine,
    output, event loop) share one, as the simulator's serial model of an instance assumes."""
    allowed = sorted(os.sched_getaffinity(0))
    server = allowed[0] if args.server_cpu is None else args.server_cpu
    others = [c for c in allowed if c != server]
    client = (others[0] if others else server) if args.client_cpu is None else args.client_cpu
    return server, client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(url: str, proc, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited while loading")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError("the server did not become healthy")


def calibrate_model(model: str, label: str, out: Path, args) -> dict:
    env = _env(args.threads)
    server_cpu, client_cpu = cpus(args)
    engine = ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs)]
    prof = out / f"{label}_profile.json"
    t0 = time.time()
    load_before = load()
    _cli(["profile", model, "--out", str(prof), "--contexts", "64,160,320", "--decode-requests",
          "0,1,2,4,8,16,24,32", "--prefill-tokens", "0,16,64,128,256,512", "--prefill-chunks", "1,4",
          "--repeats", str(args.repeats), *engine], env, server_cpu, stderr=subprocess.DEVNULL)
    profile_meta = {"seconds": round(time.time() - t0, 1), "load_before": load_before, "load_after": load(),
                    "fit": json.loads(prof.read_text())["fit"]}
    timer, _ = bare_timer(json.loads(prof.read_text()), args)
    # the bare engine's capacity (no server overheads): the closed-loop run at max_num_seqs creates its requests
    # at this rate, so its prompts join a few at a time
    cap0 = sim(sim_common(prof, args) + ["--num-requests", str(args.num_requests), "--step-overhead-ms", "0",
                                          "--row-overhead-ms", "0", "--request-overhead-ms", "0",
                                          "--ingress-latency-ms", "0"])["request_throughput"]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # the server logs its own steps (frontierlm/engine/step_log.py); each bench run's wall-clock window says
    # which steps were its (benchmarks/sim_calibration_served.py fits the served-step model to them)
    step_log, windows_path, windows = out / f"{label}_steps.csv", out / f"{label}_windows.json", {}
    server = subprocess.Popen([sys.executable, "-m", "frontierlm.cli", "serve", model, "--port", str(port),
                               "--served-model-name", "m", "--step-log", str(step_log), *engine], env=env,
                              preexec_fn=_pinned(server_cpu), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def windowed(name, argv):
        t0 = time.time()
        _cli(argv, env, client_cpu, stdout=subprocess.DEVNULL)
        windows[name] = [t0, time.time()]
        windows_path.write_text(json.dumps(windows, indent=1))

    def bench(path, n, conc, rate, inp, outp, seed):
        windowed(path.stem.split("_overhead_")[-1],
                 ["bench", "serve", "--base-url", url, "--model", "m", "--num-requests", str(n), "--max-concurrency",
                  str(conc), "--request-rate", str(rate), "--input-len", str(inp), "--output-len", str(outp),
                  "--seed", str(seed), "--json-out", str(path)])

    rows, cap, over = [], None, None
    try:
        _wait_health(url, server)
        # warm-up so the first measured requests do not pay for lazy initialisation (a seed no run uses)
        _cli(["bench", "serve", "--base-url", url, "--model", "m", "--num-requests", "4", "--input-len", "16",
              "--output-len", "4", "--seed", "99"], env, client_cpu, stdout=subprocess.DEVNULL)
        runs = closed_loop_runs(out / label, args, bench, stagger_rate=round(cap0, 3))
        prof_served, over = fit_server_overhead(prof, runs, args)
        common = sim_common(prof_served, args)
        cap = sim(common + ["--num-requests", str(args.num_requests)])["request_throughput"]  # all at t=0
        for (name, frac), seed in zip(LOADS, VALIDATION_SEEDS):
            rate = round(cap * frac, 3)
            real_json = out / f"{label}_{name.replace(' ', '_')}_bench.json"
            before = load()
            windowed(name, ["bench", "serve", "--base-url", url, "--model", "m", "--num-requests",
                            str(args.num_requests), "--request-rate", str(rate), "--input-len", str(args.input_len),
                            "--output-len", str(args.output_len), "--seed", str(seed), "--token-id-max",
                            str(TOKEN_MAX), "--json-out", str(real_json)])
            real = json.loads(real_json.read_text())
            trace = out / f"{label}_{name.replace(' ', '_')}_trace.csv"
            bench_trace(trace, args.num_requests, rate, args.input_len, args.output_len, seed)
            simulated = sim(common + ["--workload", "trace", "--trace", str(trace)])
            row = {"load": name, "rate": rate, "seed": seed, "load_avg_before": before, "load_avg_after": load(),
                   **compare(real, simulated)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return {"model": label, "path": model, "cpus": {"server": server_cpu, "client": client_cpu},
            "bare_capacity_req_s": cap0, "sim_capacity_req_s": cap, "profile": profile_meta,
            "server_overhead": over, "rates": rows}


def cmd_calibrate(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import factories
    from make_random_model import make_random_model

    models = {"tiny": out / "tiny", "llama-33.6M": out / "llama-33.6M"}
    if not (models["tiny"] / "config.json").is_file():
        factories.make_model_dir(models["tiny"], "llama", max_position_embeddings=1024)
    if not (models["llama-33.6M"] / "config.json").is_file():
        make_random_model(models["llama-33.6M"])
    results = {"cpu": _cpu(), "threads": args.threads, "workload": {
        "num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len},
        "models": []}
    for label in args.models.split(","):
        results["models"].append(calibrate_model(str(models[label]), label, out, args))
        (out / "calibration.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {out / 'calibration.json'}")


def _cpu() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# ---- DistServe-style study ---------------------------------------------------------------------------
def _attainment(layout: dict, rate: float, args) -> dict:
    n = max(args.min_requests, int(rate * args.sim_seconds))  # long enough for a queue to build when overloaded
    argv = ["--roofline", "llama-3-8b", "--gpu", "h100", "--num-requests", str(n), "--request-rate", str(rate),
            "--input-len", args.ds_input_len, "--output-len", args.ds_output_len, "--slo-ttft-ms",
            str(args.slo_ttft_ms), "--slo-tpot-ms", str(args.slo_tpot_ms), "--max-num-batched-tokens",
            str(layout.get("budget", args.budget)), "--seed", "0"]
    if layout["disagg"]:
        argv += ["--disagg", layout["disagg"], "--kv-transfer-gbps", str(args.kv_gbps)]
    else:
        argv += ["--replicas", str(layout["gpus"])]
    rep = sim(argv)
    return {"rate": rate, "attainment": rep["slo_attainment"], "ttft_p90": rep["ttft_ms"]["p90"],
            "tpot_p90": rep["tpot_ms"]["p90"]}


def max_goodput(layout: dict, args) -> dict:
    """Highest rate with >= 90% SLO attainment: steps of x1.5 to bracket it, then bisection."""
    tried = []

    def ok(rate):
        r = _attainment(layout, rate, args)
        tried.append(r)
        return r["attainment"] >= 0.9

    rate = args.start_rate_per_gpu * layout["gpus"]
    if ok(rate):
        lo, hi = rate, rate * 1.5
        while ok(hi):
            lo, hi = hi, hi * 1.5
    else:
        lo, hi = rate / 1.5, rate
        while not ok(lo) and lo > 0.01:
            lo, hi = lo / 1.5, lo
    for _ in range(args.bisect):
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return {**layout, "goodput_req_s": lo, "per_gpu_goodput": lo / layout["gpus"], "tried": tried}


def cmd_distserve(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"model": "llama-3-8b (roofline)", "gpu": "h100", "slo": {"ttft_ms": args.slo_ttft_ms,
               "tpot_ms": args.slo_tpot_ms}, "input_len": args.ds_input_len, "output_len": args.ds_output_len,
               "kv_transfer_gbps": args.kv_gbps, "budget": args.budget, "by_gpus": []}
    for g in [int(x) for x in args.gpus.split(",")]:
        t0 = time.time()
        layouts = [{"gpus": g, "disagg": None, "name": "colocated, budget 2048", "budget": 2048},
                   {"gpus": g, "disagg": None, "name": "colocated, budget 512", "budget": 512}]
        fracs = (0.375, 0.5, 0.625, 0.75)
        prev = results["by_gpus"][-1] if results["by_gpus"] else None
        if prev and g > args.full_up_to:  # large fleets: only the best layouts of the previous size, scaled
            layouts = [lay for lay in layouts if lay["name"] == prev["best_colocated"]]
            p_prev, d_prev = (int(x) for x in prev["best_split"].split(":"))
            f = p_prev / (p_prev + d_prev)
            fracs = tuple(x for x in (f - 0.125, f, f + 0.125) if 0 < x < 1)
        for frac in fracs:
            p = max(1, round(g * frac))
            if 0 < p < g:
                layouts.append({"gpus": g, "disagg": f"{p}:{g - p}", "name": f"{p}:{g - p}"})
        rows = [max_goodput(lay, args) for lay in {lay["name"]: lay for lay in layouts}.values()]
        best = max((r for r in rows if r["disagg"]), key=lambda r: r["goodput_req_s"])
        coloc = max((r for r in rows if not r["disagg"]), key=lambda r: r["goodput_req_s"])
        entry = {"gpus": g, "layouts": rows, "best_split": best["name"], "best_colocated": coloc["name"],
                 "colocated_goodput": coloc["goodput_req_s"], "best_disagg_goodput": best["goodput_req_s"],
                 "seconds": round(time.time() - t0, 1), "load_avg": load()}
        results["by_gpus"].append(entry)
        print(f"{g} GPUs: best colocated ({coloc['name']}) {entry['colocated_goodput']:.1f} req/s, best disaggregated {best['name']} "
              f"{best['goodput_req_s']:.1f} req/s ({entry['seconds']}s, load {entry['load_avg']})", flush=True)
        (out / "distserve.json").write_text(json.dumps(results, indent=1))
    _plot_distserve(results, out / "distserve.png")


def _plot_distserve(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    gs = [e["gpus"] for e in results["by_gpus"]]
    ax[0].plot(gs, [e["colocated_goodput"] / e["gpus"] for e in results["by_gpus"]], "o-",
               label="colocated (best budget)")
    ax[0].plot(gs, [e["best_disagg_goodput"] / e["gpus"] for e in results["by_gpus"]], "s-",
               label="disaggregated (best N_p:N_d)")
    for e in results["by_gpus"]:
        ax[0].annotate(e["best_split"], (e["gpus"], e["best_disagg_goodput"] / e["gpus"]))
    ax[0].set(xlabel="H100s", ylabel="goodput per GPU (req/s)", xscale="log", xticks=gs, xticklabels=gs,
              title=f"Llama-3-8B, SLO TTFT {results['slo']['ttft_ms']} ms / TPOT {results['slo']['tpot_ms']} ms")
    ax[0].minorticks_off()
    ax[0].set_ylim(bottom=0)
    ax[0].legend()
    last = results["by_gpus"][-1]
    names = [r["name"] for r in last["layouts"]]
    ax[1].bar(names, [r["goodput_req_s"] for r in last["layouts"]])
    ax[1].set(ylabel="goodput (req/s)", title=f"{last['gpus']} H100s by layout")
    ax[1].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--out", default="runs/calibration")
    c.add_argument("--max-model-len", type=int, default=512)
    c.add_argument("--repeats", type=int, default=5)
    c.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the profile and the server")
    c.add_argument("--server-cpu", type=int, default=None,
                   help="core for the profile and the server (default: the first this process may use)")
    c.add_argument("--client-cpu", type=int, default=None,
                   help="core for the bench client (default: another one this process may use, else the same)")
    r = sub.add_parser("replay", help="refit and re-simulate a calibration directory's saved runs")
    r.add_argument("--dir", required=True, help="a calibrate --out directory")
    r.add_argument("--out", default="runs/replay")
    for sp in (c, r):  # the workload and engine settings both subcommands describe
        sp.add_argument("--models", default="tiny,llama-33.6M")
        sp.add_argument("--num-requests", type=int, default=60)
        sp.add_argument("--input-len", type=int, default=128)
        sp.add_argument("--output-len", type=int, default=64)
        sp.add_argument("--max-num-seqs", type=int, default=32)
        sp.add_argument("--step-model", default=None, help="pin the step-time form (default: chosen by CV)")
        sp.add_argument("--zero-overheads", default=[], type=lambda s: [x for x in s.split(",") if x],
                        help="overheads held at 0 instead of fitted (step_s,row_s,row2_s,request_s,ingress_s)")
    d = sub.add_parser("distserve")
    d.add_argument("--out", default="runs/distserve")
    d.add_argument("--gpus", default="8,16,32,64")
    d.add_argument("--ds-input-len", default="256:2048")
    d.add_argument("--ds-output-len", default="32:256")
    d.add_argument("--slo-ttft-ms", type=float, default=250.0)
    d.add_argument("--slo-tpot-ms", type=float, default=15.0)
    d.add_argument("--kv-gbps", type=float, default=50.0, help="KV link per prefill instance (400 Gb/s InfiniBand)")
    d.add_argument("--budget", type=int, default=2048, help="chunked-prefill token budget")
    d.add_argument("--sim-seconds", type=float, default=3.0, help="simulated arrival span of each run")
    d.add_argument("--min-requests", type=int, default=150)
    d.add_argument("--start-rate-per-gpu", type=float, default=8.0)
    d.add_argument("--bisect", type=int, default=2)
    d.add_argument("--full-up-to", type=int, default=8, help="try every layout up to this many GPUs")
    a = p.parse_args()
    {"calibrate": cmd_calibrate, "distserve": cmd_distserve, "replay": cmd_replay}[a.cmd](a)


if __name__ == "__main__":
    main()
