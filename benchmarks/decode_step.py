"""Decode step time of the eager path vs the compiled fast path, float32 vs bfloat16, in one process.

    python benchmarks/decode_step.py --model DIR [--batches 1,8,32] [--rounds 3] [--threads 2]

Each configuration gets its own engine (built and warmed up first, compile time reported); then rounds run the
configurations one after another (alternating, so load drifts hit all alike). A round decodes `--new-tokens`
tokens for B requests with 128-token prompts and records the median step time after the first two steps, as
wall time and as this process's CPU time (less sensitive to other processes on a shared machine), next to the
1-minute load average.
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
if (ROOT / "frontierlm").is_dir():
    sys.path.insert(0, str(ROOT))


def decode_round(engine, batch: int, new_tokens: int, vocab: int, salt: int) -> tuple[float, float]:
    from frontierlm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(None, [8 + (salt * 7919 + i * 131 + j) % (vocab - 8) for j in range(128)], params)
    walls, cpus = [], []
    while engine.has_unfinished_requests():
        w, c = time.perf_counter(), time.process_time()
        engine.step()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls[2:]), statistics.median(cpus[2:])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--modes", default="eager,fast")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from frontierlm import LLM
    from frontierlm.engine.dtype_policy import cpu_bf16_feature

    batches = [int(b) for b in a.batches.split(",")]
    engines, setup = {}, {}
    for dtype in a.dtypes.split(","):
        for mode in a.modes.split(","):
            t0 = time.perf_counter()
            llm = LLM(a.model, dtype=dtype, enforce_eager=mode == "eager", max_num_seqs=max(batches),
                      kv_cache_memory_gb=0.25)
            engine = llm.llm_engine
            fast = engine.runner.fast_decode
            if fast is not None:
                fast.warmup_steps = 0
            vocab = engine.model_config.vocab_size
            for b in sorted({1, max(2, min(batches))}):  # the batch-1 graph and the batch > 1 graph
                decode_round(engine, b, 6, vocab, salt=99)
            setup[f"{dtype}/{mode}"] = dict(
                warmup_s=round(time.perf_counter() - t0, 1),
                compile_s=round(sum(fast.compile_seconds.values()), 1) if fast is not None else 0.0)
            engines[(dtype, mode)] = engine
            print(f"ready {dtype}/{mode}: {setup[f'{dtype}/{mode}']}", file=sys.stderr, flush=True)
    rows = []
    for r in range(a.rounds):
        for b in batches:
            for (dtype, mode), engine in engines.items():
                wall, cpu = decode_round(engine, b, a.new_tokens, engine.model_config.vocab_size, salt=r * 10 + b)
                rows.append(dict(round=r, batch=b, dtype=dtype, mode=mode, step_ms=wall * 1e3, cpu_ms=cpu * 1e3,
                                 tok_s=b / wall, load1=os.getloadavg()[0]))
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                      file=sys.stderr, flush=True)
    summary = {}
    for b in batches:
        for dtype, mode in engines:
            sel = [x for x in rows if x["batch"] == b and x["dtype"] == dtype and x["mode"] == mode]
            summary[f"b{b}/{dtype}/{mode}"] = dict(
                tok_s=round(statistics.median(x["tok_s"] for x in sel), 1),
                step_ms=round(statistics.median(x["step_ms"] for x in sel), 2),
                cpu_ms=round(statistics.median(x["cpu_ms"] for x in sel), 2),
                load1=round(statistics.median(x["load1"] for x in sel), 1))
    result = dict(cpu_bf16=cpu_bf16_feature(), torch=torch.__version__, threads=a.threads, setup=setup,
                  summary=summary, rows=rows)
    print("| batch | dtype | mode | tok/s | step ms | CPU ms/step | load |\n|---|---|---|---|---|---|---|")
    for key, v in summary.items():
        b, dtype, mode = key.split("/")
        print(f"| {b[1:]} | {dtype} | {mode} | {v['tok_s']} | {v['step_ms']} | {v['cpu_ms']} | {v['load1']} |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
