"""Build a simulation from command-line arguments (or keyword arguments), run it or a sweep, write the outputs."""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from frontierlm.sim.fleet import FleetConfig, simulate
from frontierlm.sim.instance import InstanceConfig, SpecConfig
from frontierlm.sim.metrics import plot, plot_sweep, print_report, summarize
from frontierlm.sim.timing import ProfileTimer, RooflineTimer
from frontierlm.sim.workload import load_trace, synthetic

SWEEPS = {"rate": "request_rate", "pd": "disagg", "k": "spec_k", "budget": "max_num_batched_tokens",
          "replicas": "replicas", "batch": "batch_size"}


def parse_pd(text: str) -> tuple[int, int]:
    try:
        p, d = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise ValueError(f"a prefill:decode split must look like 2:6, got {text!r}") from None
    if p <= 0 or d <= 0:
        raise ValueError(f"a prefill:decode split needs both counts positive, got {text!r}")
    return p, d


def build_timer(args) -> tuple[object, int, float]:
    """(timer, default KV blocks per instance, KV bytes per token)."""
    if (args.profile is None) == (args.roofline is None):
        raise ValueError("give exactly one of --profile PROFILE.json or --roofline MODEL")
    if args.profile is not None:
        ms = lambda v: None if v is None else v / 1e3  # noqa: E731
        timer = ProfileTimer.load(args.profile, ms(args.step_overhead_ms), ms(args.row_overhead_ms),
                                  ms(args.request_overhead_ms), args.step_model)
        blocks = timer.profile.get("num_blocks")
        if args.num_blocks is None and blocks is None:
            raise ValueError(f"profile {args.profile!r} has no num_blocks; pass --num-blocks")
        return timer, blocks, float(timer.kv_bytes_per_token or 0.0)
    from frontierlm.plan import get_gpu, load_model_shape, serve_report

    shape, gpu = load_model_shape(args.roofline), get_gpu(args.gpu)
    timer = RooflineTimer(shape, gpu, args.tp, args.weight_dtype, args.kv_dtype, args.mfu, args.mbu,
                          (args.step_overhead_ms or 0.0) / 1e3)
    rep = serve_report(shape, gpu, args.block_size, args.weight_dtype, args.kv_dtype, args.memory_utilization,
                       args.tp, args.block_size)
    if not rep.get("fits"):
        raise ValueError(f"{shape.name} does not fit on {args.tp} x {gpu.name}: {rep.get('reason')}")
    return timer, rep["kv_capacity_tokens"] // args.block_size, float(shape.kv_bytes_per_token(args.kv_dtype))


def ingress_latency(args, timer) -> float:
    """--ingress-latency-ms, else the profile's fitted ingress (0 for the roofline)."""
    if args.ingress_latency_ms is not None:
        return args.ingress_latency_ms / 1e3
    return getattr(timer, "ingress_latency_s", 0.0)


def build_workload(args) -> list:
    if args.workload == "trace":
        if not args.trace:
            raise ValueError("--workload trace needs --trace FILE")
        return load_trace(args.trace)
    return synthetic(args.num_requests, args.request_rate, args.input_len, args.output_len, args.workload,
                     args.cv if args.workload == "gamma" else 1.0, args.seed, args.priority_fraction)


def run_once(args) -> tuple[dict, object]:
    timer, blocks, kv_bpt = build_timer(args)
    inst = InstanceConfig(num_blocks=args.num_blocks or blocks, block_size=args.block_size,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          policy=args.policy, static_batch_size=args.batch_size,
                          enable_prefix_caching=args.enable_prefix_caching,
                          spec=SpecConfig(args.spec_k, args.spec_acceptance))
    disagg = parse_pd(args.disagg) if args.disagg else None
    fleet = FleetConfig(inst, replicas=args.replicas, disagg=disagg, router=args.router, kv_bytes_per_token=kv_bpt,
                        kv_transfer_bw=args.kv_transfer_gbps * 1e9,
                        kv_transfer_latency=args.kv_transfer_latency_ms / 1e3,
                        ingress_latency=ingress_latency(args, timer), max_concurrency=args.max_concurrency)
    res = simulate(build_workload(args), timer, fleet, seed=args.seed)
    res.meta = {"timer": timer.describe(), "fleet": {"replicas": args.replicas, "disagg": args.disagg,
                "router": args.router, "policy": args.policy, "kv_blocks": inst.num_blocks,
                "max_num_batched_tokens": args.max_num_batched_tokens, "spec_k": args.spec_k,
                "spec_acceptance": args.spec_acceptance}}
    return summarize(res, args.slo_ttft_ms, args.slo_tpot_ms), res


def run_sweep(args, spec: str) -> tuple[str, list, list[dict]]:
    name, _, values = spec.partition("=")
    if name not in SWEEPS or not values:
        raise ValueError(f"--sweep must be PARAM=V1,V2 with PARAM one of {', '.join(SWEEPS)}, got {spec!r}")
    vals = [v for v in values.split(",") if v]
    reports = []
    for v in vals:
        a = copy.copy(args)
        try:
            setattr(a, SWEEPS[name], v if name == "pd" else (float(v) if name == "rate" else int(v)))
        except ValueError:
            raise ValueError(f"--sweep {name}: {v!r} is not a number") from None
        reports.append(run_once(a)[0])
    return name, vals, reports


def run_from_args(args: argparse.Namespace) -> int:
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        name, vals, reports = run_sweep(args, args.sweep)
        for r in reports:
            r.pop("timeline", None)
        doc = {"sweep": name, "values": vals, "reports": reports}
        if out_dir:
            (out_dir / "sweep.json").write_text(json.dumps(doc, indent=1))
            plot_sweep(name, vals, reports, str(out_dir / "sweep.png"))
        if args.json:
            print(json.dumps(doc, indent=1))
        else:
            print(f"{name:>10}{'req/s':>10}{'goodput':>10}{'attain':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
                  f"{'TPOT p50':>10}{'TPOT p99':>10}{'util':>7}")
            for v, r in zip(vals, reports):
                print(f"{v:>10}{r['request_throughput']:>10.3f}{r['goodput']:>10.3f}{r['slo_attainment']:>8.1%}"
                      f"{r['ttft_ms']['p50']:>10.1f}{r['ttft_ms']['p99']:>10.1f}"
                      f"{(r['tpot_ms']['p50'] or 0):>10.2f}{(r['tpot_ms']['p99'] or 0):>10.2f}"
                      f"{r['utilization_mean']:>7.1%}")
        return 0
    rep, res = run_once(args)
    if out_dir:
        (out_dir / "report.json").write_text(json.dumps(rep, indent=1))
        plot(rep, res, str(out_dir / "report.png"))
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print_report(rep, sys.stdout)
    return 0
