"""What a simulation reports: the same figures as `frontierlm bench serve` (so the two can be compared line by
line), SLO attainment and goodput, utilisation and KV use over time, and PNG plots."""
from __future__ import annotations

from frontierlm.bench.serve import _stats
from frontierlm.sim.fleet import SimResult


def _ms(values: list[float]) -> dict:
    return {k: (None if x is None else round(x * 1e3, 3)) for k, x in _stats(values).items()}


def summarize(res: SimResult, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None,
              bins: int = 50) -> dict:
    done = [r for r in res.records if r.finish is not None]
    duration = max(res.end_time - res.start_time, 1e-12)
    good = [r for r in done if (slo_ttft_ms is None or r.ttft * 1e3 <= slo_ttft_ms)
            and (slo_tpot_ms is None or (r.tpot or 0.0) * 1e3 <= slo_tpot_ms)]
    out_tokens = sum(r.tokens for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    insts = []
    for inst, role in zip(res.instances, res.roles):
        row = {"name": inst.name, "role": role, "steps": inst.steps, "busy_s": inst.busy_time,
               "utilization": inst.busy_time / duration, "preemptions": inst.scheduler.num_preemptions,
               "kv_blocks": inst.config.num_blocks,
               "kv_peak_usage": max((u for _, u, _ in inst.kv_trace), default=0.0)}
        if inst.config.policy == "static" and inst.slot_steps:
            row["static_waste"] = 1 - inst.useful_slot_steps / inst.slot_steps
        insts.append(row)
    width = duration / bins
    edges = [res.start_time + width * i for i in range(bins + 1)]
    busy = [0.0] * bins
    kv_sum, kv_n = [0.0] * bins, [0] * bins
    for inst in res.instances:  # one pass over each instance's steps, spread over the bins they overlap
        for s, e in inst.busy_trace:
            first, last = int((s - res.start_time) / width), int((e - res.start_time) / width)
            for k in range(max(0, first), min(bins - 1, last) + 1):
                busy[k] += max(0.0, min(e, edges[k + 1]) - max(s, edges[k]))
        for t, u, _ in inst.kv_trace:
            k = min(bins - 1, max(0, int((t - res.start_time) / width)))
            kv_sum[k] += u
            kv_n[k] += 1
    util = [b / (width * len(res.instances)) for b in busy]
    kv = [kv_sum[k] / kv_n[k] if kv_n[k] else None for k in range(bins)]
    rep = {
        "num_requests": len(res.records), "completed": len(done),
        "rejected": sum(1 for r in res.records if r.rejected), "duration_s": round(duration, 6),
        "request_throughput": len(done) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + in_tokens) / duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "ttft_ms": _ms([r.ttft for r in done]), "tpot_ms": _ms([r.tpot for r in done if r.tpot is not None]),
        "e2e_ms": _ms([r.e2e for r in done]),
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "slo_attainment": len(good) / len(res.records), "goodput": len(good) / duration,
        "preemptions": sum(r.preemptions for r in res.records),
        "instances": insts,
        "utilization_mean": sum(i["utilization"] for i in insts) / len(insts),
        "timeline": {"t_s": [round(e - res.start_time, 6) for e in edges[:-1]], "utilization": util,
                     "kv_usage": kv},
        **res.meta,
    }
    prios = sorted({r.priority for r in res.records})
    if len(prios) > 1:
        rep["by_priority"] = {str(p): {"ttft_ms": _ms([r.ttft for r in done if r.priority == p]),
                                       "e2e_ms": _ms([r.e2e for r in done if r.priority == p])} for p in prios}
    return rep


def print_report(rep: dict, out=None) -> None:
    import sys

    out = out or sys.stdout
    w = out.write
    w(f"{'completed / rejected':<28}{rep['completed']} / {rep['rejected']} of {rep['num_requests']}\n")
    w(f"{'duration (s)':<28}{rep['duration_s']:.3f}\n")
    w(f"{'request throughput (req/s)':<28}{rep['request_throughput']:.3f}\n")
    w(f"{'output throughput (tok/s)':<28}{rep['output_throughput']:.1f}\n")
    w(f"{'goodput (req/s)':<28}{rep['goodput']:.3f}   SLO {rep['slo']}, attainment {rep['slo_attainment']:.1%}\n")
    w(f"{'utilization (mean)':<28}{rep['utilization_mean']:.1%}   preemptions {rep['preemptions']}\n")
    for i in rep["instances"]:
        extra = f", static waste {i['static_waste']:.1%}" if "static_waste" in i else ""
        w(f"  {i['name']:<12}{i['role']:<10} util {i['utilization']:.1%}, {i['steps']} steps, "
          f"peak KV {i['kv_peak_usage']:.1%}{extra}\n")
    w(f"{'(ms)':<10}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}\n")
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        row = rep[key]
        w(f"{key[:-3].upper():<10}" + "".join(f"{'-' if row[k] is None else f'{row[k]:.2f}':>10}"
                                             for k in ("mean", "p50", "p90", "p99")) + "\n")


def plot(rep: dict, res: SimResult, path: str) -> None:
    """Latency CDFs and utilisation / KV use over time in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in res.records if r.finish is not None]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for vals, label in (([r.ttft * 1e3 for r in done], "TTFT"), ([r.e2e * 1e3 for r in done], "e2e"),
                        ([r.tpot * 1e3 for r in done if r.tpot is not None], "TPOT")):
        vals = sorted(vals)
        if vals:
            ax[0 if label != "TPOT" else 1].plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=label)
    ax[0].set(xlabel="ms", ylabel="CDF", title="TTFT and end-to-end latency", xscale="log")
    ax[1].set(xlabel="ms", ylabel="CDF", title="time per output token")
    ax[0].legend()
    tl = rep["timeline"]
    ax[2].plot(tl["t_s"], tl["utilization"], label="utilisation")
    ax[2].plot(tl["t_s"], [None if v is None else v for v in tl["kv_usage"]], label="KV use")
    ax[2].set(xlabel="simulated s", ylim=(0, 1.05), title="fleet over time")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_sweep(param: str, values: list, reports: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [str(v) for v in values]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(xs, [r["goodput"] for r in reports], "o-", label="goodput")
    ax[0].plot(xs, [r["request_throughput"] for r in reports], "s--", label="throughput")
    ax[0].set(xlabel=param, ylabel="req/s", title=f"goodput vs {param}")
    ax[0].legend()
    ax[1].plot(xs, [r["ttft_ms"]["p99"] for r in reports], "o-", label="TTFT p99")
    ax[1].plot(xs, [r["tpot_ms"]["p99"] for r in reports], "s-", label="TPOT p99")
    ax[1].set(xlabel=param, ylabel="ms", yscale="log", title="tail latency")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
