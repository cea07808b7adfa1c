"""Resident memory of the engine alone (no HTTP) over waves of random requests, with glibc's default malloc
behaviour or with the mmap threshold pinned as `frontierlm serve` does (launch.pin_malloc_mmap_threshold).
Not part of CI; it separates allocator growth from anything the server layer might hold.

    python benchmarks/engine_rss.py --waves 24                 # glibc defaults
    python benchmarks/engine_rss.py --waves 24 --pin-mmap-threshold
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir (default: the packaged demo model)")
    p.add_argument("--waves", type=int, default=24, help="waves of --batch requests, each run to completion")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pin-mmap-threshold", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.pin_mmap_threshold:
        from frontierlm.server.launch import pin_malloc_mmap_threshold

        assert pin_malloc_mmap_threshold(), "needs glibc (and MALLOC_MMAP_THRESHOLD_ unset)"
    import torch

    from frontierlm.assets import default_model
    from frontierlm.engine.llm_engine import LLMEngine
    from frontierlm.sampling_params import SamplingParams

    torch.set_num_threads(1)
    engine = LLMEngine.from_engine_args(args.model or default_model())
    rng = random.Random(args.seed)
    samples, n, t0 = [(0, round(rss_mib(), 1))], 0, time.perf_counter()
    for _ in range(args.waves):
        for _ in range(args.batch):
            ids = [rng.randrange(10, 500) for _ in range(rng.randint(4, 64))]
            engine.add_request(f"r{n}", {"prompt_token_ids": ids},
                               SamplingParams(max_tokens=rng.randint(1, 48), temperature=1.0, ignore_eos=True))
            n += 1
        while engine.has_unfinished_requests():
            engine.step()
        gc.collect()
        samples.append((n, round(rss_mib(), 1)))
        print(f"{n} requests, {time.perf_counter() - t0:.0f}s: RSS {samples[-1][1]} MiB", file=sys.stderr, flush=True)
    print(json.dumps({"pin_mmap_threshold": args.pin_mmap_threshold, "rss_mib": samples}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
