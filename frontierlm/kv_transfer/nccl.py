"""NCCL as the data path for CUDA caches (`"kv_connector_extra_config": {"backend": "nccl"}`).

NOT YET RUN ON A GPU: this was written against torch.distributed's NCCL backend on a machine without one.
Without CUDA and NCCL it is refused at start-up with a clear error; its shared logic (pairing, headers and
replies, block packing, and the sequenced data path below) runs on CPU in tests/test_kv_transport.py through
SequencedTransport, which is this class over the pair's gloo group instead of NCCL.

Pairing, headers and replies stay those of torch_dist.py, on gloo with CPU tensors. The packed blocks go
through an NCCL group of the same two ranks, from the producer's CUDA cache to the consumer's CUDA staging
buffer. NCCL matches a pair's sends and receives by their order, not by a tag, while pulls run concurrently,
so the data path is sequenced: the producer numbers its sends in the order it issues them and puts the number
in the reply; the consumer issues its receives in that order, whichever order its pull threads got their
replies in. NCCL refuses two ranks of one communicator on the same GPU, so a prefill and a decode instance
need a device each."""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from frontierlm.kv_transfer.torch_dist import OK, Pair, TorchDistributedTransport

DATA_TAG = 0  # one tag for every data message of a pair: order, not tag, tells them apart (as in NCCL)


class SequencedPath:
    """Sends and receives between the two ranks of `group`, issued in one agreed order."""

    def __init__(self, group, peer: int, timeout_s: float, finish):
        self.group, self.peer, self.timeout_s, self.finish = group, peer, timeout_s, finish
        self._send_lock = threading.Lock()
        self._next_send = 0
        self._turn = threading.Condition()
        self._next_recv = 0
        self.broken = False

    def send(self, reply, packed: torch.Tensor) -> None:
        """Producer: number this send, tell the consumer the number (`reply(seq)`), then issue it; one lock
        around the three, so the sends go out in the order of their numbers."""
        with self._send_lock:
            seq = self._next_send
            self._next_send += 1
            reply(seq)
            self.finish(self.group.send([packed], self.peer, DATA_TAG))

    def recv(self, seq: int, out: torch.Tensor) -> None:
        """Consumer: wait for receive `seq`'s turn, issue it, let the next one go, then wait for the data."""
        with self._turn:
            if not self._turn.wait_for(lambda: self._next_recv == seq or self.broken, self.timeout_s) \
                    or self.broken:
                self.broken = True  # a receive before it never came: the order is lost, the pair with it
                self._turn.notify_all()
                raise RuntimeError(f"kv transfer: receive {seq} of the pair never got its turn")
            work = self.group.recv([out], self.peer, DATA_TAG)
            self._next_recv += 1
            self._turn.notify_all()
        self.finish(work)


class SequencedTransport(TorchDistributedTransport):
    """The sequenced data path over the pair's gloo group (CPU): NcclTransport minus the GPU."""

    def _data_group(self, pair: Pair):
        return pair.group

    def _finish(self, work) -> None:
        work.wait()

    def _connect(self, pair: Pair) -> None:
        pair.extra["path"] = SequencedPath(self._data_group(pair), pair.peer, self.timeout.total_seconds(),
                                           self._finish)

    def _reply_and_send(self, pair: Pair, tag: int, last_hash: int, packed: torch.Tensor) -> None:
        def reply(seq: int) -> None:
            pair.group.send([torch.tensor([OK, last_hash, seq], dtype=torch.int64)], pair.peer, tag).wait()

        pair.extra["path"].send(reply, packed.contiguous())

    def _recv_blocks(self, pair: Pair, tag: int, out: torch.Tensor, seq: int) -> None:
        pair.extra["path"].recv(seq, out)


class NcclTransport(SequencedTransport):
    def __init__(self, host: str, port: int, timeout_s: float, producer: bool, device: torch.device):
        if not (torch.cuda.is_available() and dist.is_nccl_available()):
            raise ValueError("kv_connector_extra_config.backend 'nccl' needs CUDA and a torch built with NCCL; "
                             "this torch has " + ("no NCCL" if torch.cuda.is_available() else "no CUDA device"))
        if device.type != "cuda":
            raise ValueError(f"kv_connector_extra_config.backend 'nccl' moves CUDA caches; this cache is on {device}")
        super().__init__(host, port, timeout_s, "gloo", producer)  # gloo for the control messages
        self.device = device

    def _data_group(self, pair: Pair):
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = self.timeout
        # the communicator is made on the first send / receive, on the device of its tensor
        return dist.ProcessGroupNCCL(dist.PrefixStore("nccl", pair.base), pair.rank, 2, options)

    def _finish(self, work) -> None:
        work.wait()  # orders the current stream after NCCL's ...
        torch.cuda.current_stream(self.device).synchronize()  # ... and the data is there (or gone) when we return
