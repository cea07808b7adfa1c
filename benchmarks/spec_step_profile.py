"""Where the time of one batch-1 compiled speculative step goes, beside the plain compiled decode step.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/spec_step_profile.py [--ks 1,2,3,4] [--steps 200]
                                                                           [--workload edit] [--eager]

One request of the demo model decodes greedily after the fast paths' compiles; every part of the engine step is
timed with perf_counter wrappers (ms per step, medians over --steps steps; parts nest, so they do not add up):
schedule, execute (the runner: forward + verification), the compiled call alone, the verification, the step's
bookkeeping (`_finish_step`: scheduler update, outputs, proposals) and the proposer. The plain engine and
each n-gram K alternate in rounds in one process, so a change in load shows in all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FRONTIERLM_LOG_LEVEL", "WARNING")


def timed(obj, name, sink, key=None):
    fn = getattr(obj, name)
    key = key or name

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            sink.setdefault(key, []).append(time.perf_counter() - t0)
    setattr(obj, name, wrapper)


def instrument(eng) -> dict:
    sink: dict[str, list[float]] = {}
    timed(eng.scheduler, "schedule", sink)
    timed(eng.runner, "execute", sink)
    timed(eng, "_finish_step", sink)
    timed(eng.scheduler, "update_from_output", sink)
    timed(eng.runner.sampler, "__call__", sink, "sampler")
    fd = eng.runner.fast_decode
    if fd is not None:
        timed(fd, "_run_compiled", sink, "graph")
    if eng.spec is not None:
        sp = eng.spec
        timed(sp, "propose", sink, "spec.propose")
        timed(sp.proposer, "propose", sink, "proposer")
        if hasattr(sp.proposer, "_forward"):  # the model proposers' forwards (one per chained position)
            timed(sp.proposer, "_forward", sink, "proposer.forward")
        if getattr(sp.proposer, "fast", None) is not None:
            timed(sp.proposer.fast, "run", sink, "proposer.fast.run")
        timed(sp, "verify", sink, "spec.verify")
        if sp.fast is not None:
            timed(sp.fast, "step", sink, "fast_verify.step")
            timed(sp.fast, "_run_compiled", sink, "graph")
            timed(sp.fast.inputs, "fill", sink, "fill")
    return sink


def main(argv=None) -> dict:
    from frontierlm import LLM, SamplingParams
    from frontierlm.assets import default_model
    import frontierlm.engine.fast_decode as fdm
    from benchmarks.spec_decode import docs_prompts, edit_prompts, spec_config

    p = argparse.ArgumentParser()
    p.add_argument("--ks", default="1,2,3,4")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workload", default="edit", choices=["edit", "docs"])
    p.add_argument("--eager", action="store_true")
    p.add_argument("--method", default="ngram", choices=["ngram", "mtp", "draft"])
    p.add_argument("--static-rows", type=int, default=None, help="fast_verify.STATIC_ROWS for these engines")
    p.add_argument("--padded-rows", action="store_true", help="pad rows to the batch ladder "
                   "(fast_decode.CPU_EXACT_BATCH off), as before unpadded rows")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    fdm.WARMUP_DECODE_STEPS = 0
    if a.padded_rows:
        fdm.CPU_EXACT_BATCH = False
    if a.static_rows is not None:
        import frontierlm.spec.fast_verify as fv

        fv.STATIC_ROWS = a.static_rows
    engines = {}
    for k in [0] + [int(x) for x in a.ks.split(",")]:
        spec = spec_config(a.method, k, adaptive=False) if k else None
        engines[k] = LLM(default_model(), dtype="float32", max_num_seqs=4, speculative_config=spec,
                         enforce_eager=a.eager)
    tok = engines[0].get_tokenizer()
    prompt = (edit_prompts if a.workload == "edit" else docs_prompts)(tok, 1)[0]
    res: dict = {k: {} for k in engines}
    for rnd in range(a.rounds + 1):
        for k, llm in engines.items():
            eng = llm.llm_engine
            params = SamplingParams(temperature=0.0, max_tokens=1000 - len(prompt), ignore_eos=True)
            eng.add_request(f"r{rnd}", list(prompt), params)
            for _ in range(8):  # prefill and the compiles of this engine's shapes
                eng.step()
            sink = instrument(eng) if rnd else {}
            steps, tokens0 = [], eng.scheduler.running[0].num_output_tokens
            req = eng.scheduler.running[0]
            for _ in range(a.steps):
                if req.is_finished:
                    break
                t0 = time.perf_counter()
                eng.step()
                steps.append(time.perf_counter() - t0)
            gained = req.num_output_tokens - tokens0
            eng.abort_request(f"r{rnd}")
            while eng.has_unfinished_requests():
                eng.step()
            for obj in (eng, eng.scheduler, eng.runner, eng.runner.sampler, eng.runner.fast_decode,
                        *(() if eng.spec is None else (eng.spec, eng.spec.proposer, eng.spec.fast,
                                                        eng.spec.fast and eng.spec.fast.inputs))):
                if obj is not None:
                    for name in [n for n, v in vars(obj).items() if getattr(v, "__name__", "") == "wrapper"]:
                        delattr(obj, name)
            if not rnd:
                continue
            ms = lambda v: round(statistics.median(v) * 1e3, 3)  # noqa: E731
            row = {"step_ms": ms(steps), "tokens_per_step": round(gained / a.steps, 3),
                   "ms_per_token": round(sum(steps) * 1e3 / max(gained, 1), 3),
                   **{n: ms(v) for n, v in sink.items()}, "load1": os.getloadavg()[0]}
            if not res[k] or row["ms_per_token"] < res[k]["ms_per_token"]:
                res[k] = row
    graphs = {}  # the compiled calls alone, per shape seen (rows x block-table width), same inputs each time
    with torch.inference_mode():
        for k, llm in engines.items():
            eng = llm.llm_engine
            fast = eng.runner.fast_decode if k == 0 else eng.spec.fast
            for shape in sorted(fast._seen if fast is not None else ()):
                args, t = fast.inputs.views(*shape), []
                for _ in range(a.steps):
                    t0 = time.perf_counter()
                    fast._run_compiled(args, first=False)
                    t.append(time.perf_counter() - t0)
                graphs[f"k{k} {shape[0]}x{shape[1]}"] = round(statistics.median(t) * 1e3, 3)
    for k, row in res.items():
        print(json.dumps({"k": k, **row}), flush=True)
    print(json.dumps({"graph_alone_ms": graphs}))
    base = res[0]["ms_per_token"]
    print(json.dumps({"speedup": {k: round(base / r["ms_per_token"], 3) for k, r in res.items()}}))
    return res


if __name__ == "__main__":
    main()
