"""Start-up compile of the decode fast path from a cold and then a warm inductor cache, each in a fresh process.

    python benchmarks/startup_compile.py --model DIR [--cache-dir DIR] [--threads 1] [--dtype float32]
        [--max-num-seqs 256] [--max-model-len N] [--runs warm,...]

The cache directory is emptied first, then one process per run (cold, warm, ...) builds an engine with
compile_decode_at_startup=True and TORCHINDUCTOR_CACHE_DIR pointing there, and prints one JSON line: shapes
compiled, seconds, the cache verdict (inductor's graph-cache hits / misses), the time to load the model, and
the 1-minute load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(args) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(args.threads)
    from frontierlm.config import EngineConfig
    from frontierlm.engine.llm_engine import LLMEngine

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=args.model, enforce_eager=False, compile_decode_at_startup=True,
                                    dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                                    max_model_len=args.max_model_len))
    total = time.perf_counter() - t0
    f = engine.runner.fast_decode
    shapes, seconds, cache = f.startup_compile
    print(json.dumps({"shapes": shapes, "compile_s": round(seconds, 1), "cache": cache,
                      "engine_start_s": round(total, 1), "graphs_per_shape_s": {f"{b}x{w}": round(s, 2)
                      for (b, w), s in f.compile_seconds.items()},
                      "load_1min": [load0, os.getloadavg()[0]], "threads": torch.get_num_threads(),
                      "cache_dir": f.inductor_cache_dir}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--cache-dir", default="/tmp/frontierlm-startup-compile-cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--runs", default="cold,warm", help="labels of the runs; only the first starts from empty")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    shutil.rmtree(args.cache_dir, ignore_errors=True)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=args.cache_dir, OMP_NUM_THREADS=str(args.threads))
    for label in args.runs.split(","):
        cmd = [sys.executable, __file__, "--child", "--model", args.model, "--threads", str(args.threads),
               "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs)]
        if args.max_model_len:
            cmd += ["--max-model-len", str(args.max_model_len)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{label} run failed:\n{out.stderr[-3000:]}")
        print(label, out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
