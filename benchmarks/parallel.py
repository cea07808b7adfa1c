"""Tensor and pipeline parallelism on CPU: TP=1 vs TP=2 vs PP=2 on the 33.6M benchmark Llama, in one run.

    python benchmarks/parallel.py                         # builds the random model in a temp dir
    python benchmarks/parallel.py --model DIR --rounds 2 --json-out result.json

Per layout (TP=1 with --threads-total threads; TP=2 and PP=2 with one thread per rank): offline output tok/s
over a fixed workload, batch-1 decode tok/s, and where rank 0's step time goes: the share spent inside
torch.distributed calls (all-reduce, broadcast, gather, send/recv, timed here by wrapping them in this process)
and the shared-memory TP all-reduce, and for PP the share rank 0 waits for the last stage (the pipeline bubble
plus the transfer). Layouts alternate round by round so their ratios come from the same minutes of a shared
machine. `--layouts TP=2,TP=2-gloo` compares the shared-memory all-reduce (the default on one host) with gloo.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
if (ROOT / "frontierlm").is_dir():
    sys.path.insert(0, str(ROOT))
from make_random_model import make_random_model  # noqa: E402

from frontierlm.sim.profile import cpu_name  # noqa: E402

NUM_SPECIAL = 8
LAYOUTS = {"TP=1": {}, "TP=2": {"tensor_parallel_size": 2}, "PP=2": {"pipeline_parallel_size": 2},
           "TP=2-gloo": {"tensor_parallel_size": 2}}  # TP=2 with the shared-memory all-reduce off
ENV = {"TP=2-gloo": {"FRONTIERLM_SHM_ALLREDUCE": "0"}}  # set while the layout's engine starts its workers


class CommTimer:
    """Wall time rank 0 spends inside torch.distributed calls (including waiting for the other ranks)."""

    NAMES = ("all_reduce", "broadcast", "gather", "send", "recv", "isend")

    def __init__(self):
        from frontierlm.distributed.shm import ShmAllReduce

        self.seconds, self.final_wait = 0.0, 0.0
        self._orig = {n: getattr(dist, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(dist, n, self._wrap(n, self._orig[n]))
        ShmAllReduce.all_reduce = self._wrap("shm", ShmAllReduce.all_reduce)  # the TP all-reduces off gloo

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                self.seconds += dt
                if name == "recv" and kwargs.get("tag") == 2:  # stage 0 waiting for the last stage's output
                    self.final_wait += dt
        return timed

    def reset(self):
        self.seconds = self.final_wait = 0.0


def workload(n: int, vocab: int, lo: int, hi: int, seed: int = 0):
    rng = random.Random(seed)
    return [([rng.randrange(NUM_SPECIAL, vocab) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi))
            for _ in range(n)]


def run_layout(model_dir: str, flags: dict, threads: int, reqs, decode_new: int, timer: CommTimer,
               env: dict | None = None) -> dict:
    from frontierlm import LLM, SamplingParams

    torch.set_num_threads(threads)
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        llm = LLM(model_dir, max_model_len=512, **flags)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    try:
        engine = llm.llm_engine
        warm = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
        llm.generate([reqs[0][0]], warm, use_tqdm=False)
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in reqs]
        pipe = engine.pipeline  # PP: ticks of the offline run, and those that brought no new batch
        before = (pipe.ticks, pipe.empty_ticks) if pipe is not None else None
        timer.reset()
        t = time.perf_counter()
        outs = llm.generate([p for p, _ in reqs], params, use_tqdm=False)
        wall = time.perf_counter() - t
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        comm, final_wait = timer.seconds, timer.final_wait
        ticks = (pipe.ticks - before[0], pipe.empty_ticks - before[1]) if pipe is not None else None
        # batch-1 decode: time after the first token
        engine.add_request("decode", reqs[1][0], SamplingParams(temperature=0, max_tokens=decode_new, ignore_eos=True))
        first = None
        timer.reset()
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
                    timer.reset()
        decode_wall = time.perf_counter() - first
        return {"output_tok_s": tokens / wall, "comm_share": comm / wall, "pp_wait_share": final_wait / wall,
                "decode_tok_s": (decode_new - 1) / decode_wall, "decode_comm_share": timer.seconds / decode_wall,
                "pp_ticks_and_empty_ticks": ticks,
                "first_tokens": [o.outputs[0].token_ids[:8] for o in outs[:4]]}
    finally:
        llm.llm_engine.shutdown()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: build the 33.6M Llama in a temp dir)")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--decode-new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads-total", type=int, default=2, help="threads of TP=1; TP=2 / PP=2 get 1 per rank")
    p.add_argument("--layouts", default="TP=1,TP=2,PP=2", help=f"of {', '.join(LAYOUTS)}")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    model = args.model or str(make_random_model(Path(tempfile.mkdtemp()) / "llama-33m"))
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    reqs = workload(args.num_requests, vocab, args.min_len, args.max_len)
    timer = CommTimer()
    results = {name: [] for name in args.layouts.split(",")}
    for r in range(args.rounds):
        for name in results:
            threads = args.threads_total if name == "TP=1" else 1
            res = run_layout(model, LAYOUTS[name], threads, reqs, args.decode_new, timer, ENV.get(name))
            res["load"] = os.getloadavg()[0]
            results[name].append(res)
            print(f"round {r + 1} {name}: {res['output_tok_s']:.1f} output tok/s (comm {res['comm_share']:.0%}, "
                  f"PP wait {res['pp_wait_share']:.0%}), batch-1 decode {res['decode_tok_s']:.1f} tok/s "
                  f"(comm {res['decode_comm_share']:.0%}), load {res['load']:.1f}", flush=True)
    same = len({json.dumps(v[0]["first_tokens"]) for v in results.values()}) == 1
    print(f"greedy outputs identical across layouts: {same}")
    info = {"cpu": cpu_name(), "torch": torch.__version__, "affinity": sorted(os.sched_getaffinity(0)),
            "results": results, "identical_outputs": same}
    print(json.dumps({k: v for k, v in info.items() if k != "results"}))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
