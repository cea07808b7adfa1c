"""`frontierlm sim` (a fleet driven by a profile or the roofline) and `frontierlm profile MODEL`."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from frontierlm.sim.step_model import FORMS, TABLE


def add_parsers(sub) -> None:
    sim = sub.add_parser("sim", help="discrete-event serving simulator (the engine's scheduler, simulated time)")
    t = sim.add_argument_group("step time (one of)")
    t.add_argument("--profile", default=None, help="profile JSON from `frontierlm profile`")
    t.add_argument("--roofline", default=None, metavar="MODEL", help="HF config directory or preset: roofline timing")
    t.add_argument("--gpu", default="h100", help="roofline GPU preset")
    t.add_argument("--tp", type=int, default=1, help="roofline: tensor-parallel GPUs per instance")
    t.add_argument("--mfu", type=float, default=0.6, help="roofline: share of peak FLOP/s reached")
    t.add_argument("--mbu", type=float, default=0.8, help="roofline: share of peak bandwidth reached")
    t.add_argument("--step-overhead-ms", type=float, default=None,
                   help="fixed time added to each step (default: 0, or the profile's overhead block)")
    t.add_argument("--row-overhead-ms", type=float, default=None, help="time added per request in a step")
    t.add_argument("--request-overhead-ms", type=float, default=None,
                   help="server CPU per request that delays the next engine step (default: the profile's, or 0)")
    t.add_argument("--ingress-latency-ms", type=float, default=None,
                   help="client send -> engine queue, costing the engine nothing (default: the profile's, or 0)")
    t.add_argument("--step-model", default=None, choices=[*FORMS, TABLE],
                   help="profile: the step-time form (default: the best by cross-validated error on the profile; "
                        "table only for a profile of served steps)")
    t.add_argument("--weight-dtype", default="bf16")
    t.add_argument("--kv-dtype", default="bf16")
    w = sim.add_argument_group("workload")
    w.add_argument("--workload", choices=["poisson", "gamma", "trace"], default="poisson")
    w.add_argument("--trace", default=None, help="CSV / JSONL of arrival_s, prompt_len, output_len[, priority]")
    w.add_argument("--num-requests", type=int, default=200)
    w.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (default inf: all at once)")
    w.add_argument("--cv", type=float, default=2.0, help="gamma: coefficient of variation of the gaps")
    w.add_argument("--input-len", default="128", help="N or MIN:MAX (uniform)")
    w.add_argument("--output-len", default="128", help="N or MIN:MAX (uniform)")
    w.add_argument("--priority-fraction", type=float, default=0.0, help="share of requests with priority 0 (rest 1)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--max-concurrency", type=int, default=None,
                   help="closed loop: at most this many requests in flight (as bench serve --max-concurrency)")
    e = sim.add_argument_group("engine and fleet")
    e.add_argument("--policy", choices=["continuous", "static"], default="continuous")
    e.add_argument("--batch-size", type=int, default=8, help="static batching: requests per batch")
    e.add_argument("--max-num-seqs", type=int, default=256)
    e.add_argument("--max-num-batched-tokens", type=int, default=2048, help="chunked-prefill token budget")
    e.add_argument("--block-size", type=int, default=16)
    e.add_argument("--num-blocks", type=int, default=None, help="KV blocks per instance (default: profile / planner)")
    e.add_argument("--memory-utilization", type=float, default=0.9, help="roofline: GPU memory share for the engine")
    e.add_argument("--enable-prefix-caching", action="store_true")
    e.add_argument("--replicas", type=int, default=1, help="colocated data-parallel replicas")
    e.add_argument("--router", default="least_loaded", help="least_loaded, round_robin, least_kv, random")
    e.add_argument("--disagg", default=None, metavar="NP:ND", help="prefill:decode instances (disaggregated)")
    e.add_argument("--kv-transfer-gbps", type=float, default=50.0, help="disaggregated: KV link GB/s per prefill instance")
    e.add_argument("--kv-transfer-latency-ms", type=float, default=0.5)
    e.add_argument("--spec-k", type=int, default=0, help="speculative decoding: draft tokens per step")
    e.add_argument("--spec-acceptance", type=float, default=0.7, help="speculative decoding: per-token acceptance")
    o = sim.add_argument_group("output")
    o.add_argument("--slo-ttft-ms", type=float, default=None)
    o.add_argument("--slo-tpot-ms", type=float, default=None)
    o.add_argument("--sweep", default=None, metavar="PARAM=V1,V2,...",
                   help="rate=1,2,4 | pd=1:3,2:2 | k=0,2,4 | budget=512,2048 | replicas=1,2")
    o.add_argument("--out-dir", default=None, help="write report.json and PNG plots here")
    o.add_argument("--json", action="store_true")

    prof = sub.add_parser("profile", help="measure this engine's step time over a grid; writes a profile JSON")
    prof.add_argument("model", help="HF-format model directory")
    prof.add_argument("--out", required=True, help="profile JSON to write")
    prof.add_argument("--prefill-tokens", default="0,16,64,256,1024")
    prof.add_argument("--decode-requests", default="0,1,4,16,32")
    prof.add_argument("--contexts", default="64,256,1024")
    prof.add_argument("--prefill-chunks", default="1",
                      help="prompts the prefill tokens of a step are split into, e.g. 1,4 (a burst of arrivals)")
    prof.add_argument("--repeats", type=int, default=3)
    from frontierlm import cli_args

    cli_args.add_engine_args(prof)


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 0:
        raise ValueError(f"--{name} must list non-negative integers, got {text!r}")
    return vals


def cmd_profile(args) -> int:
    from frontierlm import cli_args
    from frontierlm.sim.profile import profile_engine

    grid = (_ints(args.prefill_tokens, "prefill-tokens"), _ints(args.decode_requests, "decode-requests"),
            _ints(args.contexts, "contexts"))
    if args.repeats <= 0:
        raise ValueError(f"--repeats must be positive, got {args.repeats}")
    data = profile_engine(cli_args.engine_config(args), *grid, repeats=args.repeats, progress=True,
                          prefill_chunks=_ints(args.prefill_chunks, "prefill-chunks"))
    Path(args.out).write_text(json.dumps(data, indent=1))
    fit = data["fit"]
    print(f"wrote {len(data['points'])} points to {args.out}; step model {fit['step_model']}: fit error p50 "
          f"{fit['fit_rel_err_p50']:.1%}, max {fit['fit_rel_err_max']:.1%}", file=sys.stderr)
    return 0


def cmd_sim(args) -> int:
    from frontierlm.sim.run import run_from_args

    return run_from_args(args)


COMMANDS = {"sim": cmd_sim, "profile": cmd_profile}
