"""The calibration's served-step model: the server's own step log (`frontierlm serve --step-log`), cut into the
benchmark runs by their wall-clock windows, fitted (frontierlm/sim/served.py) and used to re-simulate the three
open-loop validation runs. Never scored on the runs it was fitted to:

- closed-loop: fitted on the closed-loop runs' steps only (c1, c8, c32, short), which ran before and apart from
  the validation runs; the same model predicts all three;
- leave-one-out: for each validation run, fitted on the closed-loop runs and the other two validation runs.

In both, the one number besides the steps, the ingress latency (client send to engine queue, and the stream's
way back), is fitted to the closed-loop runs' TTFT p50 alone (frontierlm/sim/calibrate.py, every other overhead
held at 0)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sim_calibration_fit import LOADS, closed_loop_runs, compare, sim, sim_common

from frontierlm.sim.calibrate import PARAMS, fit_overheads
from frontierlm.sim.instance import InstanceConfig
from frontierlm.sim.served import read_step_log, served_profile, step_points
from frontierlm.sim.timing import ProfileTimer

SCHEMES = ("closed-loop", "leave-one-out")


def run_key(name: str) -> str:
    return name.replace(" ", "_")


def fit_served(steps: list[dict], windows: dict, names: list[str], base: dict, closed: list, args,
               path: Path) -> tuple[Path, dict]:
    """A served profile of the named runs' steps, with its ingress fitted to the closed-loop runs; written to
    `path`. Returns (path, what was fitted)."""
    points = [p for n in names for p in step_points(steps, *windows[n])]
    prof = served_profile(points, base, names)
    if args.step_model:
        prof["step_model"] = args.step_model
    timer = ProfileTimer(prof)
    inst = InstanceConfig(num_blocks=prof["num_blocks"], block_size=16, max_num_seqs=args.max_num_seqs)
    # the ingress is what the step log cannot see: the latency before a request reaches the engine and after
    # its token leaves the step, so it is fitted to the closed-loop runs' TTFT alone
    ttft_only = [dataclasses.replace(r, fit_metrics=("ttft_p50",)) for r in closed]
    fit = fit_overheads(timer, ttft_only, inst, fixed={k: 0.0 for k in PARAMS if k != "ingress_s"})
    prof["overhead"] = {"ingress_s": fit.params["ingress_s"]}
    path.write_text(json.dumps(prof, indent=1))
    desc = timer.model.describe()
    return path, {"fitted_on": names, "steps": len(points), "ingress_ms": fit.params["ingress_s"] * 1e3,
                  "step_model": desc["step_model"], "coef": desc["coef"], "cv_rel_err_mean": desc["cv_rel_err_mean"],
                  "fit_rel_err_p50": desc["fit_rel_err_p50"]}


def served_replay(src: Path, label: str, args, out: Path) -> dict | None:
    """Both schemes' simulated-vs-measured rows for one model, or None when the directory has no step log (a
    calibration from before the step log existed)."""
    log, win = src / f"{label}_steps.csv", src / f"{label}_windows.json"
    if not (log.is_file() and win.is_file()):
        print(f"{label}: no step log in {src}; the served-step model is skipped", flush=True)
        return None
    steps, windows = read_step_log(str(log)), json.loads(win.read_text())
    prof = src / f"{label}_profile.json"
    base = json.loads(prof.read_text()) if prof.is_file() else {}
    if "num_blocks" not in base:
        raise ValueError(f"{label}: the served profile needs num_blocks from {prof}")
    closed = [r for r in closed_loop_runs(src / label, args) if r.name in windows]
    val = [name for name, _ in LOADS if name in windows]
    if not closed or not val:
        raise ValueError(f"{label}: {win} lacks the closed-loop or validation runs' windows")
    result = {}
    for scheme in SCHEMES:
        fits, rows = {}, []
        for name in val:
            names = [r.name for r in closed] + ([v for v in val if v != name] if scheme == "leave-one-out" else [])
            key = ",".join(names)
            if key not in fits:
                held_out = f"_{run_key(name)}" if scheme == "leave-one-out" else ""
                fits[key] = fit_served(steps, windows, names, base, closed, args,
                                       out / f"{label}_served_{scheme}{held_out}.json")
            path, desc = fits[key]
            stem = f"{label}_{run_key(name)}"
            real = json.loads((src / f"{stem}_bench.json").read_text())
            simulated = sim(sim_common(path, args) + ["--workload", "trace", "--trace", str(src / f"{stem}_trace.csv")])
            rows.append({"load": name, "rate": float(real["config"]["request_rate"]), "fitted_on": desc["fitted_on"],
                         **compare(real, simulated)})
        result[scheme] = {"fits": [d for _, d in fits.values()], "rates": rows}
    return result
