"""Serving simulator: the engine's scheduler on simulated time. Invariants, a hand-checked schedule, static
batching waste, speculative decoding, disaggregation, the profile fit and the command line."""
import json

import numpy as np
import pytest

from frontierlm.cli import main
from frontierlm.plan import get_gpu, load_model_shape
from frontierlm.sim.fleet import FleetConfig, simulate
from frontierlm.sim.instance import Instance, InstanceConfig, SpecConfig
from frontierlm.sim.metrics import summarize
from frontierlm.sim.timing import FEATURES, ProfileTimer, RooflineTimer
from frontierlm.sim.workload import SimRequest, synthetic


class LinearTimer:
    """1 s per step plus 0.1 s per token: easy to follow by hand."""

    def step_time(self, b):
        return 1.0 + 0.1 * b.num_tokens

    def describe(self):
        return {"kind": "linear"}


@pytest.fixture
def checked(monkeypatch):
    """Check after every scheduling decision that the blocks in use are distinct and within capacity."""
    orig = Instance.start_step

    def start_step(self, now):
        d = orig(self, now)
        ids = [b.block_id for blocks in self.kv.req_blocks.values() for b in blocks]
        assert len(ids) == len(set(ids)) <= self.config.num_blocks
        assert len(ids) == self.config.num_blocks - self.kv.pool.num_free_blocks
        return d

    monkeypatch.setattr(Instance, "start_step", start_step)


def _assert_invariants(res, workload):
    by_id = {r.request_id: r for r in res.records}
    for w in workload:
        rec = by_id[w.request_id]
        assert rec.completions == 1 and rec.tokens == w.output_len, rec
        assert rec.arrival <= rec.first_token <= rec.finish
    rep = summarize(res)
    for inst in rep["instances"]:
        assert 0 < inst["utilization"] <= 1 + 1e-9
        assert inst["kv_peak_usage"] <= 1
    assert all(u <= 1 + 1e-9 for u in rep["timeline"]["utilization"])
    assert rep["completed"] == len(workload)
    return rep


@pytest.mark.parametrize("fleet", [
    FleetConfig(InstanceConfig(num_blocks=40, block_size=4, max_num_batched_tokens=32)),  # tight: preempts
    FleetConfig(InstanceConfig(num_blocks=60, block_size=4, max_num_seqs=4), replicas=3, router="round_robin"),
    FleetConfig(InstanceConfig(num_blocks=60, block_size=4), replicas=2, router="least_kv"),
    FleetConfig(InstanceConfig(num_blocks=200, block_size=4, spec=SpecConfig(3, 0.6)), replicas=2, router="random"),
    FleetConfig(InstanceConfig(num_blocks=200, block_size=4, policy="static", static_batch_size=4)),
    FleetConfig(InstanceConfig(num_blocks=80, block_size=4), disagg=(1, 2), kv_bytes_per_token=1e6,
                kv_transfer_bw=1e9),
], ids=["preempt", "replicas-rr", "least-kv", "spec", "static", "disagg"])
def test_every_request_completes_once_within_capacity(checked, fleet):
    wl = synthetic(40, 4.0, "4:40", "1:30", "gamma", cv=2.0, seed=1, priority_fraction=0.3)
    res = simulate(wl, LinearTimer(), fleet, seed=3)
    rep = _assert_invariants(res, wl)
    if fleet.instance.num_blocks == 40:
        assert rep["preemptions"] > 0  # the KV cache ran out and the engine's preemption kicked in
    assert "by_priority" in rep


