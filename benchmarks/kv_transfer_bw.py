"""Bandwidth and per-pull latency of the KV transports (frontierlm/kv_transfer): torch.distributed over gloo,
and Mooncake's transfer engine (TCP) where it is installed. Two processes on loopback: rank 0 serves packed
blocks, rank 1 pulls them, through the same Transport classes the engines use.

    python benchmarks/kv_transfer_bw.py [--sizes-kib 64 1024 16384] [--pulls 20] [--cpus 1]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def transport(kind: str, rank: int, port: int):
    """Rank 0 is the producer (it hosts its KV store at `port`), rank 1 the consumer."""
    cfg = SimpleNamespace(kv_ip="127.0.0.1", kv_port=port, is_producer=rank == 0,
                          extra=lambda k: {"transfer_timeout_s": 60.0, "backend": "gloo"}[k])
    if kind == "mooncake":
        from frontierlm.kv_transfer.mooncake import MooncakeTransport

        return MooncakeTransport(cfg)
    from frontierlm.kv_transfer.torch_dist import TorchDistributedTransport

    return TorchDistributedTransport("127.0.0.1", port, 60.0, producer=rank == 0)


def producer_peer(port: int):
    """The producer as its kv_transfer_params would name it (its engine id is in the store it hosts)."""
    import datetime

    import torch.distributed as dist

    from frontierlm.kv_transfer.base import Peer

    deadline = time.time() + 120
    while True:
        try:
            store = dist.TCPStore("127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=60))
            return Peer("127.0.0.1", port, store.get("engine_id").decode())
        except RuntimeError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)


def worker(kind: str, rank: int, port: int, sizes: list[int], pulls: int) -> None:
    import torch

    torch.set_num_threads(1)
    t = transport(kind, rank, port)
    numel = 8192  # one block row: 32 KiB of float32
    if rank == 0:
        data = {s: torch.randn(max(1, s // 32), numel) for s in sizes}
        t.start(lambda tid, start, count: (data[tid][:count], 7), lambda tid, sent: None)
        time.sleep(3600)
    peer = producer_peer(port)
    rows = []
    for s in sizes:
        n = max(1, s // 32)
        out = torch.empty(n, numel)
        t.pull(peer, s, 0, n, out)  # warm-up (the first one pairs)
        times = []
        for _ in range(pulls):
            t0 = time.perf_counter()
            t.pull(peer, s, 0, n, out)
            times.append(time.perf_counter() - t0)
        times.sort()
        nbytes = out.numel() * 4
        rows.append({"transport": kind, "kib": nbytes // 1024, "p50_ms": round(times[len(times) // 2] * 1e3, 3),
                     "min_ms": round(times[0] * 1e3, 3),
                     "MB_per_s_at_p50": round(nbytes / times[len(times) // 2] / 1e6, 1)})
    print(json.dumps(rows), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes-kib", type=int, nargs="+", default=[64, 1024, 16384])
    p.add_argument("--pulls", type=int, default=20)
    p.add_argument("--cpus", default="1")
    p.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker[0], int(a.worker[1]), int(a.worker[2]), a.sizes_kib, a.pulls)
        return 0
    kinds = ["gloo"]
    try:
        import mooncake.engine  # noqa: F401

        kinds.append("mooncake")
    except ImportError as e:
        print(f"mooncake: not measured ({e})")
    print("load", os.getloadavg())
    for kind in kinds:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base = ["taskset", "-c", a.cpus, sys.executable, __file__, "--sizes-kib", *map(str, a.sizes_kib),
                "--pulls", str(a.pulls), "--worker", kind]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOG_minloglevel="2")
        server = subprocess.Popen(base + ["0", str(port)], env=env, stderr=subprocess.DEVNULL)
        try:
            out = subprocess.run(base + ["1", str(port)], env=env, capture_output=True, text=True, timeout=900)
            for row in json.loads(out.stdout.strip().splitlines()[-1]):
                print(row)
        finally:
            server.kill()
    print("load", os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
