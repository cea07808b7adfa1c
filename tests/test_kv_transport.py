"""The KV transports' shared parts, in one process: packing blocks (dense, MLA, FP8 as bytes), pairing a
consumer with a producer on its first pull, the control messages (status, digest, release), pulls that run
concurrently instead of one behind the other, and a producer named by its engine id, so pulls that name an
earlier incarnation fail instead of reading another prompt's blocks. The processes that die and come back
are in tests/test_disagg.py."""
import threading
import time

import pytest
import torch

from fleet import free_port
from frontierlm.kv_transfer.base import Peer
from frontierlm.kv_transfer.blocks import BlockIO
from frontierlm.kv_transfer.nccl import NcclTransport, SequencedTransport
from frontierlm.kv_transfer.torch_dist import MAX_CONCURRENT, TorchDistributedTransport

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("layout", ["dense", "mla", "fp8"])
def test_blocks_pack_and_unpack_across_layers(layout):
    torch.manual_seed(0)
    if layout == "mla":  # the latent cache: [blocks, block_size, latent + rope dims]
        caches = [torch.randn(6, 4, 12) for _ in range(3)]
    else:  # K and V: [2, blocks, block_size, kv heads, head dim]
        caches = [torch.randn(2, 6, 4, 2, 8) for _ in range(3)]
    if layout == "fp8":
        caches = [c.to(torch.float8_e4m3fn) for c in caches]
    src, dst = BlockIO(caches), BlockIO([torch.zeros_like(c) for c in caches])
    packed = src.gather([4, 1])
    assert packed.shape == (2, src.numel) and packed.dtype == (torch.uint8 if layout == "fp8" else torch.float32)
    assert src.bytes_per_block == src.numel * caches[0].element_size()
    dst.scatter([0, 5], packed)
    for c, d in zip(caches, dst.views):
        c = c.transpose(0, 1) if c.dim() == 5 else c
        assert torch.equal(d[0].view(torch.uint8), c[4].view(torch.uint8))
        assert torch.equal(d[5].view(torch.uint8), c[1].view(torch.uint8))
        assert not d[1:5].view(torch.uint8).any()


class Producer:
    """A producer transport serving rows of `data[transfer_id]`; `gate` (if set) is waited on in serve."""

    def __init__(self, gate=None, cls=TorchDistributedTransport, device="cpu"):
        self.port = free_port()
        self.t = cls("127.0.0.1", self.port, 20.0, **({} if device == "cpu" else {"producer": True,
                                                                                   "device": torch.device(device)}))
        self.data = {tid: torch.randn(8, 32, device=device) for tid in range(1, 9)}
        self.gate, self.done, self.served = gate, [], 0
        self.t.start(self.serve, lambda tid, sent: self.done.append((tid, sent)))
        a = self.t.address()
        self.peer = Peer(a["remote_host"], a["remote_port"], a["remote_engine_id"])

    def serve(self, tid, start, count):
        if tid not in self.data:
            return None
        if self.gate is not None:
            self.gate.wait()  # every concurrent pull must be inside serve at once to pass
        self.served += 1
        return self.data[tid][start:start + count], 1000 + tid


def _consumer(cls=TorchDistributedTransport):
    return cls("127.0.0.1", 0, 20.0, producer=False)


def test_a_consumer_pairs_on_its_first_pull_and_gets_the_blocks():
    prod, cons = Producer(), _consumer()
    assert set(prod.t.address()) == {"remote_host", "remote_port", "remote_engine_id"}
    out = torch.empty(3, 32)
    assert cons.pull(prod.peer, 2, 4, 3, out) == 1002  # the producer's digest comes back
    assert torch.equal(out, prod.data[2][4:7])
    with pytest.raises(LookupError, match="no longer holds transfer 99"):
        cons.pull(prod.peer, 99, 0, 1, torch.empty(1, 32))
    cons.release(prod.peer, 5)  # a header with no blocks: done, nothing sent back
    assert cons.pull(prod.peer, 3, 0, 2, out[:2]) == 1003  # the pair still works after all three
    for _ in range(100):  # done() runs on the producer's threads
        if len(prod.done) == 4:
            break
        time.sleep(0.05)
    assert sorted(prod.done) == [(2, True), (3, True), (5, True), (99, False)]
    assert len(cons._pairs) == 1  # one pair, made once


