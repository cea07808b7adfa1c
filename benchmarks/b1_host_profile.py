"""Where the host time of one batch-1 compiled decode step goes (docs/benchmarks.md, "Batch-1 host cost").

    python benchmarks/b1_host_profile.py --model /tmp/anchor-model --dtype float32 --threads 1 [--cprofile]

One request decodes --steps tokens after the fast path's warm-up; each part of `LLMEngine.step()` is timed with
perf_counter wrappers (ms per step, medians), and the compiled call is split into the graph alone (the
inductor module's `call`, captured from dynamo's cache) and the wrapper around it. --cprofile prints the top
functions by own time instead.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(obj, name, sink):
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            sink.setdefault(name, []).append(time.perf_counter() - t0)
    setattr(obj, name, wrapper)


def ab_rounds(eng, fast, a) -> dict:
    inputs = fast.inputs
    modes = {"before": (lambda sched, b, w: inputs._fill_rows(sched, b, w), inputs._make_views),
             "after": (type(inputs).fill.__get__(inputs), type(inputs).views.__get__(inputs))}
    res: dict[str, list[float]] = {m: [] for m in modes}
    last = []
    run = fast.run

    def snapshot_run(sched):  # a frozen copy of the first step's schedule, for timing the fill alone
        if not last:
            last.append(SimpleNamespace(scheduled=[SimpleNamespace(
                request=SimpleNamespace(num_computed_tokens=r.request.num_computed_tokens,
                                        all_token_ids=list(r.request.all_token_ids)),
                block_ids=list(r.block_ids), num_new_tokens=1, samples=True) for r in sched.scheduled]))
        return run(sched)
    fast.run = snapshot_run
    for _ in range(a.ab):
        for mode, (fill, views) in modes.items():
            inputs.fill, inputs.views = fill, views
            t = []
            for _ in range(a.steps):
                t0 = time.perf_counter()
                eng.step()
                t.append(time.perf_counter() - t0)
            res[mode].append(round(statistics.median(t) * 1e3, 3))
    sched, shape = last[-1], fast.shape_for(last[-1])
    inputs_us = {}
    for mode, (fill, views) in modes.items():  # fill + views alone, on the last step's schedule
        t0 = time.perf_counter()
        for _ in range(2000):
            fill(sched, *shape)
            views(*shape)
        inputs_us[mode] = round((time.perf_counter() - t0) / 2000 * 1e6, 1)
    out = {"ms_per_step": res, "fill_and_views_us": inputs_us, "ratio_after_before": round(statistics.median(res["after"]) /
                                                           statistics.median(res["before"]), 4),
           "load1": os.getloadavg()[0], "threads": a.threads, "dtype": a.dtype}
    print(json.dumps(out))
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--cprofile", action="store_true")
    p.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                   help="instead: ROUNDS pairs of --steps steps, alternating the array fill with views rebuilt every "
                        "step (before) and the batch-1 fill with cached views (after); ms per step of each round")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from frontierlm import LLM, SamplingParams

    llm = LLM(a.model, dtype=a.dtype, enforce_eager=False)
    eng = llm.llm_engine
    fast = eng.runner.fast_decode
    params = SamplingParams(temperature=0, max_tokens=a.steps * (1 + 2 * a.ab) + fast.warmup_steps + 20,
                            ignore_eos=True)
    eng.add_request(None, list(range(1, 100)), params)
    for _ in range(fast.warmup_steps + 10):  # prefill, eager warm-up, the compile
        eng.step()
    if a.ab:
        return ab_rounds(eng, fast, a)
    sink: dict[str, list[float]] = {}
    timed(eng.scheduler, "schedule", sink)
    timed(eng.runner, "execute", sink)
    timed(eng, "_finish_step", sink)
    timed(fast, "run", sink)
    timed(fast.inputs, "fill", sink)
    timed(fast, "_run_compiled", sink)
    timed(eng.runner, "_sample", sink)
    timed(eng.runner.sampler, "__call__", sink)
    steps = []
    prof = cProfile.Profile() if a.cprofile else None
    if prof:
        prof.enable()
    for _ in range(a.steps):
        t0 = time.perf_counter()
        eng.step()
        steps.append(time.perf_counter() - t0)
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    # the graph alone: the same inputs through the compiled forward's guard-free call, many times
    args = fast.inputs.views(1, fast.widths[0])
    with torch.inference_mode():
        t = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            fast._run_compiled(args, first=False)
            t.append(time.perf_counter() - t0)
    ms = lambda v: round(statistics.median(v) * 1e3, 3)  # noqa: E731
    # paired per step (each part runs once a step), so a noisy graph time cancels out
    pair = lambda a_, b_: [x - y for x, y in zip(a_, b_)]  # noqa: E731
    paired = {"step_minus_compiled_call": ms(pair(steps, sink["_run_compiled"])),
              "run_minus_compiled_call_and_fill": ms(pair(pair(sink["run"], sink["_run_compiled"]), sink["fill"])),
              "execute_minus_run": ms(pair(sink["execute"], sink["run"]))}
    out = {"step_ms": ms(steps), **{k: ms(v) for k, v in sink.items()}, "paired_ms": paired,
           "compiled_call_alone_ms": ms(t),
           "fast_steps": fast.fast_steps, "threads": a.threads, "dtype": a.dtype}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
