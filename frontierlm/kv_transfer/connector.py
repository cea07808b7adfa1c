"""The connector: the scheduler side (block accounting on the engine thread) over a Transport (worker side).

Producer (prefill instance): a request sent with kv_transfer_params {"do_remote_decode": true} keeps its
blocks when it finishes; its output carries kv_transfer_params naming this producer (remote_host,
remote_port, remote_engine_id), a transfer id and the number of whole prompt blocks. The blocks are held
until a consumer has pulled them or hold_timeout_s passes.
Consumer (decode instance): a request arriving with those parameters first looks up its own prefix cache; only
the whole prompt blocks past that hit are pulled (blocks it already holds by hash are never sent). They are
allocated at admission, the request waits (WAITING_FOR_REMOTE_KVS) while a worker thread pulls them (up to
MAX_PULLS requests' pulls at once), and the engine thread copies them into the cache; the request then runs
with those tokens computed, like a prefix-cache hit, and they are hashed into the prefix cache. A failed pull
(peer gone or restarted, blocks no longer held, hashes that differ) leaves the blocks allocated and the request
computes them itself: a local-prefill fallback, counted."""
from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from frontierlm.engine.request import Request, RequestStatus
from frontierlm.kv_transfer.base import KVConnectorScheduler, Peer, Transport
from frontierlm.kv_transfer.blocks import BlockIO
from frontierlm.kv_transfer.config import KVTransferConfig
from frontierlm.logger import init_logger

logger = init_logger(__name__)


@dataclass
class _Held:
    request_id: str
    blocks: list  # kv_cache.Block, one reference each held by this connector
    token_ids: list[int]  # the prompt, to prove to a consumer which tokens the blocks hold
    deadline: float
    busy: bool = False  # the serving thread is reading them
    sent: bool = False
    num_sent: int = 0  # blocks the consumer pulled (the ones past its own prefix-cache hit)


@dataclass
class _Load:
    request: Request
    start: int  # first block pulled (the local hit ends here)
    dst: list[int]
    buffer: torch.Tensor
    expected_hash: int
    future: Future
    t0: float


@dataclass
class TransferStats:
    blocks_sent: int = 0
    bytes_sent: int = 0
    blocks_received: int = 0
    bytes_received: int = 0
    blocks_skipped: int = 0  # prompt blocks a consumer already held in its prefix cache
    transfers: int = 0  # successful pulls
    failures: int = 0
    local_prefill_fallbacks: int = 0
    holds_expired: int = 0
    seconds_sum: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=64))  # per request: blocks, bytes, seconds

    def as_dict(self, held: int, loading: int) -> dict:
        out = {k: getattr(self, k) for k in ("blocks_sent", "bytes_sent", "blocks_received", "bytes_received",
                                            "blocks_skipped", "transfers", "failures", "local_prefill_fallbacks",
                                            "holds_expired", "seconds_sum")}
        return {**out, "held": held, "loading": loading, "recent": list(self.recent)}


def prefix_digest(token_ids: list[int]) -> int:
    """The same on every instance (ints hash alike in every process, unlike the prefix cache's chained keys,
    which start from None), so a consumer can check that the blocks it got hold its own prompt."""
    return hash(tuple(token_ids))


MAX_PULLS = 4  # pulls in flight at once on a consumer


def peer_of(params: dict) -> Peer:
    return Peer(params["remote_host"], params["remote_port"], params["remote_engine_id"])


def params_of(request: Request) -> dict:
    extra = request.sampling_params.extra_args or {}
    params = extra.get("kv_transfer_params")
    return params if isinstance(params, dict) else {}


