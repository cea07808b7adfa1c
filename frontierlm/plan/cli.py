"""`frontierlm plan kv|flops|serve|train|parallel`: a text table by default, --json for the numbers.

`add_parsers(sub)` also registers `frontierlm sim` and `frontierlm profile` (frontierlm/sim/cli.py), so the top-level
command needs one hook for the planning tools.
"""
from __future__ import annotations

import argparse
import json
import sys

from frontierlm.plan import hardware
from frontierlm.plan.model import DTYPE_BYTES, load_model_shape, preset_names


def _count(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 7e9, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


def _gpu_args(p: argparse.ArgumentParser, default: str | None = "h100") -> None:
    g = p.add_argument_group("GPU (a preset, or explicit numbers that replace the preset's)")
    g.add_argument("--gpu", default=default, help=f"preset: {', '.join(hardware.GPUS)} (default: {default})")
    g.add_argument("--memory-gb", type=float, default=None, help="GPU memory in GB as vendors quote it (GiB)")
    g.add_argument("--bandwidth-gbps", type=float, default=None, help="memory bandwidth, GB/s")
    g.add_argument("--tflops", type=float, default=None, help="dense bf16 TFLOP/s")
    g.add_argument("--fp8-tflops", type=float, default=None, help="dense fp8 TFLOP/s")
    g.add_argument("--interconnect-gbps", type=float, default=None, help="GPU-to-GPU GB/s, one direction")


def gpu_from_args(args) -> hardware.GPU:
    name = args.gpu
    if name == "none":
        name = None
    return hardware.get_gpu(name, args.memory_gb, args.bandwidth_gbps, args.tflops, args.fp8_tflops,
                            args.interconnect_gbps)


def add_parsers(sub) -> None:
    plan = sub.add_parser("plan", help="capacity planner: KV cache, FLOPs, serving, training memory, parallelism")
    psub = plan.add_subparsers(dest="plan_command", required=True)
    model_help = f"HF config directory or preset ({', '.join(preset_names())})"

    def common(p, model_optional=False):
        p.add_argument("model", nargs="?" if model_optional else None, default=None, help=model_help)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    kv = psub.add_parser("kv", help="KV-cache bytes per token and at a context length")
    common(kv)
    kv.add_argument("--context", type=int, default=4096)
    kv.add_argument("--batch", type=int, default=1)
    kv.add_argument("--kv-dtype", default="bf16", help="bf16, fp16, fp32 or fp8")
    kv.add_argument("--kv-heads", type=int, default=None, help="replace num_key_value_heads (compare MHA / GQA / MQA)")

    fl = psub.add_parser("flops", help="FLOPs per token and per sequence")
    common(fl)
    fl.add_argument("--seq-len", type=int, default=4096)
    fl.add_argument("--compare-to", type=int, default=None, help="report attention cost relative to this length")

    sv = psub.add_parser("serve", help="weights, KV capacity, max concurrency and roofline bounds on a GPU")
    common(sv)
    sv.add_argument("--context", type=int, default=4096)
    sv.add_argument("--weight-dtype", default="bf16", help=", ".join(DTYPE_BYTES))
    sv.add_argument("--kv-dtype", default="bf16")
    sv.add_argument("--memory-utilization", type=float, default=0.9)
    sv.add_argument("--tp", type=int, default=1, help="tensor-parallel GPUs per replica")
    _gpu_args(sv)

    tr = psub.add_parser("train", help="training memory per GPU for ZeRO stages 0-3 / FSDP")
    common(tr, model_optional=True)
    tr.add_argument("--params", type=_count, default=None, help="parameter count (e.g. 70e9) instead of the config's")
    tr.add_argument("--gpus", type=int, default=8)
    tr.add_argument("--precision", default="bf16", help="bf16 (12 B/param), mixed (16), fp32 (16) or fp8 (13)")
    tr.add_argument("--zero", action="append", default=None, help="ZeRO stage 0-3 or fsdp (repeatable; default all)")
    tr.add_argument("--seq-len", type=int, default=4096)
    tr.add_argument("--micro-batch", type=int, default=1)
    _gpu_args(tr)

    pa = psub.add_parser("parallel", help="parallelism advisor (DP / ZeRO / EP / TP / PP) with reasons")
    common(pa)
    pa.add_argument("--gpus", type=int, required=True)
    pa.add_argument("--mode", choices=["train", "serve"], default="train")
    pa.add_argument("--seq-len", type=int, default=4096, help="training sequence length / serving context")
    pa.add_argument("--micro-batch", type=int, default=1)
    pa.add_argument("--precision", default="mixed")
    pa.add_argument("--gpus-per-node", type=int, default=8)
    pa.add_argument("--min-batch", type=int, default=1, help="serve: sequences one replica must hold")
    pa.add_argument("--params", type=_count, default=None, help="parameter count instead of the config's")
    _gpu_args(pa)

    from frontierlm.sim import cli as sim_cli

    sim_cli.add_parsers(sub)


# ---- commands ---------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, dict) and "GB" in v:
        return f"{v['GB']:,.2f} GB ({v['GiB']:,.2f} GiB)"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.4e}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if v is None:
        return "-"
    return str(v)


