"""torch.distributed point-to-point transport (gloo on CPU; nccl.py moves CUDA caches' blocks over NCCL).

No fixed group: every producer hosts a TCPStore at kv_ip:kv_port and names itself there with an engine id
drawn at start-up, which its kv_transfer_params carry. A consumer that pulls from a producer for the first
time connects to that store and claims the next pair number; the producer's accept thread answers
by joining a gloo group of size 2 with it (producer rank 0, consumer rank 1). A pair that fails (the peer died,
a timed-out op closed it) is dropped and the next pull forms a new one, so an instance that dies and is
restarted is paired with again: a restarted producer has a new engine id, and pulls that name the old one
fail at once (their blocks died with it) instead of reading another prompt's blocks.

Each pair has two groups: on `headers` the producer waits for pulls without a timeout (a gloo op that times
out closes its pair), `group` carries replies and blocks, bounded by transfer_timeout_s. A pull is a header
[transfer id, first block, block count, reply tag] and, on the pull's own tag, the reply
[status, digest of the prompt up to the last block, the data path's sequence number (nccl.py)] and the
packed blocks. Tags are unique per pull and the producer serves each pull on a worker thread, so pulls for
different requests run concurrently, on one pair as across pairs."""
from __future__ import annotations

import datetime
import itertools
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from frontierlm.kv_transfer.base import Peer, Transport
from frontierlm.logger import init_logger

logger = init_logger(__name__)

HEADER_TAG = 1
OK, MISSING = 1, 0
FOREVER = datetime.timedelta(days=7)
MAX_CONCURRENT = 4  # pulls in flight per consumer, and pulls served at once per producer


class Pair:
    """A producer (rank 0) and one consumer (rank 1) on a store the producer hosts."""

    def __init__(self, store, key: str, rank: int, timeout: datetime.timedelta):
        self.store, self.rank, self.peer = store, rank, 1 - rank
        base = self.base = dist.PrefixStore(key, store)
        # both joined within the timeout (a peer that vanished fails this, no endless wait); the producer waits
        # for headers without one (HEADERS_WAIT), on a group of their own, since a timed-out op closes its pair
        self.group = dist.ProcessGroupGloo(dist.PrefixStore("blocks", base), rank, 2, timeout)
        self.headers = dist.ProcessGroupGloo(dist.PrefixStore("headers", base), rank, 2, timeout)
        self.header_lock = threading.Lock()  # one header at a time on HEADER_TAG
        self.broken = False
        self.extra: dict = {}  # what a data path keeps per pair (mooncake.py: the peer's session)


