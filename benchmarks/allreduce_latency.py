"""All-reduce latency of CPU tensor parallelism: gloo over loopback vs the shared-memory all-reduce
(frontierlm/distributed/shm.py), two ranks, in the same processes and rounds.

    python benchmarks/allreduce_latency.py --cpus 1,1          # both ranks on CPU 1 (they share one core)
    python benchmarks/allreduce_latency.py --cpus 0,1          # one core per rank
    python benchmarks/allreduce_latency.py --rows 1,8,2048 --dtype bfloat16 --json-out r.json

Sizes are the activations the 33.6M benchmark Llama (hidden 512) all-reduces twice per layer: decode steps of
1..64 rows and prefill chunks up to the default 2048-token budget (4 MiB in float32, the shm slot's default).
Each round times every size with both paths, in alternating order, after a barrier; the figure is the median
over rounds of the mean time per all-reduce on rank 0. Both paths' results are checked equal (bit for bit).
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
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "frontierlm").is_dir():
    sys.path.insert(0, str(ROOT))


def _iters(nbytes: int, base: int) -> int:
    """Fewer repetitions for the large tensors (a 4 MiB gloo all-reduce takes milliseconds)."""
    return max(20, min(base, base * 32768 // max(nbytes, 1)))


def _rank(rank: int, args, port: int, queue) -> None:
    import torch.distributed as dist

    from frontierlm.distributed.state import ParallelContext, init_process_groups

    os.sched_setaffinity(0, {args.cpus[rank]})
    torch.set_num_threads(1)
    ctx = init_process_groups(ParallelContext(rank=rank, tp_size=2), "127.0.0.1", port)
    shm, group = ctx.tp_reduce.shm, ctx.tp_group
    if shm is None:
        raise SystemExit("the shared-memory all-reduce is off (FRONTIERLM_SHM_ALLREDUCE=0 or no /dev/shm)")
    dtype = getattr(torch, args.dtype)
    paths = {"gloo": lambda x: dist.all_reduce(x, group=group), "shm": shm.all_reduce}
    times = {(rows, name): [] for rows in args.rows for name in paths}
    equal = {}
    for rows in args.rows:  # the two paths agree (and warm up)
        x = torch.randn(rows, args.hidden, generator=torch.Generator().manual_seed(rank)).to(dtype)
        if x.numel() * x.element_size() > shm.slot:
            raise SystemExit(f"{rows} rows exceed the {shm.slot} byte slot: raise FRONTIERLM_SHM_ALLREDUCE_MB")
        a, b = x.clone(), x.clone()
        paths["gloo"](a)
        paths["shm"](b)
        equal[rows] = torch.equal(a, b)
        for _ in range(20):  # warm-up of both paths at this size
            paths["gloo"](a)
            paths["shm"](b)
    for r in range(args.rounds):
        for rows in args.rows:
            x = torch.randn(rows, args.hidden).to(dtype)
            n = _iters(x.numel() * x.element_size(), args.iters)
            for name in (("gloo", "shm") if r % 2 == 0 else ("shm", "gloo")):
                fn = paths[name]
                dist.barrier(group=group)
                t = time.perf_counter()
                for _ in range(n):
                    fn(x)  # the sum doubles (to inf, which costs the same): only the time matters here
                times[rows, name].append((time.perf_counter() - t) / n)
    if rank == 0:
        queue.put({"times": {f"{rows}:{name}": v for (rows, name), v in times.items()}, "equal": equal})
    dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", default="1,1", help="CPU of rank 0 and of rank 1 (the same one: they share a core)")
    p.add_argument("--rows", default="1,4,16,64,256,2048", help="rows of the [rows, hidden] tensor")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=2000, help="all-reduces per measurement of the small sizes")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    args.cpus = [int(c) for c in args.cpus.split(",")]
    args.rows = [int(r) for r in args.rows.split(",")]
    if len(args.cpus) != 2:
        raise SystemExit("--cpus takes two CPUs, one per rank")
    from frontierlm.distributed.executor import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, args, port, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    result = queue.get()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise SystemExit(f"a rank failed: exit codes {[proc.exitcode for proc in procs]}")
    med = {k: statistics.median(v) for k, v in result["times"].items()}
    print(f"2 ranks on CPUs {args.cpus}, [rows, {args.hidden}] {args.dtype}, median of {args.rounds} rounds "
          f"(rank 0, us per all-reduce)")
    print(f"{'rows':>6} {'KiB':>7} {'gloo us':>9} {'shm us':>9} {'gloo/shm':>9}  bitwise equal")
    rows_out = []
    for rows in args.rows:
        kib = rows * args.hidden * torch.empty((), dtype=getattr(torch, args.dtype)).element_size() / 1024
        g, s = med[f"{rows}:gloo"] * 1e6, med[f"{rows}:shm"] * 1e6
        print(f"{rows:>6} {kib:>7.0f} {g:>9.1f} {s:>9.1f} {g / s:>9.1f}  {result['equal'][rows]}")
        rows_out.append({"rows": rows, "kib": kib, "gloo_us": g, "shm_us": s})
    info = {"cpus": args.cpus, "dtype": args.dtype, "hidden": args.hidden, "torch": torch.__version__,
            "load": os.getloadavg()[0], "results": rows_out, "raw": result["times"]}
    print(f"torch {torch.__version__}, load {info['load']:.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
