"""Rank 0's side of a parallel run: starts the local workers, joins the process groups, and stands in for the
model in the model runner (`DriverModel`), so the one step (schedule -> execute -> update) is unchanged.

Each forward the driver sends the step to every worker (protocol.py), then runs its own shard; the logits it
samples from are gathered from the vocab-parallel LM head. A heartbeat keeps idle workers inside the collective
timeout and notices a dead one while no request runs. Any failure of a collective ends the engine with a
`WorkerFailure` that says which rank died or stopped answering; the workers exit on their own when the driver
goes away (their stdin closes, or their next collective fails).
"""
from __future__ import annotations

import atexit
import copy
import logging
import pickle
import socket
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from frontierlm.distributed import protocol
from frontierlm.distributed.pipeline import StageQueue
from frontierlm.distributed.state import (ParallelContext, building, collective_timeout_s, init_process_groups,
                                         step_broadcast)

logger = logging.getLogger(__name__)


def rank_kv_blocks(config, model_config, model, device: torch.device, max_model_len: int) -> torch.Tensor:
    """[blocks, bytes per block] of this rank: its own budget (device memory, kv_cache_memory_gb) over its own
    share of the cache (its KV heads, its stage's layers); engine/kv_budget.py's rule."""
    from frontierlm.engine.kv_budget import bytes_per_block, kv_budget_bytes

    size = bytes_per_block(model, config.block_size, model_config.kv_cache_dtype or model_config.dtype)
    budget = kv_budget_bytes(config, model_config, device, size, max_model_len)
    return torch.tensor([max(int(budget // size), 0), size], dtype=torch.int64, device=device)


class WorkerFailure(RuntimeError):
    """A worker died, hung, or the process group broke: the engine cannot go on."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_ranks(config, node_rank: int) -> range:
    per_node = config.world_size // config.nnodes
    return range(node_rank * per_node, (node_rank + 1) * per_node)


def device_for(config, rank: int) -> torch.device:
    device = torch.device(config.device)
    if device.type == "cuda":
        return torch.device("cuda", rank % (config.world_size // config.nnodes))
    return device


def spawn_workers(config, ranks, port: int, threads: int) -> list[subprocess.Popen]:
    """One `python -m frontierlm.distributed.worker` per rank; its start-up arguments come pickled on stdin,
    which stays open: when this process dies the pipe closes and the worker exits."""
    config = copy.copy(config)
    config.logits_processors = []  # rank 0 samples; a worker never needs them (nor to unpickle user classes)
    procs = []
    for rank in ranks:
        p = subprocess.Popen([sys.executable, "-m", "frontierlm.distributed.worker"], stdin=subprocess.PIPE)
        p.stdin.write(pickle.dumps({"config": config, "rank": rank, "port": port, "threads": threads}))
        p.stdin.flush()
        procs.append(p)
    return procs


_active: list = []  # the driver of this process (one default process group per process)


class DistributedExecutor:
    def __init__(self, config, model_config):
        from frontierlm.distributed.checks import check_layout

        check_layout(model_config, config.tensor_parallel_size, config.pipeline_parallel_size,
                     config.enable_expert_parallel)
        for old in list(_active):  # one process group per process: a newer engine replaces the older one
            logger.warning("shutting down the previous parallel engine of this process")
            old.shutdown()
        self.config, self.model_config = config, model_config
        self.local_model = None  # this rank's shard, once loaded
        self.kv_per_rank: list[tuple[int, int]] = []  # (blocks its budget holds, bytes per block) per rank
        self.timeout = collective_timeout_s()
        port = config.master_port or free_port(config.master_addr)
        self.ctx = ParallelContext(rank=0, tp_size=config.tensor_parallel_size, pp_size=config.pipeline_parallel_size,
                                   enable_expert_parallel=config.enable_expert_parallel, device=device_for(config, 0))
        self.procs = spawn_workers(config, local_ranks(config, 0)[1:], port, torch.get_num_threads())
        self.failure: WorkerFailure | None = None
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._closed = False
        try:
            init_process_groups(self.ctx, config.master_addr, port)
        except BaseException as e:
            why = self._describe(e)
            self._kill()
            raise WorkerFailure(f"the workers did not join the process group at {config.master_addr}:{port}: "
                                f"{why}") from e
        _active.append(self)
        atexit.register(self.shutdown)

    # ---- the model ---------------------------------------------------------------------------------
    def load_model(self, model_config, load):
        """`load()` (models/loader.py) with this rank's shards; returns the driver's stand-in for the model."""
        try:
            with building(self.ctx):
                model = load()
        except BaseException:  # e.g. a checkpoint error: the workers would wait at the barrier for nothing
            self.failure = WorkerFailure("rank 0 failed to load the model")
            self._kill()
            self.shutdown()
            raise
        try:  # every rank has its shard (start-up timeout): from here on, steps
            with self._lock:
                dist.barrier()
                self._last = time.monotonic()
        except Exception as e:
            self.failure = WorkerFailure(f"the workers failed to load the model: {self._describe(e)}")
            self._kill()
            raise self.failure from None
        threading.Thread(target=self._beat, name="frontierlm-heartbeat", daemon=True).start()
        self.local_model = model
        return DriverModel(model, self)

    def agree_num_kv_blocks(self, max_model_len: int) -> int:
        """Every rank sizes the cache from its own budget and share; all keep the fewest blocks (one block id
        names the same tokens on every rank)."""
        mine = rank_kv_blocks(self.config, self.model_config, self.local_model, self.ctx.device, max_model_len)

        def run():
            parts = [torch.empty_like(mine) for _ in range(self.ctx.world_size)]
            dist.all_gather(parts, mine, group=self.ctx.control_group)
            return parts

        parts = self.command(protocol.KV_BLOCKS, max_model_len, then=run)
        self.kv_per_rank = [(int(p[0]), int(p[1])) for p in parts]
        rank = min(range(len(parts)), key=lambda r: self.kv_per_rank[r][0])
        blocks, size = self.kv_per_rank[rank]
        if blocks < 1:
            self.shutdown()
            raise ValueError(f"the KV-cache budget of rank {rank} holds no block of {size} bytes; raise "
                             "kv_cache_memory_gb or gpu_memory_utilization")
        return blocks

    # ---- commands ----------------------------------------------------------------------------------
    def command(self, cmd: int, *fields: int, then=None):
        """Header to every rank, then `then()` (more collectives), all under the lock the heartbeat shares."""
        self.check_health()
        with self._lock:
            try:
                protocol.send_header(cmd, *fields, device=self.ctx.device, group=self.ctx.control_group)
                out = then() if then is not None else None
            except Exception as e:
                self.failure = WorkerFailure(f"parallel engine failed during {protocol.COMMANDS[cmd]}: "
                                             f"{self._describe(e)}")
                self._kill()
                logger.error("%s", self.failure)
                raise self.failure from None
            self._last = time.monotonic()
            return out

    def describe(self) -> str:
        c = self.config
        shm = getattr(self.ctx.tp_reduce, "shm", None)
        reduce = (f"; TP all-reduce over shared memory (up to {shm.slot / 2**20:g} MiB, larger through "
                  f"{dist.get_backend()})" if shm is not None else "")
        kv = ""
        if self.kv_per_rank:  # bytes per token and the blocks each rank's own budget holds
            kv = (f"; KV per rank: {[s // c.block_size for _, s in self.kv_per_rank]} bytes/token, "
                  f"{[b for b, _ in self.kv_per_rank]} blocks fit, the fewest kept")
        return (f"TP={c.tensor_parallel_size} x PP={c.pipeline_parallel_size}"
                f"{' (experts: EP)' if c.enable_expert_parallel else ''}, {c.world_size} ranks on {c.nnodes} "
                f"node(s), {dist.get_backend()}{reduce}; each rank caches its own KV heads / stage layers{kv}"
                f"{f'; up to {c.pipeline_parallel_size} batches in flight' if c.pipeline_parallel_size > 1 else ''}")

    def check_health(self) -> None:
        if self._closed and self.failure is None:
            raise WorkerFailure("this parallel engine was shut down (a newer one started in this process, or the "
                                "process is exiting)")
        if self.failure is not None:
            raise self.failure

    def _describe(self, error: BaseException) -> str:
        dead = [f"rank {r} (pid {p.pid}) exited with status {p.returncode}"
                for r, p in zip(local_ranks(self.config, 0)[1:], self.procs) if p.poll() is not None]
        if dead:
            return "; ".join(dead)
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} (a worker died or " \
               f"hung: no answer within {self.timeout:.0f}s, FRONTIERLM_DIST_TIMEOUT_S)"

    def _beat(self) -> None:
        interval = max(self.timeout / 4, 0.2)
        while not self._closed and self.failure is None:
            time.sleep(min(interval, 1.0))
            dead = [p for p in self.procs if p.poll() is not None]
            if dead and self.failure is None and not self._closed:
                self.failure = WorkerFailure(f"parallel engine failed: {self._describe(RuntimeError())}")
                self._kill()
                logger.error("%s", self.failure)
                return
            if time.monotonic() - self._last > interval and self._lock.acquire(blocking=False):
                try:
                    if not self._closed and self.failure is None:
                        protocol.send_header(protocol.PING, device=self.ctx.device, group=self.ctx.control_group)
                        self._last = time.monotonic()
                except Exception as e:
                    self.failure = WorkerFailure(f"parallel engine failed (heartbeat): {self._describe(e)}")
                    self._kill()
                    logger.error("%s", self.failure)
                finally:
                    self._lock.release()

    # ---- shutdown ----------------------------------------------------------------------------------
    def _kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self in _active:
            _active.remove(self)
        if self.failure is None:
            try:
                with self._lock:
                    protocol.send_header(protocol.STOP, device=self.ctx.device, group=self.ctx.control_group)
                for p in self.procs:
                    p.wait(10)
            except Exception:  # a broken group: nothing to say goodbye to
                pass
        self._kill()
        shm = getattr(self.ctx.tp_reduce, "shm", None)
        if shm is not None:  # the buffer's name is long gone; unmapping frees it
            shm.close()
        if dist.is_initialized():  # so that a later engine of this process can start its own group
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group may refuse; the process keeps no use for it
                pass


class DriverModel:
    """The model as rank 0's runner sees it: calling it runs the step on every rank, compute_logits gathers the
    vocab-parallel head; everything else is the local model's (expert load, KV shapes, ...)."""

    def __init__(self, model, executor: DistributedExecutor):
        self.model, self.executor, self.ctx = model, executor, executor.ctx
        self.stages = StageQueue(model, self.ctx)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def tick(self, input_ids=None, positions=None, attn_meta=None) -> torch.Tensor | None:
        """One pipeline tick on every rank, bringing this batch (or none): the final hidden states of the
        batch that entered pp - 1 ticks ago, or None (pipeline.StageQueue)."""
        if input_ids is None:
            return self.executor.command(protocol.STEP, then=lambda: self.stages.tick(None))
        if attn_meta is None or not hasattr(attn_meta, "query_lens_cpu"):
            raise ValueError("a parallel model runs only the engine's paged step (attn_meta from the runner)")
        fields = protocol.step_fields(input_ids, attn_meta)

        def run():
            payload = protocol.pack_step(input_ids, positions, attn_meta)
            step_broadcast(self.ctx, payload, self.ctx.control_group)
            return self.stages.tick((input_ids, positions, attn_meta))

        return self.executor.command(protocol.STEP, *fields, then=run)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attn_meta) -> torch.Tensor:
        """The synchronous step: this batch through every stage, then its final hidden states."""
        if any(f is not None for f in self.stages.finals):
            raise RuntimeError("a synchronous step while pipelined batches are in flight")
        out = self.tick(input_ids, positions, attn_meta)
        for _ in range(self.ctx.pp_size - 1):
            out = self.tick()
        return out

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return self.model.compute_logits(hidden_states)

        def run():
            step_broadcast(self.ctx, hidden_states.contiguous(), self.ctx.head_group)
            return self.model.compute_logits(hidden_states)

        return self.executor.command(protocol.LOGITS, *hidden_states.shape, then=run)

    def kv_cache_shapes(self, num_blocks: int, block_size: int):
        self.executor.command(protocol.ALLOC, num_blocks, block_size)
        return self.model.kv_cache_shapes(num_blocks, block_size)

    # ---- the MTP proposer (spec/mtp.py): the module is tensor-parallel like the layers it follows, so its
    # forward runs on every TP rank of stage 0 (where it lives, beside the embedding and head it shares) ----
    def allocate_mtp_kv_cache(self, num_blocks: int, block_size: int) -> torch.Tensor:
        if self.ctx.tp_size > 1:
            self.executor.command(protocol.MTP_ALLOC, num_blocks, block_size)
        return self.model.allocate_mtp_kv_cache(num_blocks, block_size)

    def mtp_forward(self, input_ids, positions, previous_hidden, depth: int = 0, return_next_hidden: bool = False,
                    attn_meta=None, plan=None):
        if self.ctx.tp_size == 1:  # the whole module is rank 0's (pipeline parallel alone): nothing to send
            return self.model.mtp_forward(input_ids, positions, previous_hidden, depth, return_next_hidden,
                                          attn_meta, plan)
        if attn_meta is None or plan is not None or not hasattr(attn_meta, "query_lens_cpu"):
            raise ValueError("a tensor-parallel MTP module runs only the proposer's paged forward (attn_meta from "
                             "spec/paged.py, no compiled plan)")
        previous_hidden = previous_hidden.to(self.executor.model_config.dtype).contiguous()

        def run():
            group = self.ctx.head_group
            dist.broadcast(protocol.pack_step(input_ids, positions, attn_meta), 0, group=group)
            dist.broadcast(previous_hidden, 0, group=group)
            return self.model.mtp_forward(input_ids, positions, previous_hidden, depth, return_next_hidden,
                                          attn_meta)

        return self.executor.command(protocol.MTP, *protocol.step_fields(input_ids, attn_meta), depth, then=run)

    def mtp_logits(self, mtp_hidden: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(mtp_hidden)  # the MTP module's head is the model's (shared) LM head

    def eval(self):
        return self