def print_table(rep: dict, out=None) -> None:
    out = out or sys.stdout
    rows = {k: v for k, v in rep.items() if not (isinstance(v, list) and v and isinstance(v[0], dict))}
    width = max(len(k) for k in rows) + 2
    for k, v in rows.items():
        if isinstance(v, list):
            out.write(f"{k:<{width}}\n")
            for item in v:
                out.write(f"{'':<{width}}- {item}\n")
        else:
            out.write(f"{k:<{width}}{_fmt(v)}\n")
    for k, v in rep.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            cols = list(v[0])
            out.write(f"\n{k}\n" + "  ".join(f"{c:>14}" for c in cols) + "\n")
            for row in v:
                out.write("  ".join(f"{_fmt(row.get(c)):>14}" for c in cols) + "\n")


def _emit(rep: dict, args) -> int:
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print_table(rep)
    return 0


def _positive(**values) -> None:
    for name, v in values.items():
        if v is not None and v <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {v}")


def cmd_plan(args) -> int:
    from frontierlm.plan import inference, parallel, train

    c = args.plan_command
    if c == "train" and args.model is None and args.params is None:
        raise ValueError("plan train needs a model (config directory or preset) or --params")
    if c != "train" and args.model is None:
        raise ValueError(f"plan {c} needs a model (config directory or preset: {', '.join(preset_names())})")
    shape = load_model_shape(args.model, getattr(args, "kv_heads", None)) if args.model else None
    if c == "kv":
        return _emit(inference.kv_report(shape, args.context, args.kv_dtype, args.batch), args)
    if c == "flops":
        _positive(compare_to=args.compare_to)
        return _emit(inference.flops_report(shape, args.seq_len, args.compare_to), args)
    if c == "serve":
        return _emit(inference.serve_report(shape, gpu_from_args(args), args.context, args.weight_dtype,
                                            args.kv_dtype, args.memory_utilization, args.tp), args)
    if c == "train":
        _positive(gpus=args.gpus, seq_len=args.seq_len, micro_batch=args.micro_batch)
        gpu = gpu_from_args(args)
        params = args.params or shape.num_params()
        rep = train.train_report(params, args.gpus, args.precision, args.zero or (0, 1, 2, 3), shape, args.seq_len,
                                 args.micro_batch, gpu.memory_bytes)
        rep = {"model": shape.name if shape else "(parameter count only; no activations)", "gpu": gpu.name, **rep}
        return _emit(rep, args)
    gpu = gpu_from_args(args)
    _positive(gpus=args.gpus, seq_len=args.seq_len, micro_batch=args.micro_batch, min_batch=args.min_batch)
    if args.mode == "train":
        rep = parallel.advise_training(shape, gpu, args.gpus, args.seq_len, args.micro_batch, args.precision,
                                       args.gpus_per_node, params=args.params)
    else:
        rep = parallel.advise_serving(shape, gpu, args.gpus, args.seq_len, min_batch=args.min_batch,
                                      gpus_per_node=args.gpus_per_node)
    return _emit(rep, args)


def _sim_command(name: str):
    def run(args) -> int:
        from frontierlm.sim import cli as sim_cli

        return sim_cli.COMMANDS[name](args)
    return run


COMMANDS = {"plan": cmd_plan, "sim": _sim_command("sim"), "profile": _sim_command("profile")}
