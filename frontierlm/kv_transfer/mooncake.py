"""Mooncake's transfer engine as the data path (`kv_connector: "MooncakeConnector"`, optional extra
`pip install frontierlm[mooncake]`; its wheel needs the system's libibverbs, Debian's `libibverbs1`).

The control messages stay on the torch.distributed group of torch_dist.py (a header, a status); the blocks
move by a one-sided read: the producer packs them into a buffer registered with its transfer engine and
answers with its address, the consumer reads that range into its own registered buffer
(`transfer_sync_read`, TCP with the non-CUDA wheel; the same calls use RDMA where the NICs have it) and
acknowledges, after which the producer lets the buffer go. Each engine's RPC address is published in the
group's store."""
from __future__ import annotations

import torch

from frontierlm.kv_transfer.torch_dist import TorchDistributedTransport


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
        super().__init__(config.kv_rank, config.kv_parallel_size, config.kv_ip, config.kv_port,
                         float(config.extra("transfer_timeout_s")), config.extra("backend"))
        self.engine = _engine(config.kv_ip)
        self.store.set(f"mooncake/{self.rank}", f"{config.kv_ip}:{self.engine.get_rpc_port()}")
        self._peers: dict[int, str] = {}

    def _session(self, rank: int) -> str:
        if rank not in self._peers:
            self._peers[rank] = self.store.get(f"mooncake/{rank}").decode()
        return self._peers[rank]

    def _register(self, t: torch.Tensor) -> int:
        nbytes = t.numel() * t.element_size()
        if self.engine.register_memory(t.data_ptr(), nbytes) != 0:
            raise RuntimeError("Mooncake could not register a buffer")
        return nbytes

    def _send_blocks(self, dst: int, tag: int, packed: torch.Tensor) -> None:
        packed = packed.contiguous()
        nbytes = self._register(packed)
        try:
            self.group.send([torch.tensor([packed.data_ptr(), nbytes], dtype=torch.int64)], dst, tag).wait()
            ack = torch.zeros(1, dtype=torch.int64)
            self.group.recv([ack], dst, tag).wait()  # the consumer has read it (or gave up)
        finally:
            self.engine.unregister_memory(packed.data_ptr())

    def _recv_blocks(self, src: int, tag: int, out: torch.Tensor) -> None:
        where = torch.zeros(2, dtype=torch.int64)
        self.group.recv([where], src, tag).wait()
        addr, nbytes = (int(x) for x in where.tolist())
        ok = 0
        try:
            if nbytes != self._register(out):
                raise RuntimeError(f"rank {src} offers {nbytes} bytes, the buffer holds {out.numel() * out.element_size()}")
            ok = self.engine.transfer_sync_read(self._session(src), out.data_ptr(), addr, nbytes) == 0
            if not ok:
                raise RuntimeError(f"Mooncake read of {nbytes} bytes from rank {src} failed")
        finally:
            self.engine.unregister_memory(out.data_ptr())
            self.group.send([torch.tensor([int(ok)], dtype=torch.int64)], src, tag).wait()
