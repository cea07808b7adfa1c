"""The launcher of a node other than node 0 in a multi-node run (`--nnodes N --node-rank R`, R > 0).

Node R holds ranks [R * L, (R + 1) * L) with L = world_size / nnodes: it runs the first of them in this process
and starts the others as worker processes; all join node 0's rendezvous at --master-addr:--master-port
(torch.distributed's TCP-store rendezvous, the one env:// uses). Node 0 (the ordinary `serve` / `generate`) starts its own workers and
serves. The rendezvous and the collectives are unauthenticated: run them on a private network only.
"""
from __future__ import annotations

import logging

import torch

from frontierlm.distributed.executor import local_ranks, spawn_workers
from frontierlm.distributed.worker import run_worker

logger = logging.getLogger("frontierlm.launch")


def run_worker_node(config) -> int:
    """Serve this node's ranks until node 0 stops (0) or the run breaks (1)."""
    ranks = local_ranks(config, config.node_rank)
    logging.getLogger("frontierlm").setLevel(logging.INFO)
    print(f"node {config.node_rank} of {config.nnodes}: ranks {ranks.start}-{ranks.stop - 1} of "
          f"{config.world_size}, rendezvous at {config.master_addr}:{config.master_port}", flush=True)
    procs = spawn_workers(config, ranks[1:], config.master_port, torch.get_num_threads())
    code = run_worker(config, ranks.start, config.master_port)
    for p in procs:
        code = max(code, p.wait())
        p.stdin.close()
    return 1 if code else 0