@pytest.mark.parametrize("cls", [TorchDistributedTransport, SequencedTransport], ids=["tagged", "sequenced"])
def test_pulls_run_concurrently_on_one_pair_and_across_pairs(cls):
    """serve() blocks until MAX_CONCURRENT pulls are inside it at once: pulls served one behind the other
    would break the barrier (and fail). Each pull has its own size, so data sent to the wrong receive (the
    sequenced path NCCL needs: one tag, matched by order) fails too."""
    gate = threading.Barrier(MAX_CONCURRENT, timeout=15)
    prod = Producer(gate, cls)
    consumers = [_consumer(cls), _consumer(cls)]  # two decode instances; the first pulls three at once
    jobs = [(consumers[0], 1), (consumers[0], 2), (consumers[0], 3), (consumers[1], 4)]
    assert len(jobs) == MAX_CONCURRENT
    results, errors = {}, []

    def pull(cons, tid):
        out = torch.empty(tid + 2, 32)
        try:
            results[tid] = (cons.pull(prod.peer, tid, 1, tid + 2, out), out)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=pull, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not gate.broken, errors
    for tid in (1, 2, 3, 4):
        digest, out = results[tid]
        assert digest == 1000 + tid and torch.equal(out, prod.data[tid][1:tid + 3])
    assert prod.served == 4


def test_a_pair_outlives_its_transfer_timeout_while_idle():
    prod = Producer()
    prod.t.timeout = prod.t.timeout / 20  # 1 s: the pair forms with it (both sides), then waits 2 s idle
    cons = _consumer()
    cons.timeout = prod.t.timeout
    out = torch.empty(1, 32)
    assert cons.pull(prod.peer, 1, 0, 1, out) == 1001
    time.sleep(2.0)
    assert cons.pull(prod.peer, 2, 0, 1, out) == 1002 and torch.equal(out, prod.data[2][:1])
    assert len(cons._pairs) == 1  # the same pair: the producer's wait for headers did not time out


def test_pulls_that_name_another_incarnation_fail_at_once():
    prod, cons = Producer(), _consumer()
    stale = prod.peer._replace(engine_id="an-earlier-start")
    with pytest.raises(LookupError, match="restarted"):
        cons.pull(stale, 1, 0, 1, torch.empty(1, 32))
    out = torch.empty(1, 32)
    assert cons.pull(prod.peer, 1, 0, 1, out) == 1001  # the live incarnation is paired with as usual


def test_a_producer_port_in_use_is_a_clear_error():
    prod = Producer()
    with pytest.raises(ValueError, match="cannot host the KV store at 127.0.0.1"):
        TorchDistributedTransport("127.0.0.1", prod.port, 5.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_nccl_is_refused_without_cuda():
    with pytest.raises(ValueError, match="'nccl' needs CUDA"):
        NcclTransport("127.0.0.1", free_port(), 5.0, True, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available(),
                    reason="NCCL needs two CUDA devices, one per rank (never run: written without a GPU)")
def test_nccl_moves_blocks_between_two_devices():
    prod = Producer(cls=NcclTransport, device="cuda:0")
    cons = NcclTransport("127.0.0.1", 0, 20.0, False, torch.device("cuda:1"))
    out = torch.empty(3, 32, device="cuda:1")
    assert cons.pull(prod.peer, 2, 4, 3, out) == 1002
    assert torch.equal(out.cpu(), prod.data[2][4:7].cpu())
