"""Prefill over a cached prefix: extend attention that reads the paged cache in place vs gathering its blocks.

    taskset -c 1 python benchmarks/prefix_extend.py --model DIR [--rounds 5] [--threads 1] [--json-out F]

Both paths run in one process, alternating round by round (load drifts hit both alike):
* op: one forward's attention (the plan, then `--layers` layers, each with its own cache) of
  TorchAttentionBackend for extend chunks over a cached prefix, at the benchmark model's head shapes
  (8 query heads, 4 KV heads, head dim 64, blocks of 16), with contiguous and with scattered block tables;
* engine: LLMEngine steps of the model in DIR that prefill requests whose long shared prefix is a prefix-cache
  hit, and of a long prompt prefilled in chunks (chunked prefill), in the same engine with
  `model.attn_backend.extend_in_place` toggled (True: layers/paged_extend.py, False: the gathering path).
Reported: medians over rounds of wall time, with this process's CPU time and the 1-minute load average.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "frontierlm").is_dir():
    sys.path.insert(0, str(ROOT))

MODES = {"in_place": True, "gather": False}


def _meta(seqs, bs):
    from frontierlm.layers.attention import AttentionMetadata

    qlens, slens, tables = zip(*seqs)
    slots = [t[p // bs] * bs + p % bs for q, s, t in seqs for p in range(s - q, s)]
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                                                    dtype=torch.int32),
        query_start_loc=torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32),
        seq_lens=torch.tensor(slens, dtype=torch.int32), query_lens_cpu=list(qlens), seq_lens_cpu=list(slens),
        max_query_len=max(qlens), max_seq_len=max(slens), block_size=bs)


def op_case(prefix: int, chunk: int, batch: int, scattered: bool, layers: int, reps: int):
    """Seconds per forward's attention for each mode: `batch` sequences of `chunk` new tokens over `prefix`."""
    from frontierlm.layers.attention import TorchAttentionBackend

    bs, hq, hkv, d = 16, 8, 4, 64
    nblk = -(-(prefix + chunk) // bs)
    ids = list(range(batch * nblk))
    if scattered:
        random.Random(0).shuffle(ids)
    seqs = [(chunk, prefix + chunk, ids[i * nblk:(i + 1) * nblk]) for i in range(batch)]
    meta = _meta(seqs, bs)
    g = torch.Generator().manual_seed(0)
    caches = [torch.randn(2, batch * nblk, bs, hkv, d, generator=g) for _ in range(layers)]
    t = batch * chunk
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
    backends = {m: TorchAttentionBackend(extend_in_place=f) for m, f in MODES.items()}
    times = {m: [] for m in MODES}
    for _ in range(reps):
        for m, backend in backends.items():
            w = time.perf_counter()
            plan = backend.plan(meta)
            for cache in caches:
                backend.forward(q, k, v, cache, plan, d ** -0.5, None)
            times[m].append(time.perf_counter() - w)
    return {m: statistics.median(x) for m, x in times.items()}


def _prefill(engine, prompts) -> tuple[float, float, int]:
    from frontierlm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for p in prompts:
        engine.add_request(None, p, params)
    w, c, steps = time.perf_counter(), time.process_time(), 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return time.perf_counter() - w, time.process_time() - c, steps


def engine_rounds(model: str, prefix: int, suffix: int, batch: int, long_prompt: int, chunk: int, rounds: int):
    from frontierlm import LLM

    rng = random.Random(1)
    llm = LLM(model, enforce_eager=True, max_num_batched_tokens=max(chunk, batch * suffix), kv_cache_memory_gb=1.0)
    engine = llm.llm_engine
    vocab = engine.model_config.vocab_size
    shared = [rng.randrange(8, vocab) for _ in range(prefix)]
    _prefill(engine, [shared + [9]])  # the shared prefix is now in the prefix cache
    chunked = LLM(model, enforce_eager=True, max_num_batched_tokens=chunk, kv_cache_memory_gb=1.0).llm_engine
    rows = []
    for r in range(rounds):
        for mode, flag in MODES.items():
            for name, eng, prompts in (
                    ("prefix_hit", engine, [shared + [rng.randrange(8, vocab) for _ in range(suffix)]
                                            for _ in range(batch)]),
                    ("chunked", chunked, [[rng.randrange(8, vocab) for _ in range(long_prompt)]])):
                eng.runner.model.attn_backend.extend_in_place = flag
                wall, cpu, steps = _prefill(eng, prompts)
                rows.append(dict(round=r, case=name, mode=mode, wall_ms=wall * 1e3, cpu_ms=cpu * 1e3, steps=steps,
                                 load1=os.getloadavg()[0]))
                print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                      file=sys.stderr, flush=True)
        hits = engine.kv.prefix_hits
    return rows, hits


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--prefix", type=int, default=1024, help="cached prefix tokens (engine)")
    p.add_argument("--suffix", type=int, default=64, help="new tokens per request after the prefix (engine)")
    p.add_argument("--batch", type=int, default=8, help="requests sharing the prefix (engine)")
    p.add_argument("--long-prompt", type=int, default=2048, help="prompt prefilled in chunks (engine)")
    p.add_argument("--chunk", type=int, default=256, help="max_num_batched_tokens of the chunked engine")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ops = []
    for prefix, chunk, batch in ((256, 16, 4), (1024, 16, 4), (1024, 64, 4), (2048, 64, 1), (2048, 256, 1)):
        for scattered in (False, True):
            t = op_case(prefix, chunk, batch, scattered, a.layers, reps=a.rounds * 3)
            ops.append(dict(prefix=prefix, chunk=chunk, batch=batch, scattered=scattered,
                            in_place_ms=t["in_place"] * 1e3, gather_ms=t["gather"] * 1e3,
                            speedup=t["gather"] / t["in_place"], load1=os.getloadavg()[0]))
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in ops[-1].items()}),
                  file=sys.stderr, flush=True)
    print("| prefix | chunk | seqs | table | in place ms | gather ms | speedup | load |\n" + "|---" * 8 + "|")
    for o in ops:
        print(f"| {o['prefix']} | {o['chunk']} | {o['batch']} | {'scattered' if o['scattered'] else 'contiguous'} | "
              f"{o['in_place_ms']:.2f} | {o['gather_ms']:.2f} | {o['speedup']:.2f}x | {o['load1']:.1f} |")
    result = dict(torch=torch.__version__, threads=a.threads, op=ops)
    if not a.skip_engine:
        rows, hits = engine_rounds(a.model, a.prefix, a.suffix, a.batch, a.long_prompt, a.chunk, a.rounds)
        summary = {}
        for case in ("prefix_hit", "chunked"):
            for mode in MODES:
                sel = [x for x in rows if x["case"] == case and x["mode"] == mode]
                summary[f"{case}/{mode}"] = dict(
                    wall_ms=round(statistics.median(x["wall_ms"] for x in sel), 1),
                    cpu_ms=round(statistics.median(x["cpu_ms"] for x in sel), 1), steps=sel[0]["steps"],
                    load1=round(statistics.median(x["load1"] for x in sel), 1))
        print("| case | mode | wall ms | CPU ms | steps | load |\n|---|---|---|---|---|---|")
        for key, v in summary.items():
            case, mode = key.split("/")
            print(f"| {case} | {mode} | {v['wall_ms']} | {v['cpu_ms']} | {v['steps']} | {v['load1']} |")
        result.update(engine=summary, engine_rows=rows, prefix_hit_tokens=hits)
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
