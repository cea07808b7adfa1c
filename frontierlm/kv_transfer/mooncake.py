"""Mooncake's transfer engine as the data path (`kv_connector: "MooncakeConnector"`, optional extra
`pip install frontierlm[mooncake]`; its wheel needs the system's libibverbs, Debian's `libibverbs1`).

The control messages stay on the torch.distributed pair of torch_dist.py (a header, a status); the blocks
move by a one-sided read: the producer packs them into a buffer registered with its transfer engine and
answers with its address, the consumer reads that range into its own registered buffer
(`transfer_sync_read`, TCP with the non-CUDA wheel; the same calls use RDMA where the NICs have it) and
acknowledges, after which the producer lets the buffer go. A producer publishes its engine's RPC address
in the store it hosts; a consumer reads it when it pairs."""
from __future__ import annotations

import threading

import torch

from frontierlm.kv_transfer.torch_dist import Pair, TorchDistributedTransport


def _engine(host: str):
    try:
        from mooncake.engine import TransferEngine
    except ImportError as e:
        raise ValueError(f"kv_connector MooncakeConnector needs Mooncake's transfer engine: pip install "
                         f"'frontierlm[mooncake]' (and the system's libibverbs1); importing it failed: {e}") from None
    engine = TransferEngine()
    if engine.initialize(host, "P2PHANDSHAKE", "tcp", "") != 0:
        raise ValueError(f"Mooncake's transfer engine did not start on {host} (tcp)")
    return engine


class MooncakeTransport(TorchDistributedTransport):
    def __init__(self, config):
        super().__init__(config.kv_ip, config.kv_port, float(config.extra("transfer_timeout_s")),
                         config.extra("backend"), producer=config.is_producer)
        self.engine = _engine(config.kv_ip)
        # registered (start, end) ranges: Mooncake refuses overlapping ones, and two concurrent pulls may hand
        # it the same memory (a tensor served twice), so a registration waits for an overlapping one to go
        self._regions: list[tuple[int, int]] = []
        self._regions_changed = threading.Condition()
        if self.store is not None:  # a consumer reads it when it pairs with this producer
            self.store.set("mooncake", f"{config.kv_ip}:{self.engine.get_rpc_port()}")

    def _connect(self, pair: Pair) -> None:
        if pair.rank == 1:  # the consumer reads from the producer's engine
            pair.extra["session"] = pair.store.get("mooncake").decode()

    def _register(self, t: torch.Tensor) -> int:
        start, nbytes = t.data_ptr(), t.numel() * t.element_size()
        with self._regions_changed:
            if not self._regions_changed.wait_for(
                    lambda: not any(s < start + nbytes and start < e for s, e in self._regions),
                    self.timeout.total_seconds()):
                raise RuntimeError("Mooncake: an overlapping buffer stayed registered")
            if self.engine.register_memory(start, nbytes) != 0:
                raise RuntimeError("Mooncake could not register a buffer")
            self._regions.append((start, start + nbytes))
        return nbytes

    def _unregister(self, t: torch.Tensor) -> None:
        with self._regions_changed:
            self.engine.unregister_memory(t.data_ptr())
            self._regions = [r for r in self._regions if r[0] != t.data_ptr()]
            self._regions_changed.notify_all()

    def _send_blocks(self, pair: Pair, tag: int, packed: torch.Tensor) -> None:
        packed = packed.contiguous()
        nbytes = self._register(packed)
        try:
            pair.group.send([torch.tensor([packed.data_ptr(), nbytes], dtype=torch.int64)], pair.peer, tag).wait()
            ack = torch.zeros(1, dtype=torch.int64)
            pair.group.recv([ack], pair.peer, tag).wait()  # the consumer has read it (or gave up)
        finally:
            self._unregister(packed)

    def _recv_blocks(self, pair: Pair, tag: int, out: torch.Tensor, seq: int) -> None:
        where = torch.zeros(2, dtype=torch.int64)
        pair.group.recv([where], pair.peer, tag).wait()
        addr, nbytes = (int(x) for x in where.tolist())
        ok = 0
        try:
            if nbytes != self._register(out):
                raise RuntimeError(f"the producer offers {nbytes} bytes, the buffer holds "
                                   f"{out.numel() * out.element_size()}")
            ok = self.engine.transfer_sync_read(pair.extra["session"], out.data_ptr(), addr, nbytes) == 0
            if not ok:
                raise RuntimeError(f"Mooncake read of {nbytes} bytes from {pair.extra['session']} failed")
        finally:
            self._unregister(out)
            pair.group.send([torch.tensor([int(ok)], dtype=torch.int64)], pair.peer, tag).wait()
