"""The shared-memory all-reduce of CPU tensor parallelism (distributed/shm.py), two ranks on one host.

Oracle: gloo's all-reduce of the same tensors. With two ranks a + b == b + a in floating point, so the shm sum
must equal gloo's bit for bit (and be the same on both ranks); an engine run with it must give the tokens of
one process and exactly the log-probs of a gloo run. A peer that died or hangs gives a clear error within the
timeout, and no file is left in /dev/shm."""
import glob
import os
import time

import pytest
import torch
import torch.distributed as dist

from frontierlm import LLM
from test_engine_parity import greedy, prompts_for
from test_parallel_quant_moe import run_two_ranks

pytestmark = pytest.mark.usefixtures("one_thread", "dist_timeout")

# (shape, dtype): decode rows, a prefill chunk, bfloat16, and one larger than the 0.5 MiB slot (gloo)
CASES = [((1, 512), torch.float32), ((7, 512), torch.float32), ((3, 512), torch.bfloat16), ((300, 512), torch.float32)]
ROUNDS = 50


def _context(rank: int, port: int):
    from frontierlm.distributed.state import ParallelContext, init_process_groups

    torch.set_num_threads(1)
    return init_process_groups(ParallelContext(rank=rank, tp_size=2), "127.0.0.1", port)


def _reduce_rank(rank: int, port: int, path: str):
    os.environ["FRONTIERLM_SHM_ALLREDUCE_MB"] = "0.5"
    ctx = _context(rank, port)
    shm = ctx.tp_reduce.shm
    out = {"shm": shm is not None, "mismatches": 0, "first": []}
    g = torch.Generator().manual_seed(rank)
    for i in range(ROUNDS * len(CASES)):  # shapes and dtypes interleaved: both buffers, every slot view
        shape, dtype = CASES[i % len(CASES)]
        x = torch.randn(shape, generator=g).to(dtype)
        mine, via_gloo = x.clone(), x.clone()
        ctx.tp_reduce(mine)
        dist.all_reduce(via_gloo, group=ctx.tp_group)
        out["mismatches"] += not torch.equal(mine, via_gloo)
        if i < len(CASES):
            out["first"].append((x, mine))
    out["seq"] = shm.seq  # and by now rank 0 is long past unlinking the name:
    out["left"] = glob.glob(f"/dev/shm/frontierlm-tp-{int(shm.lines[0, 1])}-*")
    torch.save(out, path)
    dist.destroy_process_group()


def test_shm_all_reduce_equals_gloo_bitwise(tmp_path):
    ranks = run_two_ranks(_reduce_rank, (), tmp_path)
    for r in ranks:
        assert r["shm"] and r["left"] == []  # the name is unlinked once both ranks mapped it
        assert r["mismatches"] == 0
        assert r["seq"] == ROUNDS * 3  # the 300-row tensor (600 KiB) went through gloo
    for (x0, y0), (x1, y1), (_, dtype) in zip(ranks[0]["first"], ranks[1]["first"], CASES):
        assert y0.dtype == dtype and torch.equal(y0, y1) and torch.equal(y0, x0 + x1)


def _broadcast_gather_rank(rank: int, port: int, path: str):
    os.environ["FRONTIERLM_SHM_ALLREDUCE_MB"] = "0.5"
    ctx = _context(rank, port)
    out = {"bcast": [], "gather": [], "mine": [], "seq": 0}
    g = torch.Generator().manual_seed(10 + rank)
    for shape, dtype in [((40,), torch.int64), ((1, 512), torch.float32), ((3, 512), torch.bfloat16),
                         ((300, 512), torch.float32)]:  # the last one is past the slot: gloo's broadcast / gather
        x = (torch.randint(-2**40, 2**40, shape, generator=g) if dtype == torch.int64
             else torch.randn(shape, generator=g).to(dtype))
        out["mine"].append(x.clone())
        out["bcast"].append(ctx.tp_reduce.broadcast(x.clone(), root=rank == 0))
        out["gather"].append(ctx.tp_reduce.gather(x, rank, 2))
    out["seq"] = ctx.tp_reduce.shm.seq
    torch.save(out, path)
    dist.destroy_process_group()


