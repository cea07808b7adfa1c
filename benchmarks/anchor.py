"""The CPU anchor workload on FrontierLM, figure for figure as llama.cpp is measured beside it (benchmarks/llamacpp_peer.py).

    python benchmarks/anchor.py --model /tmp/anchor-model [--compile] [--dtype bfloat16] [--quantization int8]
                                [--figures b1,seqs8,default] [--threads 2]

Workload: 32 requests from random.Random(0), prompt and output lengths each uniform in [64, 256], prompt ids
uniform in [1, vocab), greedy, exact output lengths (ignore_eos). Three figures, one process:
- b1: the first 4 requests one at a time; decode tok/s = sum(out - 1) / sum(time after the first token).
- seqs8: all 32 requests with max_num_seqs=8 (continuous batching over 8 slots), output tok/s end to end.
- default: all 32 at once with the engine's default settings, output tok/s end to end.
Each figure is the median of --rounds rounds. Prints one JSON line (and writes --json-out).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "frontierlm").is_dir():
    sys.path.insert(0, str(ROOT))


def anchor_workload(vocab: int, n: int = 32, seed: int = 0) -> list[tuple[list[int], int]]:
    """[(prompt_ids, out_len)]: the same draw order as the llama.cpp peer's, so both engines see the same ids."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        p, o = rng.randint(64, 256), rng.randint(64, 256)
        reqs.append(([rng.randrange(1, vocab) for _ in range(p)], o))
    return reqs


def batch1_decode(engine, reqs) -> float:
    from frontierlm import SamplingParams
    decoded, seconds = 0, 0.0
    for ids, out_len in reqs:
        rid = engine.add_request(None, ids, SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True))
        t_first, done, n = None, False, 0
        while not done:
            for out in engine.step():
                if out.request_id == rid:
                    n = len(out.outputs[0].token_ids)
                    if t_first is None and n >= 1:
                        t_first = time.perf_counter()
                    done = out.finished
        seconds += time.perf_counter() - t_first
        decoded += n - 1
        assert n == out_len, f"got {n} tokens, asked {out_len}"
    return decoded / seconds


def end_to_end(llm, reqs) -> tuple[float, list[list[int]]]:
    from frontierlm import SamplingParams
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
    t0 = time.perf_counter()
    outs = llm.generate([ids for ids, _ in reqs], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    toks = [list(o.outputs[0].token_ids) for o in outs]
    assert all(len(t) == o for t, (_, o) in zip(toks, reqs))
    return sum(len(t) for t in toks) / wall, toks


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--compile", action="store_true", help="enforce_eager=False: the compiled decode step")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", help="int8 | int4 | fp8: quantize the weights on load")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--figures", default="b1,seqs8,default")
    p.add_argument("--json-out")
    p.add_argument("--padded-batch", action="store_true",
                   help="pad decode batches to the ladder (fast_decode.CPU_EXACT_BATCH off), for an A/B")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.padded_batch:
        import frontierlm.engine.fast_decode as fd

        fd.CPU_EXACT_BATCH = False
    from frontierlm import LLM, SamplingParams

    figures = a.figures.split(",")
    common = dict(dtype=a.dtype, enforce_eager=not a.compile)
    if a.quantization:
        common["quantization"] = a.quantization
    t0 = time.perf_counter()
    engines = {"default": LLM(a.model, **common)}
    if "seqs8" in figures:
        engines["seqs8"] = LLM(a.model, max_num_seqs=8, **common)
    vocab = engines["default"].llm_engine.model_config.vocab_size
    reqs = anchor_workload(vocab)
    # Warm-up (not timed): past the fast path's eager steps so every compile happens here.
    for llm in engines.values():
        fast = llm.llm_engine.runner.fast_decode
        n = 8 + (fast.warmup_steps if fast is not None else 0)
        for batch in (1, 4):
            llm.generate([ids for ids, _ in reqs[:batch]],
                         SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    if "b1" in figures:  # every block-table width the timed batch-1 requests reach, compiled before the rounds
        batch1_decode(engines["default"].llm_engine, reqs[:4])
    setup_s = time.perf_counter() - t0
    compile_s = sum(sum(llm.llm_engine.runner.fast_decode.compile_seconds.values())
                    for llm in engines.values() if llm.llm_engine.runner.fast_decode is not None)
    runs: dict[str, list[float]] = {f: [] for f in figures}
    tokens = {}
    for r in range(a.rounds):
        for f in figures:
            load = os.getloadavg()[0]
            if f == "b1":
                v = batch1_decode(engines["default"].llm_engine, reqs[:4])
            else:
                v, tokens[f] = end_to_end(engines[f], reqs)
            runs[f].append(round(v, 1))
            print(json.dumps({"round": r, "figure": f, "tok_s": round(v, 1), "load1": load}), file=sys.stderr,
                  flush=True)
    result = {"engine": "frontierlm", "compile": a.compile, "dtype": a.dtype, "quantization": a.quantization,
              "threads": a.threads,
              "torch": torch.__version__, "setup_s": round(setup_s, 1),
              "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "compile_s": round(compile_s, 1),
              "median": {f: statistics.median(v) for f, v in runs.items()}, "runs": runs,
              "startup_report": engines["default"].llm_engine.startup_report}
    print(json.dumps(result))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({**result, "tokens": tokens}) + "\n")
    return result


if __name__ == "__main__":
    main()