class TorchDistributedTransport(Transport):
    def __init__(self, host: str, port: int, timeout_s: float, backend: str = "gloo", producer: bool = True):
        if backend != "gloo":  # nccl.py uses gloo for its control messages too
            raise ValueError(f"this transport moves CPU tensors over gloo, not {backend!r}")
        self.host, self.port = host, port
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.engine_id = uuid.uuid4().hex
        self.store = None
        if producer:
            try:
                self.store = dist.TCPStore(host, port, None, True, timeout=self.timeout, wait_for_workers=False)
            except RuntimeError as e:
                raise ValueError(f"kv_transfer_config: cannot host the KV store at {host}:{port} (kv_ip, kv_port; "
                                 f"every producer needs a port of its own): {e}") from None
            self.store.set("engine_id", self.engine_id)
        self._pairs: dict[Peer, Pair] = {}  # consumer side: one per producer incarnation
        self._pairs_lock = threading.Lock()
        self._connecting: dict[tuple, threading.Lock] = {}  # per producer address: one pairing at a time
        self._tags = itertools.count(100)
        self._workers = ThreadPoolExecutor(MAX_CONCURRENT, thread_name_prefix="kv-transfer-serve")
        self._closed = False

    def address(self) -> dict:
        return {"remote_host": self.host, "remote_port": self.port, "remote_engine_id": self.engine_id}

    # ---- producer ------------------------------------------------------------------------------------
    def start(self, serve, done) -> None:
        threading.Thread(target=self._accept_loop, args=(serve, done), name="kv-transfer-accept",
                         daemon=True).start()

    def _accept_loop(self, serve, done) -> None:
        # consumers claim pair numbers in order, each with one atomic compare-and-set (_pair_for), so the next
        # number is always the one to wait for; on a connection of its own (one client, one blocking wait)
        store = dist.TCPStore(self.host, self.port, None, False, timeout=FOREVER)
        k = 0
        while not self._closed:
            try:
                store.wait([f"pair/{k}"], datetime.timedelta(hours=1))
            except RuntimeError:  # nobody asked for an hour
                continue
            threading.Thread(target=self._serve_pair, args=(k, serve, done), name=f"kv-transfer-pair-{k}",
                             daemon=True).start()
            k += 1

    def _serve_pair(self, k: int, serve, done) -> None:
        try:
            # a connection of its own: one TCPStore client serves one blocking wait at a time, and the accept
            # loop's wait would hold up this pair's rendezvous
            store = dist.TCPStore(self.host, self.port, None, False, timeout=self.timeout)
            pair = Pair(store, f"pair/{k}/", 0, self.timeout)
            self._connect(pair)
        except RuntimeError as e:
            logger.warning("kv transfer: pairing with consumer %d failed: %s", k, e)
            return
        header = torch.zeros(4, dtype=torch.int64)
        while not (self._closed or pair.broken):
            try:
                pair.headers.recv([header], pair.peer, HEADER_TAG).wait(FOREVER)
            except RuntimeError as e:  # the consumer went away: its next incarnation asks for a new pair
                logger.info("kv transfer: consumer %d left (%s)", k, e)
                break
            transfer_id, start, count, tag = (int(x) for x in header.tolist())
            if count == 0:  # the consumer needs none of them (its prefix cache had them all): no reply
                done(transfer_id, True)
                continue
            self._workers.submit(self._serve_one, pair, serve, done, transfer_id, start, count, tag)
        pair.broken = True

    def _serve_one(self, pair: Pair, serve, done, transfer_id: int, start: int, count: int, tag: int) -> None:
        sent = False
        try:
            found = serve(transfer_id, start, count)
            if found is None:
                pair.group.send([torch.tensor([MISSING, 0, -1], dtype=torch.int64)], pair.peer, tag).wait()
                return
            packed, last_hash = found
            self._reply_and_send(pair, tag, last_hash, packed)
            sent = True
        except Exception as e:  # noqa: BLE001 - the consumer's pull fails (and it prefills); the producer goes on
            logger.warning("kv transfer: serving transfer %d failed: %s", transfer_id, e)
            if isinstance(e, RuntimeError):
                pair.broken = True
        finally:
            done(transfer_id, sent)

    # ---- consumer --------------------------------------------------------------------------------------
    def _pair_for(self, peer: Peer) -> Pair:
        with self._pairs_lock:  # a producer that is down delays only the pulls from it
            lock = self._connecting.setdefault((peer.host, peer.port), threading.Lock())
        with lock:
            pair = self._pairs.get(peer)
            if pair is not None and not pair.broken:
                return pair
            for old in [p for p in list(self._pairs) if p.host == peer.host and p.port == peer.port]:
                del self._pairs[old]  # an earlier incarnation of that producer, or a broken pair
            store = dist.TCPStore(peer.host, peer.port, None, False, timeout=self.timeout)
            live = store.get("engine_id").decode()
            if live != peer.engine_id:
                raise LookupError(f"the producer at {peer.host}:{peer.port} restarted (engine {live}, the blocks "
                                  f"were held by {peer.engine_id})")
            me, k = uuid.uuid4().hex, store.add("pairs", 0)  # a hint: pair numbers below it are taken
            while store.compare_set(f"pair/{k}", "", me).decode() != me:  # claimed by someone else
                k += 1
            store.add("pairs", 1)
            pair = self._pairs[peer] = Pair(store, f"pair/{k}/", 1, self.timeout)
            self._connect(pair)
            return pair

    def _connect(self, pair: Pair) -> None:
        """A data path's own set-up per pair, on both sides (pair.rank 0: the producer)."""

    def pull(self, peer: Peer, transfer_id: int, start_block: int, num_blocks: int, out: torch.Tensor) -> int:
        pair = self._pair_for(peer)
        tag = next(self._tags)
        try:
            self._send_header(pair, [transfer_id, start_block, num_blocks, tag])
            reply = torch.zeros(3, dtype=torch.int64)  # status, digest, the data path's sequence number
            pair.group.recv([reply], pair.peer, tag).wait()
            if int(reply[0]) != OK:
                raise LookupError(f"{peer.host}:{peer.port} no longer holds transfer {transfer_id}")
            self._recv_blocks(pair, tag, out, int(reply[2]))
        except RuntimeError:
            pair.broken = True  # the next pull pairs again
            raise
        return int(reply[1])

    def _send_header(self, pair: Pair, values: list[int]) -> None:
        with pair.header_lock:
            pair.headers.send([torch.tensor(values, dtype=torch.int64)], pair.peer, HEADER_TAG).wait(self.timeout)

    # the data path; Mooncake (mooncake.py) and NCCL (nccl.py) replace these and keep the rest
    def _reply_and_send(self, pair: Pair, tag: int, last_hash: int, packed: torch.Tensor) -> None:
        pair.group.send([torch.tensor([OK, last_hash, -1], dtype=torch.int64)], pair.peer, tag).wait()
        self._send_blocks(pair, tag, packed)

    def _send_blocks(self, pair: Pair, tag: int, packed: torch.Tensor) -> None:
        pair.group.send([packed.contiguous()], pair.peer, tag).wait()

    def _recv_blocks(self, pair: Pair, tag: int, out: torch.Tensor, seq: int) -> None:
        pair.group.recv([out], pair.peer, tag).wait()

    def release(self, peer: Peer, transfer_id: int) -> None:
        pair = self._pair_for(peer)
        try:
            self._send_header(pair, [transfer_id, 0, 0, 0])
        except RuntimeError:
            pair.broken = True
            raise

    def close(self) -> None:
        self._closed = True
        self._workers.shutdown(wait=False, cancel_futures=True)