def test_shm_broadcast_and_gather_carry_rank_0s_and_every_ranks_tensor(tmp_path):
    """The step's payload and hidden states (broadcast) and the LM head's logits (gather) over shared memory: the
    broadcast is exact (ints past 2**32 too), the gather puts each rank's tensor in its place, on rank 0 only."""
    r0, r1 = run_two_ranks(_broadcast_gather_rank, (), tmp_path)
    for i, (a, b) in enumerate(zip(r0["mine"], r1["mine"])):
        assert torch.equal(r0["bcast"][i], a) and torch.equal(r1["bcast"][i], a)
        assert r1["gather"][i] is None and len(r0["gather"][i]) == 2
        assert torch.equal(r0["gather"][i][0], a) and torch.equal(r0["gather"][i][1], b)
    assert r0["seq"] == r1["seq"] == 6  # broadcast + gather of the three small cases; the large one took gloo


def _peer_rank(rank: int, mode: str, port: int, path: str):
    os.environ["FRONTIERLM_DIST_TIMEOUT_S"] = "10" if mode == "exit" else "2"
    ctx = _context(rank, port)
    if rank == 1:  # never joins the all-reduce: exits once rank 0 waits in it, or outlives its timeout
        torch.save({}, path)
        time.sleep(6 if mode == "hang" else 1)
        os._exit(0)
    from frontierlm.distributed.shm import ShmTimeout

    t0 = time.monotonic()
    try:
        ctx.tp_reduce(torch.ones(2, 512))
        error = None
    except ShmTimeout as e:
        error = str(e)
    torch.save({"error": error, "seconds": time.monotonic() - t0}, path)
    os._exit(0)


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_a_dead_or_hung_peer_raises_a_clear_error(tmp_path, mode):
    result = run_two_ranks(_peer_rank, (mode,), tmp_path)[0]
    if mode == "exit":  # its process is gone (a zombie until joined): noticed at once, not after the timeout
        assert "TP rank 1 (pid" in result["error"] and "is gone" in result["error"]
        assert result["seconds"] < 5.0  # rank 1 lived 1 s of it; the timeout was 10 s
    else:
        assert "TP rank 1 did not answer within 2s (FRONTIERLM_DIST_TIMEOUT_S)" in result["error"]
        assert 2.0 <= result["seconds"] < 5.0


def _shm_maps() -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if "frontierlm-tp-" in line]


def _run(llm, ps):
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs[0]) for o in llm.generate(ps, greedy(), use_tqdm=False)]


def test_tp2_with_shm_keeps_greedy_tokens_and_gloo_log_probs(tiny_model_dir, monkeypatch):
    d = tiny_model_dir("llama")
    ps = prompts_for(n=6, seed=3)
    ref = _run(LLM(d, block_size=4), ps)
    llm = LLM(d, block_size=4, max_num_batched_tokens=16, tensor_parallel_size=2)  # chunked prefill: many shapes
    try:
        shm = llm.llm_engine.runner.parallel.ctx.tp_reduce.shm
        assert shm is not None and "shared memory" in llm.llm_engine.startup_report
        maps = _shm_maps()  # mapped, and already unlinked: nothing to clean up if a rank is killed
        assert maps and all(line.rstrip().endswith("(deleted)") for line in maps)
        assert not glob.glob(f"/dev/shm/frontierlm-tp-{os.getpid()}-*")
        with_shm = _run(llm, ps)
        assert shm.seq > 0
    finally:
        llm.llm_engine.shutdown()
    assert _shm_maps() == []  # unmapped at shutdown
    for (tokens, logp), (want, want_logp) in zip(with_shm, ref):
        assert tokens == want
        assert all(abs(lp.logprob - want_logp[t].logprob) < 1e-4 for t, lp in logp.items())
    monkeypatch.setenv("FRONTIERLM_SHM_ALLREDUCE", "0")
    llm = LLM(d, block_size=4, max_num_batched_tokens=16, tensor_parallel_size=2)
    try:
        assert llm.llm_engine.runner.parallel.ctx.tp_reduce.shm is None and not _shm_maps()
        via_gloo = _run(llm, ps)
    finally:
        llm.llm_engine.shutdown()
    for (tokens, logp), (want, want_logp) in zip(with_shm, via_gloo):  # the same sums, bit for bit
        assert tokens == want and {t: lp.logprob for t, lp in logp.items()} == \
            {t: lp.logprob for t, lp in want_logp.items()}
