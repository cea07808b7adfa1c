"""A worker rank: builds its shard of the model, then serves the driver's commands until told to stop.

Started by the driver (`python -m frontierlm.distributed.worker`, start-up arguments pickled on stdin) or by
`frontierlm serve ... --node-rank R` on another node (`run_worker`). It exits when the driver says stop, when
its stdin closes (the driver process is gone), or when a collective fails or times out.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
import threading

import torch
import torch.distributed as dist

from frontierlm.distributed import protocol
from frontierlm.distributed.pipeline import StageQueue
from frontierlm.distributed.state import ParallelContext, building, init_process_groups, step_broadcast

logger = logging.getLogger("frontierlm.worker")


def resolve_model_config(config):
    """The ModelConfig the driver's engine builds (same checkpoint, same dtype rule)."""
    from frontierlm.config import ModelConfig

    mc = ModelConfig.from_pretrained(config.model, config.torch_dtype, config.load_format)
    if config.dtype == "auto":
        from frontierlm.engine.dtype_policy import choose_dtype

        mc.dtype, _ = choose_dtype(mc.dtype, torch.device(config.device))
    from frontierlm.quant.engine import configure_model

    configure_model(mc, config)  # quantization and KV-cache dtype, as the driver's engine records them
    return mc


class Worker:
    def __init__(self, config, rank: int, port: int):
        from frontierlm.distributed.executor import device_for
        from frontierlm.models.loader import load_model

        self.config = config
        self.mc = resolve_model_config(config)
        self.ctx = ParallelContext(rank=rank, tp_size=config.tensor_parallel_size,
                                   pp_size=config.pipeline_parallel_size,
                                   enable_expert_parallel=config.enable_expert_parallel,
                                   device=device_for(config, rank))
        if self.ctx.device.type == "cuda":
            torch.cuda.set_device(self.ctx.device)
        init_process_groups(self.ctx, config.master_addr, port)
        with building(self.ctx):
            self.model = load_model(self.mc, self.ctx.device, config.load_format, seed=config.seed)
        self.stages = StageQueue(self.model, self.ctx)
        dist.barrier()  # every rank has its shard (start-up timeout); the driver's steps follow

    @torch.inference_mode()
    def serve(self) -> None:
        device = self.ctx.device
        while True:
            cmd, *f = protocol.receive_header(device, self.ctx.control_group)
            if cmd == protocol.STEP:  # a tick; fields all 0 when it brings no new batch
                num_tokens, num_seqs, width = f[0], f[1], f[2]
                batch = None
                if num_tokens:
                    payload = torch.empty(protocol.payload_size(num_tokens, num_seqs, width), dtype=torch.int64,
                                          device=device)
                    step_broadcast(self.ctx, payload, self.ctx.control_group)
                    batch = protocol.unpack_step(payload, *f[:6])
                self.stages.tick(batch)
            elif cmd == protocol.LOGITS:
                if self.ctx.is_first_stage:
                    hidden = torch.empty(f[0], f[1], dtype=self.mc.dtype, device=device)
                    step_broadcast(self.ctx, hidden, self.ctx.head_group)
                    self.model.compute_logits(hidden)
            elif cmd == protocol.MTP:
                if self.ctx.is_first_stage:
                    self._mtp_forward(f)
            elif cmd == protocol.MTP_ALLOC:
                if self.ctx.is_first_stage:
                    self.model.allocate_mtp_kv_cache(f[0], f[1])
            elif cmd == protocol.ALLOC:
                shapes = self.model.kv_cache_shapes(f[0], f[1])
                dtype = self.mc.kv_cache_dtype or self.mc.dtype
                self.model.bind_kv_cache([torch.zeros(s, dtype=dtype, device=device) for s in shapes])
            elif cmd == protocol.KV_BLOCKS:
                from frontierlm.distributed.executor import rank_kv_blocks

                mine = rank_kv_blocks(self.config, self.mc, self.model, device, f[0])
                dist.all_gather([torch.empty_like(mine) for _ in range(self.ctx.world_size)], mine,
                                group=self.ctx.control_group)
            elif cmd == protocol.STOP:
                return
            elif cmd != protocol.PING:
                raise RuntimeError(f"unknown command {cmd} from the driver")

    def _mtp_forward(self, f: list[int]) -> None:
        """This rank's shard of one MTP forward (DriverModel.mtp_forward): rows over the proposer's cache and
        the previous hidden states; the driver keeps the (all-reduced, replicated) output."""
        device, group = self.ctx.device, self.ctx.head_group
        payload = torch.empty(protocol.payload_size(f[0], f[1], f[2]), dtype=torch.int64, device=device)
        dist.broadcast(payload, 0, group=group)
        ids, pos, meta = protocol.unpack_step(payload, *f[:6])
        previous = torch.empty(f[0], self.mc.hidden_size, dtype=self.mc.dtype, device=device)
        dist.broadcast(previous, 0, group=group)
        self.model.mtp_forward(ids, pos, previous, f[6], return_next_hidden=True, attn_meta=meta)


def run_worker(config, rank: int, port: int, threads: int | None = None) -> int:
    """Build and serve one rank; 0 on a clean stop, 1 when the run broke (the reason is logged)."""
    if threads:
        torch.set_num_threads(threads)
    try:
        worker = Worker(config, rank, port)
        worker.serve()
    except Exception as e:
        logger.error("worker rank %d stops: %s: %s", rank, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _exit_when_stdin_closes(stream) -> None:
    stream.read()  # returns at EOF: the driver is gone
    os._exit(1)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = pickle.load(sys.stdin.buffer)
    threading.Thread(target=_exit_when_stdin_closes, args=(sys.stdin.buffer,), daemon=True).start()
    os.environ.setdefault("FRONTIERLM_DECODE_WARMUP_STEPS", str(10**9))
    code = run_worker(args["config"], args["rank"], args["port"], args["threads"])
    os._exit(code)


if __name__ == "__main__":
    main()