def test_hand_checked_schedule():
    # A: prompt 10, 3 tokens, at t=0; B: prompt 4, 2 tokens, at t=0.5; budget 8 tokens per step.
    # step 1 [0, 1.8]:   A prefills 8 of 10                                 (8 tokens)
    # step 2 [1.8, 3.4]: A's last 2 prompt tokens + B's 4 -> both sample     (6 tokens)
    # step 3 [3.4, 4.6]: A and B decode -> B has its 2 tokens and finishes   (2 tokens)
    # step 4 [4.6, 5.7]: A decodes its third token and finishes              (1 token)
    wl = [SimRequest("A", 0.0, 10, 3), SimRequest("B", 0.5, 4, 2)]
    res = simulate(wl, LinearTimer(), FleetConfig(InstanceConfig(num_blocks=100, block_size=4,
                                                                 max_num_batched_tokens=8)))
    a, b = res.records
    assert a.first_token == pytest.approx(3.4) and b.first_token == pytest.approx(3.4)
    assert b.finish == pytest.approx(4.6) and a.finish == pytest.approx(5.7)
    assert a.ttft == pytest.approx(3.4) and b.ttft == pytest.approx(2.9)
    assert a.tpot == pytest.approx(1.15) and b.tpot == pytest.approx(1.2)
    inst = res.instances[0]
    assert inst.steps == 4 and inst.busy_time == pytest.approx(5.7)


def test_static_batching_waste_on_the_seed_example():
    # 8 requests of 20-200 output tokens in one static batch: every row runs until the longest (200) is done.
    # These lengths (the seed's own are not in the repository) total 1240 of 8 x 200 = 1600 row-steps: 22.5% idle.
    lengths = [200, 200, 190, 180, 170, 150, 130, 20]
    wl = [SimRequest(f"r{i}", 0.0, 16, n) for i, n in enumerate(lengths)]
    static = InstanceConfig(num_blocks=1000, block_size=16, policy="static", static_batch_size=8)
    rep = summarize(simulate(wl, LinearTimer(), FleetConfig(static)))
    assert rep["instances"][0]["static_waste"] == pytest.approx(1 - sum(lengths) / (8 * 200)) == pytest.approx(0.225)
    # with a second batch queued behind, continuous batching finishes the same work sooner
    wl2 = wl + [SimRequest(f"s{i}", 0.0, 16, n) for i, n in enumerate(lengths)]
    t_static = simulate(wl2, LinearTimer(), FleetConfig(static)).end_time
    t_cont = simulate(wl2, LinearTimer(), FleetConfig(InstanceConfig(num_blocks=1000, max_num_seqs=8))).end_time
    assert t_cont < t_static


@pytest.mark.parametrize("acceptance,steps", [(1.0, 11), (0.0, 41)])
def test_speculative_decoding_tokens_per_step(acceptance, steps):
    # K=3: a step after the first token emits 1 + accepted drafts; all accepted -> 4 tokens per step
    spec = SpecConfig(3, acceptance)
    res = simulate([SimRequest("r", 0.0, 8, 41)], LinearTimer(),
                   FleetConfig(InstanceConfig(num_blocks=100, block_size=4, spec=spec)))
    assert res.records[0].tokens == 41 and res.records[0].completions == 1
    assert res.instances[0].steps == steps
    assert spec.expected_tokens() == (4.0 if acceptance == 1 else 1.0)
    assert SpecConfig(4, 0.5).expected_tokens() == pytest.approx((1 - 0.5 ** 5) / 0.5)


def test_disaggregated_transfer_cost():
    wl = [SimRequest("r", 0.0, 100, 5)]
    fleet = FleetConfig(InstanceConfig(num_blocks=100, block_size=4), disagg=(1, 1), kv_bytes_per_token=2e6,
                        kv_transfer_bw=1e9, kv_transfer_latency=0.01)
    res = simulate(wl, LinearTimer(), fleet)
    rec = res.records[0]
    assert rec.transfer_s == pytest.approx(0.01 + 100 * 2e6 / 1e9)
    # prefill: 100 prompt tokens in one step (11 s) -> first token; decode side: the received prompt is not
    # charged, 4 decode steps of 1 token each
    assert rec.first_token == pytest.approx(11.0)
    assert rec.finish == pytest.approx(11.0 + rec.transfer_s + 4 * 1.1)
    assert [i.steps for i in res.instances] == [1, 4]