class KVConnector(KVConnectorScheduler):
    def __init__(self, config: KVTransferConfig, kv, kv_caches: list[torch.Tensor], transport: Transport):
        self.config, self.kv, self.bs = config, kv, kv.block_size
        self.io = BlockIO(kv_caches)
        self.transport = transport
        self.hold_timeout = float(config.extra("hold_timeout_s"))
        self.stats = TransferStats()
        self._lock = threading.Lock()
        self._held: dict[int, _Held] = {}
        self._params: dict[str, dict] = {}
        self._ids = itertools.count(1)
        self._loads: dict[str, _Load] = {}
        self._tried: weakref.WeakSet = weakref.WeakSet()  # requests that had their one pull
        # pulls for different requests run side by side (a slow one does not hold up the others)
        self._pool = ThreadPoolExecutor(max_workers=MAX_PULLS, thread_name_prefix="kv-transfer-pull")
        if config.is_producer:
            transport.start(self._serve, self._served)

    # ---- producer ------------------------------------------------------------------------------------
    def request_finished(self, request: Request) -> bool:
        """True: the connector keeps the request's blocks (the caller must not free them)."""
        if not (self.config.is_producer and params_of(request).get("do_remote_decode")
                and request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
                and request.sampling_params.n == 1):
            return False
        n = min((request.num_prompt_tokens - 1) // self.bs, len(self.kv.block_ids(request.request_id)))
        tid = next(self._ids)
        self._params[request.request_id] = {"do_remote_prefill": True, **self.transport.address(),
                                            "transfer_id": tid, "num_blocks": n, "block_size": self.bs}
        if n == 0:
            return False  # nothing whole to send: the consumer computes the short prompt itself
        blocks = self.kv.detach(request)
        keep, rest = blocks[:n], blocks[n:]
        self.kv.free_blocks(rest)
        with self._lock:
            self._held[tid] = _Held(request.request_id, keep, list(request.prompt_token_ids),
                                    time.monotonic() + self.hold_timeout)
        return True

    def transfer_params(self, request_id: str) -> dict | None:
        return self._params.pop(request_id, None)

    def _serve(self, transfer_id: int, start: int, count: int):  # the transport's thread
        with self._lock:
            held = self._held.get(transfer_id)
            if held is None or held.sent or start < 0 or count <= 0 or start + count > len(held.blocks):
                return None
            held.busy, held.num_sent = True, count
            ids = [b.block_id for b in held.blocks[start:start + count]]
        return self.io.gather(ids), prefix_digest(held.token_ids[:(start + count) * self.bs])

    def _served(self, transfer_id: int, sent: bool) -> None:  # the transport's thread
        with self._lock:
            held = self._held.get(transfer_id)
            if held is None:
                return
            held.busy = False
            if sent:
                held.sent = True

    def poll(self) -> None:
        """Engine thread, each step: give back blocks that were sent or whose hold expired."""
        now, done = time.monotonic(), []
        with self._lock:
            for tid, held in list(self._held.items()):
                if held.sent or (now > held.deadline and not held.busy):
                    done.append(self._held.pop(tid))
        for held in done:
            if held.sent:
                self.stats.blocks_sent += held.num_sent
                self.stats.bytes_sent += held.num_sent * self.io.bytes_per_block
            else:
                self.stats.holds_expired += 1
            self.kv.free_blocks(held.blocks)

    # ---- consumer --------------------------------------------------------------------------------------
    def _usable(self, request: Request) -> dict | None:
        p = params_of(request)
        if not self.config.is_consumer or not p.get("do_remote_prefill") or request in self._tried:
            return None
        ok = (all(isinstance(p.get(k), int) and not isinstance(p.get(k), bool) and p[k] >= 0
                  for k in ("remote_port", "transfer_id", "num_blocks")) and p.get("block_size") == self.bs
              and isinstance(p.get("remote_host"), str) and isinstance(p.get("remote_engine_id"), str))
        if not ok:
            self._tried.add(request)
            self.stats.local_prefill_fallbacks += 1
            logger.warning("request %s: unusable kv_transfer_params %s; prefilling locally", request.request_id, p)
            return None
        return p

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        p = self._usable(request)
        if p is None:
            return 0
        n = min(p["num_blocks"], (request.num_prompt_tokens - 1) // self.bs)
        have = num_computed_tokens // self.bs
        if n <= have:
            self._tried.add(request)
            self._pool.submit(self._release, peer_of(p), p["transfer_id"])
            self.stats.blocks_skipped += n
            self.stats.recent.append({"request_id": request.request_id, "blocks": 0, "bytes": 0, "seconds": 0.0,
                                      "skipped": n})
            return 0
        return (n - have) * self.bs

    def _release(self, peer: Peer, transfer_id: int) -> None:
        try:
            self.transport.release(peer, transfer_id)
        except (RuntimeError, ValueError, LookupError) as e:  # the producer's hold expires on its own
            logger.warning("releasing transfer %d at %s:%d failed: %s", transfer_id, peer.host, peer.port, e)

    def start_load(self, request: Request, num_computed_tokens: int, num_external_tokens: int) -> None:
        p = params_of(request)
        start, count = num_computed_tokens // self.bs, num_external_tokens // self.bs
        self._tried.add(request)
        dst = self.kv.block_ids(request.request_id)[start:start + count]
        expected = prefix_digest(request.prompt_token_ids[:(start + count) * self.bs])
        buffer = self.io.empty(count)
        future = self._pool.submit(self.transport.pull, peer_of(p), p["transfer_id"], start, count, buffer)
        self._loads[request.request_id] = _Load(request, start, dst, buffer, expected, future, time.monotonic())

    def cancel_load(self, request: Request) -> None:
        self._loads.pop(request.request_id, None)  # the pull may still land in its buffer; nobody reads it

    @property
    def num_loading(self) -> int:
        return len(self._loads)

    def take_finished(self) -> list[Request]:
        """Engine thread: requests whose pull ended, their cache filled (or not, on failure)."""
        out = []
        for rid, load in list(self._loads.items()):
            if not load.future.done():
                continue
            del self._loads[rid]
            request, count = load.request, len(load.dst)
            err = load.future.exception()
            if err is None and load.future.result() != load.expected_hash:
                err = ValueError("the remote blocks hold a different prompt (hash mismatch)")
            seconds = time.monotonic() - load.t0
            if err is None:
                self.io.scatter(load.dst, load.buffer)
                request.num_computed_tokens = (load.start + count) * self.bs
                nbytes = count * self.io.bytes_per_block
                self.stats.transfers += 1
                self.stats.blocks_received += count
                self.stats.bytes_received += nbytes
                self.stats.blocks_skipped += load.start
                self.stats.seconds_sum += seconds
                self.stats.recent.append({"request_id": rid, "blocks": count, "bytes": nbytes, "seconds": seconds,
                                          "skipped": load.start})
            else:
                self.stats.failures += 1
                self.stats.local_prefill_fallbacks += 1
                logger.warning("request %s: pulling %d KV blocks failed (%s); prefilling locally", rid, count, err)
            out.append(request)
        return out

    # ---- both ----------------------------------------------------------------------------------------------
    def busy(self) -> bool:
        return bool(self._held or self._loads)

    def get_stats(self) -> dict:
        return self.stats.as_dict(len(self._held), len(self._loads))


def make_connector(config: KVTransferConfig, kv, kv_caches: list[torch.Tensor]) -> KVConnector:
    timeout, backend, device = float(config.extra("transfer_timeout_s")), config.extra("backend"), kv_caches[0].device
    if backend == "gloo" and device.type != "cpu":
        raise ValueError(f"kv_connector_extra_config.backend 'gloo' moves CPU caches; this one is on {device} "
                         f"(use 'nccl')")
    if config.kv_connector == "MooncakeConnector":
        if backend != "gloo":
            raise ValueError("MooncakeConnector moves the blocks itself: its backend (the control messages) is gloo")
        from frontierlm.kv_transfer.mooncake import MooncakeTransport

        transport = MooncakeTransport(config)
    elif backend == "nccl":
        from frontierlm.kv_transfer.nccl import NcclTransport

        transport = NcclTransport(config.kv_ip, config.kv_port, timeout, config.is_producer, device)
    else:
        from frontierlm.kv_transfer.torch_dist import TorchDistributedTransport

        transport = TorchDistributedTransport(config.kv_ip, config.kv_port, timeout, producer=config.is_producer)
    return KVConnector(config, kv, kv_caches, transport)
