"""Checks of the parallel fields of EngineConfig that need no model (the model's are in checks.py)."""
from __future__ import annotations

import torch


def check_parallel_config(config, device: torch.device) -> None:
    tp, pp, world, nnodes = config.tensor_parallel_size, config.pipeline_parallel_size, config.world_size, config.nnodes
    if config.distributed_executor_backend not in (None, "mp"):
        raise ValueError(f"distributed_executor_backend={config.distributed_executor_backend!r} is not supported: "
                         "FrontierLM starts its own processes ('mp'); on several nodes run one launcher per node "
                         "(--nnodes/--node-rank), no Ray cluster needed")
    if not isinstance(config.node_rank, int) or not 0 <= config.node_rank < nnodes:
        raise ValueError(f"node_rank must be in [0, nnodes={nnodes}), got {config.node_rank!r}")
    if world % nnodes:
        raise ValueError(f"{nnodes} nodes do not divide the {world} ranks (tensor_parallel_size={tp} x "
                         f"pipeline_parallel_size={pp})")
    per_node = world // nnodes
    if nnodes > 1 and per_node % tp and tp % per_node:
        raise ValueError(f"{per_node} ranks per node split tensor_parallel_size={tp} unevenly")
    if nnodes > 1 and config.master_port is None:
        raise ValueError("several nodes need --master-port (and --master-addr): every node must name the same one")
    if config.master_port is not None and not (isinstance(config.master_port, int) and 0 < config.master_port < 65536):
        raise ValueError(f"master_port must be a TCP port in 1..65535, got {config.master_port!r}")
    if device.type == "cuda" and per_node > torch.cuda.device_count():
        raise ValueError(f"{per_node} ranks on this node but only {torch.cuda.device_count()} CUDA device(s) visible")
    if world == 1:
        return
    if getattr(config, "kv_transfer_config", None) is not None:
        raise ValueError("kv_transfer_config (disaggregated prefill / decode) with tensor/pipeline parallelism is "
                         "not supported yet")
    if config.enforce_eager is False:
        raise ValueError("the compiled / CUDA-graphed decode step is single-device only: a parallel run is eager "
                         "(leave enforce_eager unset or True)")
    config.enforce_eager = True