def test_profile_fit_recovers_a_linear_step_model():
    coef = {"const": 2e-3, "prefill_tokens": 5e-5, "prefill_pairs": 1e-8, "decode_reqs": 3e-4, "decode_ctx": 1e-7}
    rng = np.random.default_rng(0)
    points = []
    for _ in range(40):
        p, d, c = int(rng.integers(0, 512)), int(rng.integers(0, 32)), int(rng.integers(16, 1024))
        pt = {"prefill_tokens": p, "prefill_pairs": p * (p + 1) // 2, "decode_reqs": d, "decode_ctx": d * c}
        pt["step_s"] = coef["const"] + sum(coef[f] * pt[f] for f in FEATURES[1:])
        points.append(pt)
    timer = ProfileTimer({"points": points})
    assert timer.coef == pytest.approx([coef[f] for f in FEATURES], rel=1e-6)
    assert timer.describe()["fit_rel_err_max"] < 1e-6


def test_roofline_timer_decode_is_memory_bound():
    shape, gpu = load_model_shape("llama-3-8b"), get_gpu("h100")
    timer = RooflineTimer(shape, gpu, mfu=1.0, mbu=1.0)
    from frontierlm.sim.timing import BatchShape

    t = timer.step_time(BatchShape(decode_reqs=1, decode_ctx=1))
    assert t == pytest.approx((shape.num_params() * 2 + 2 * shape.kv_bytes_per_token()) / 3.35e12, rel=1e-6)
    prefill = timer.step_time(BatchShape(prefill_tokens=4096, prefill_pairs=4096 * 4097 // 2, prefill_ctx=4096))
    assert prefill > 4096 * 2 * shape.matmul_params_per_token() / 989.5e12  # compute-bound


def test_sim_cli_report_sweep_and_errors(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sim", "--roofline", "llama-3-8b", "--gpu", "h100", "--num-requests", "30", "--request-rate", "20",
            "--input-len", "64:512", "--output-len", "16:64", "--slo-ttft-ms", "200", "--slo-tpot-ms", "50"]
    assert main(argv + ["--out-dir", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["completed"] == 30 and 0 < rep["slo_attainment"] <= 1
    assert (out / "report.png").stat().st_size > 0 and json.loads((out / "report.json").read_text())
    assert main(argv + ["--disagg", "1:1", "--sweep", "pd=1:1,1:2", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1:2" in text and (out / "sweep.png").is_file()
    for bad, needle in ([["sim"], "exactly one of"],
                        [argv + ["--sweep", "colour=1"], "--sweep must be"],
                        [argv + ["--disagg", "2-2"], "prefill:decode"],
                        [argv + ["--router", "fastest"], "router must be"],
                        [["sim", "--profile", str(tmp_path / "none.json")], "cannot read profile"]):
        assert main(bad) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err


def test_profile_command_feeds_the_simulator(tiny_model_dir, tmp_path, capsys):
    prof = tmp_path / "prof.json"
    assert main(["profile", tiny_model_dir(), "--out", str(prof), "--contexts", "32", "--decode-requests", "0,2",
                 "--prefill-tokens", "0,16,128", "--prefill-chunks", "1,2", "--repeats", "1",
                 "--max-model-len", "256"]) == 0
    data = json.loads(prof.read_text())
    # decode-only, and for 0 and 2 decode rows: 16 tokens, 128 in one prompt, 128 in two of 64 (16 / 2 < 64)
    assert len(data["points"]) == 7 and data["num_blocks"] > 0 and data["kv_bytes_per_token"] > 0
    assert all(p["step_s"] > 0 for p in data["points"])
    split = [p for p in data["points"] if p["prefill_chunks"] == 2]
    assert len(split) == 2 and all(p["prefill_tokens"] == 128 and p["prefill_pairs"] == 2 * 64 * 65 // 2
                                   for p in split)
    assert data["fit"]["step_model"] in data["fit"]["cv_rel_err_mean"]
    capsys.readouterr()
    assert main(["sim", "--profile", str(prof), "--num-requests", "5", "--input-len", "8", "--output-len", "4",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 5


def test_serving_overheads_and_ingress_latency():
    # the hand-checked schedule again, with 0.5 s ingress: everything shifts by 0.5 s after the arrival
    wl = [SimRequest("A", 0.0, 10, 3), SimRequest("B", 0.5, 4, 2)]
    inst = InstanceConfig(num_blocks=100, block_size=4, max_num_batched_tokens=8)
    a, b = simulate(wl, LinearTimer(), FleetConfig(inst, ingress_latency=0.5)).records
    assert a.ttft == pytest.approx(3.9) and b.ttft == pytest.approx(3.4) and a.finish == pytest.approx(6.2)
    points = [{"prefill_tokens": 0, "prefill_pairs": 0, "decode_reqs": d, "decode_ctx": 10 * d,
               "step_s": 0.01 + 0.002 * d} for d in (1, 2, 4, 8)]
    bare = ProfileTimer({"points": points})
    served = ProfileTimer({"points": points, "overhead": {"step_s": 0.25, "row_s": 0.5, "row2_s": 0.125}})
    from frontierlm.sim.timing import BatchShape

    b = BatchShape(decode_reqs=2, decode_ctx=20, rows=2)
    assert bare.step_time(b) == pytest.approx(0.014)
    assert served.step_time(b) == pytest.approx(0.014 + 0.25 + 2 * 0.5 + 4 * 0.125)  # 2 rows: 2^2 x row2_s
    with pytest.raises(ValueError, match="overheads must be >= 0"):
        ProfileTimer({"points": points, "overhead": {"request_s": -1.0}})


def _grid(cost, chunks=(1,)):
    """A profile grid like `frontierlm profile`'s, timed by `cost(point)`."""
    from frontierlm.sim.timing import prefill_pairs

    points = []
    for c in (64, 160, 320):
        for d in (0, 1, 2, 4, 8, 16):
            for p in (0, 16, 64, 128, 256, 512):
                for k in chunks:
                    if (p or d) and (k == 1 or (p and p % k == 0 and p // k >= 64)):
                        pt = {"prefill_tokens": p, "prefill_chunks": k if p else 0, "decode_reqs": d,
                              "decode_ctx": d * (c + 4), "prefill_pairs": k * prefill_pairs(0, p // k) if p else 0}
                        pt["step_s"] = cost(pt)
                        points.append(pt)
    return points


def test_step_model_picks_the_form_that_generated_the_grid():
    from frontierlm.sim.step_model import StepModel

    def linear(p):
        return 2e-3 + 5e-5 * p["prefill_tokens"] + 1e-8 * p["prefill_pairs"] + 3e-4 * p["decode_reqs"]

    def one_row_cheap(p):  # a two-token step pays 10 ms more than a one-token step (matmul vs matvec)
        return linear(p) + (0.01 if p["prefill_tokens"] + p["decode_reqs"] >= 2 else 0.0)

    def per_chunk(p):  # and every prefill chunk costs 4 ms
        return one_row_cheap(p) + 4e-3 * p["prefill_chunks"]

    m = StepModel(_grid(linear))
    assert m.form == "linear" and max(m.rel_err) < 1e-6
    m = StepModel(_grid(one_row_cheap))
    assert m.form == "multi_row" and max(m.rel_err) < 1e-6
    assert dict(zip(m.features, m.coef))["multi_row"] == pytest.approx(0.01, rel=1e-6)
    assert m.cv["linear"] > 10 * m.cv["multi_row"]  # the straight line cannot fit the one-row steps
    m = StepModel(_grid(per_chunk, chunks=(1, 4)))
    assert "prefill_chunks" in m.features and max(m.rel_err) < 1e-6
    assert dict(zip(m.features, m.coef))["prefill_chunks"] == pytest.approx(4e-3, rel=1e-5)
    with pytest.raises(ValueError, match="step model must be one of"):
        StepModel(_grid(linear), "cubic")


def test_step_model_tolerates_noise_and_uses_held_out_error():
    from frontierlm.sim.step_model import StepModel

    rng = np.random.default_rng(1)

    def noisy(p):
        base = 0.015 + (0.012 if p["prefill_tokens"] + p["decode_reqs"] >= 2 else 0) + 8e-4 * p["prefill_tokens"] \
            + 1.6e-3 * p["decode_reqs"]
        return base * float(rng.lognormal(0.0, 0.08))

    m = StepModel(_grid(noisy))
    assert m.form in ("multi_row", "prefill_step+multi_row")
    assert m.cv[m.form] < m.cv["linear"] and m.cv_err == m.cv[m.form]
    one_row = {"const": 1, "prefill_tokens": 0, "prefill_pairs": 0, "decode_reqs": 1, "decode_ctx": 68,
               "prefill_step": 0, "multi_row": 0, "prefill_chunks": 0}
    assert m.predict(one_row) == pytest.approx(0.0166, rel=0.15)


def test_closed_loop_sends_the_next_request_when_one_finishes():
    # concurrency 1: each request goes out when the previous one finished, and its clock starts then
    wl = [SimRequest(f"r{i}", 0.0, 4, 2) for i in range(3)]
    inst = InstanceConfig(num_blocks=100, block_size=4)
    res = simulate(wl, LinearTimer(), FleetConfig(inst, max_concurrency=1))
    # each request: a prefill step of 4 tokens (1.4 s) then one decode step (1.1 s)
    for i, rec in enumerate(res.records):
        assert rec.arrival == pytest.approx(2.5 * i) and rec.ttft == pytest.approx(1.4)
        assert rec.finish == pytest.approx(2.5 * (i + 1))
    wl = synthetic(30, float("inf"), "4:20", "2:12", seed=2)
    res = simulate(wl, LinearTimer(), FleetConfig(inst, max_concurrency=4))
    _assert_invariants(res, wl)
    spans = sorted((r.arrival, r.finish) for r in res.records)
    for t, _ in spans:  # never more than 4 in flight
        assert sum(1 for a, f in spans if a <= t < f) <= 4
    with pytest.raises(ValueError, match="max_concurrency"):
        FleetConfig(inst, max_concurrency=0)


def test_request_cpu_is_charged_to_the_next_step():
    points = [{"prefill_tokens": 0, "prefill_pairs": 0, "decode_reqs": d, "decode_ctx": 10 * d,
               "step_s": 1.0 + 0.1 * d} for d in (1, 2, 4, 8)]
    points += [{"prefill_tokens": p, "prefill_pairs": p * (p + 1) // 2, "decode_reqs": 0, "decode_ctx": 0,
                "step_s": 1.0 + 0.1 * p} for p in (4, 8, 16)]
    timer = ProfileTimer({"points": points, "overhead": {"request_s": 0.5, "ingress_s": 0.25}})
    assert timer.request_overhead_s == 0.5 and timer.ingress_latency_s == 0.25
    # A and B arrive together: A's step starts at once and carries A's 0.5 s; B waits for the next step,
    # which carries B's 0.5 s
    wl = [SimRequest("A", 0.0, 4, 1), SimRequest("B", 0.0, 4, 1)]
    a, b = simulate(wl, timer, FleetConfig(InstanceConfig(num_blocks=100, block_size=4))).records
    assert a.first_token == pytest.approx(timer.engine_time(_prefill(4)) + 0.5)
    assert b.first_token == pytest.approx(a.first_token + timer.engine_time(_prefill(4)) + 0.5)


def _prefill(n):
    from frontierlm.sim.timing import BatchShape, prefill_pairs

    return BatchShape(prefill_tokens=n, prefill_pairs=prefill_pairs(0, n), prefill_chunks=1, rows=1)


def test_fit_overheads_recovers_what_generated_the_closed_loop_runs():
    from frontierlm.sim.calibrate import PARAMS, ClosedLoopRun, fit_overheads, simulate_run

    timer = ProfileTimer({"points": _grid(lambda p: 2e-3 + 2e-5 * p["prefill_tokens"] + 1e-4 * p["decode_reqs"]
                                          + 1e-8 * p["decode_ctx"])})
    truth = {"step_s": 2e-4, "row_s": 5e-5, "row2_s": 4e-6, "request_s": 1.5e-3, "ingress_s": 1e-3}
    inst = InstanceConfig(num_blocks=400, block_size=16, max_num_seqs=8)
    served = ProfileTimer({"points": timer.profile["points"], "overhead": truth})
    runs = []
    for name, n, conc, inp, out, figs in (("c1", 4, 1, 64, 16, ("ttft_p50", "tpot_p50")),
                                          ("c3", 9, 3, 64, 16, ("ttft_p50", "tpot_p50", "output_throughput")),
                                          ("c8", 16, 8, 64, 16, ("ttft_p50", "tpot_p50", "output_throughput")),
                                          ("short", 24, 8, 16, 2, ("ttft_p50", "request_throughput"))):
        probe = ClosedLoopRun(name, n, conc, inp, out, {"ttft_p50": 1.0, "tpot_p50": 1.0}, ())
        rep = simulate_run(served, probe, inst, truth["ingress_s"])
        measured = {"ttft_p50": rep["ttft_ms"]["p50"] / 1e3, "tpot_p50": rep["tpot_ms"]["p50"] / 1e3,
                    "output_throughput": rep["output_throughput"], "request_throughput": rep["request_throughput"]}
        runs.append(ClosedLoopRun(name, n, conc, inp, out, measured, figs))
    fit = fit_overheads(timer, runs, inst)
    assert max(abs(r["error"]) for r in fit.rows) < 0.01
    for k in PARAMS:
        assert fit.params[k] == pytest.approx(truth[k], rel=0.2, abs=2e-5 if k != "row2_s" else 2e-6), k
    held = fit_overheads(timer, runs, inst, fixed={"request_s": 0.0})
    assert held.params["request_s"] == 0.0
    with pytest.raises(ValueError, match="unknown overheads"):
        fit_overheads(timer, runs, inst, fixed={"gil_s": 0.0})
    with pytest.raises(ValueError, match="no measured value"):
        ClosedLoopRun("x", 1, 1, 8, 2, {}, ("ttft_p50",))


def test_trace_prompt_ids_reach_the_prefix_cache(tmp_path):
    from frontierlm.sim.workload import load_trace

    prompt = list(range(100, 164))
    path = tmp_path / "t.jsonl"
    rows = [{"arrival_s": t, "prompt_len": 64, "output_len": 4, "prompt_ids": prompt} for t in (0.0, 30.0)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    wl = load_trace(str(path))
    assert wl[0].prompt_ids == tuple(prompt)
    inst = InstanceConfig(num_blocks=100, block_size=16, enable_prefix_caching=True)
    res = simulate(wl, LinearTimer(), FleetConfig(inst))
    a, b = res.records
    # the second prompt finds the first's three full blocks (48 tokens; the last block is recomputed so the
    # last prompt token runs): 16 tokens to prefill instead of 64
    assert a.ttft == pytest.approx(1.0 + 0.1 * 64) and b.ttft == pytest.approx(1.0 + 0.1 * 16)
    rows[1]["prompt_ids"] = prompt[:10]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="10 prompt_ids for prompt_len 64"):
        load_trace(str(path))
