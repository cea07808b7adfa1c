"""Expert-parallel combine on gloo: one all-reduce of [T, H] (what FrontierLM does: tokens are replicated on the
TP ranks, each rank adds its experts' partial sums) vs an all-to-all dispatch of the routed pairs, the
all-to-all back, and an all-gather to re-replicate the tokens (what sharded tokens would need).

    taskset -c 1 python benchmarks/ep_dispatch.py [--hidden 512] [--top-k 2]

Two processes on loopback, one thread each; milliseconds per round, rank 0's wall clock, mean of 50.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank: int, port: int, hidden: int, top_k: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    for tokens in (1, 16, 256):
        x = torch.randn(tokens, hidden)
        pairs = torch.randn(max(tokens * top_k // 2, 1), hidden)  # uniform routing: half the pairs go across
        back, gathered = torch.empty_like(pairs), torch.empty(2 * tokens, hidden)

        def all_to_all():
            dist.all_to_all_single(back, pairs)
            dist.all_to_all_single(pairs, back)
            dist.all_gather_into_tensor(gathered, x)

        for name, fn in (("all-reduce", lambda: dist.all_reduce(x)), ("all-to-all x2 + all-gather", all_to_all)):
            for _ in range(3):
                fn()
            t = time.perf_counter()
            for _ in range(50):
                fn()
            if rank == 0:
                print(f"T={tokens:4d} {name:28s} {(time.perf_counter() - t) / 50 * 1e3:7.3f} ms", flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--port", type=int, default=29611)
    args = p.parse_args()
    mp.spawn(run, args=(args.port, args.hidden, args.top_k), nprocs=2)


if __name__ == "__main__":
    main()
