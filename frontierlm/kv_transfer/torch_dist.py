"""torch.distributed point-to-point transport (gloo on CPU; NCCL would serve CUDA caches the same way).

The kv_parallel_size instances form their own process group (a TCPStore hosted by rank 0 at kv_ip:kv_port,
not the default group, so it never collides with other uses of torch.distributed). A pull is three messages
on the group: the consumer sends a header [transfer id, first block, block count, reply tag]; the producer's
serving thread, which receives headers from any rank, answers [status, digest of the prompt up to the last block] and, if it holds
the blocks, the packed blocks, both on the consumer's reply tag. One pull is in flight per consumer and one is
served at a time per producer, so messages between a pair never interleave. A peer that dies fails the pull at
once (gloo closes the pair) or after transfer_timeout_s."""
from __future__ import annotations

import datetime
import itertools
import threading

import torch
import torch.distributed as dist

from frontierlm.kv_transfer.base import Transport
from frontierlm.logger import init_logger

logger = init_logger(__name__)

HEADER_TAG = 1
OK, MISSING = 1, 0


class TorchDistributedTransport(Transport):
    def __init__(self, rank: int, world_size: int, host: str, port: int, timeout_s: float, backend: str = "gloo"):
        if backend != "gloo":
            raise ValueError(f"kv_connector_extra_config.backend {backend!r}: only gloo is built here (CPU caches)")
        self.rank, self.world_size = rank, world_size
        timeout = datetime.timedelta(seconds=timeout_s)
        # rank 0 hosts the store; everyone waits here until all kv_parallel_size instances have joined
        self.store = dist.TCPStore(host, port, world_size, rank == 0, timeout=datetime.timedelta(seconds=300))
        # two groups: headers wait for pulls indefinitely (a gloo op that times out closes its pair), replies
        # and blocks are bounded by the transfer timeout
        self.headers = dist.ProcessGroupGloo(dist.PrefixStore("headers", self.store), rank, world_size,
                                             datetime.timedelta(days=7))
        self.group = dist.ProcessGroupGloo(dist.PrefixStore("blocks", self.store), rank, world_size, timeout)
        self._tags = itertools.count(100)
        self._serving: threading.Thread | None = None
        self._closed = False

    def start(self, serve, done) -> None:
        self._serving = threading.Thread(target=self._serve_loop, args=(serve, done), name="kv-transfer-serve",
                                         daemon=True)
        self._serving.start()

    def _serve_loop(self, serve, done) -> None:
        header = torch.zeros(4, dtype=torch.int64)
        while not self._closed:
            try:
                work = self.headers.recv_anysource([header], HEADER_TAG)
                work.wait()
                src = work._source_rank()
            except RuntimeError as e:  # a consumer died mid-message; the others keep being served
                if self._closed:
                    return
                logger.warning("kv transfer: receiving a pull request failed: %s", e)
                continue
            transfer_id, start, count, tag = (int(x) for x in header.tolist())
            if count == 0:  # the consumer needs none of them (its prefix cache had them all): no reply
                done(transfer_id, True)
                continue
            sent = False
            try:
                found = serve(transfer_id, start, count)
                if found is None:
                    self.group.send([torch.tensor([MISSING, 0], dtype=torch.int64)], src, tag).wait()
                    continue
                packed, last_hash = found
                self.group.send([torch.tensor([OK, last_hash], dtype=torch.int64)], src, tag).wait()
                self._send_blocks(src, tag, packed)
                sent = True
            except RuntimeError as e:
                logger.warning("kv transfer: serving transfer %d to rank %d failed: %s", transfer_id, src, e)
            finally:
                done(transfer_id, sent)

    def pull(self, remote_rank: int, transfer_id: int, start_block: int, num_blocks: int,
             out: torch.Tensor) -> int:
        if not 0 <= remote_rank < self.world_size or remote_rank == self.rank:
            raise ValueError(f"remote_rank {remote_rank} is not another rank of the KV group "
                             f"(size {self.world_size}, this is {self.rank})")
        tag = next(self._tags)
        header = torch.tensor([transfer_id, start_block, num_blocks, tag], dtype=torch.int64)
        self.headers.send([header], remote_rank, HEADER_TAG).wait()
        reply = torch.zeros(2, dtype=torch.int64)
        self.group.recv([reply], remote_rank, tag).wait()
        if int(reply[0]) != OK:
            raise LookupError(f"rank {remote_rank} no longer holds transfer {transfer_id}")
        self._recv_blocks(remote_rank, tag, out)
        return int(reply[1])

    # the data path; the Mooncake transport replaces these two and keeps the rest
    def _send_blocks(self, dst: int, tag: int, packed: torch.Tensor) -> None:
        self.group.send([packed], dst, tag).wait()

    def _recv_blocks(self, src: int, tag: int, out: torch.Tensor) -> None:
        self.group.recv([out], src, tag).wait()

    def release(self, remote_rank: int, transfer_id: int) -> None:
        if 0 <= remote_rank < self.world_size and remote_rank != self.rank:
            self.headers.send([torch.tensor([transfer_id, 0, 0, 0], dtype=torch.int64)], remote_rank,
                              HEADER_TAG).wait()

    def close(self) -> None:
        self._closed = True
