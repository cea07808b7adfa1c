"""The served path's step log and the step model fitted from it: the engine writes the log, the simulator
reads it, tabulates step time by decode rows, and a replay from a hand-made log follows a hand-checked schedule."""
import numpy as np
import pytest

from frontierlm.engine.step_log import COLUMNS
from frontierlm.sim.fleet import FleetConfig, simulate
from frontierlm.sim.instance import InstanceConfig
from frontierlm.sim.served import read_step_log, served_profile, step_points
from frontierlm.sim.step_model import StepModel
from frontierlm.sim.step_table import TableModel, knot_groups
from frontierlm.sim.timing import BatchShape, ProfileTimer
from frontierlm.sim.workload import SimRequest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_engine_writes_a_step_log_the_simulator_reads(tiny_model_dir, tmp_path):
    from frontierlm.config import EngineConfig
    from frontierlm.engine.llm_engine import LLMEngine
    from frontierlm.sampling_params import SamplingParams

    path = tmp_path / "steps.csv"
    assert EngineConfig(model=tiny_model_dir()).step_log is None  # off by default (the engine opens no file)
    eng = LLMEngine(EngineConfig(model=tiny_model_dir(), max_model_len=128, step_log=str(path),
                                 max_num_batched_tokens=32, enable_prefix_caching=False))
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
    eng.add_request("a", list(range(10, 30)), params)  # 20 prompt tokens
    eng.add_request("b", list(range(40, 60)), params)
    steps = 0
    while eng.has_unfinished_requests():
        eng.step()
        steps += 1
    eng.shutdown()
    log = read_step_log(str(path))
    assert list(log[0]) == list(COLUMNS) and len(log) == steps
    # budget 32: a's 20 tokens and 12 of b's, then b's last 8 beside a's first decode row (context 21)
    first, second = log[0], log[1]
    assert (first["prefill_tokens"], first["prefill_chunks"], first["decode_rows"]) == (32, 2, 0)
    assert first["prefill_pairs"] == 20 * 21 // 2 + 12 * 13 // 2 and first["busy_before"] == 0
    assert (second["prefill_tokens"], second["prefill_chunks"]) == (8, 1)
    assert (second["decode_rows"], second["decode_ctx"]) == (1, 21)
    assert second["prefill_pairs"] == 8 * 12 + 8 * 9 // 2 and second["busy_before"] == 1
    # then both decode (a finishes with its 4th token), then b alone
    assert [(s["decode_rows"], s["decode_ctx"], s["prefill_tokens"]) for s in log[2:]] == \
        [(2, 22 + 21, 0), (2, 23 + 22, 0), (1, 23, 0)]
    assert all(s["wall_s"] > 0 and s["gap_s"] >= 0 for s in log)
    assert all(a["t"] <= b["t"] for a, b in zip(log, log[1:]))
    pts = step_points(log)
    assert pts[1]["step_s"] == pytest.approx(log[1]["wall_s"] + log[1]["gap_s"])  # busy: the gap is the loop's
    assert pts[0]["step_s"] == pytest.approx(log[0]["wall_s"])  # after idle: the gap was waiting
    assert step_points(log, log[2]["t"], log[3]["t"]) == pts[2:4]
    # a log cut off mid-line (a killed server) still reads
    path.write_text(path.read_text() + "1.0,0.01")
    assert len(read_step_log(str(path))) == steps
    with pytest.raises(ValueError, match="columns"):
        (tmp_path / "bad.csv").write_text("t,wall\n1,2\n")
        read_step_log(str(tmp_path / "bad.csv"))


def _decode_points(cost, rows=(1, 2, 4, 8, 16), ctxs=(64, 100, 160, 240, 320, 400)):
    return [{"prefill_tokens": 0, "prefill_chunks": 0, "prefill_pairs": 0, "decode_reqs": d,
             "decode_ctx": d * c, "step_s": cost(d, d * c)} for d in rows for c in ctxs]


def test_table_interpolates_and_follows_the_data():
    # this CPU's shape: 8 decode rows slower than 16 (docs/benchmarks.md); 1e-6 s per context token
    knots = {1: 0.020, 2: 0.030, 4: 0.035, 8: 0.060, 16: 0.048}
    pts = _decode_points(lambda d, ctx: knots[d] + 1e-6 * ctx)
    rows = [dict(p, const=1.0) for p in pts]
    t = TableModel(rows, np.array([p["step_s"] for p in pts]))
    assert t.knots.tolist() == [1, 2, 4, 8, 16] and t.values == pytest.approx(list(knots.values()), rel=1e-6)
    assert t.coef["decode_ctx"] == pytest.approx(1e-6, rel=1e-6) and max(t.rel_err) < 1e-6

    def at(d, ctx=0):
        return t.predict({"decode_reqs": d, "decode_ctx": ctx, "prefill_tokens": 0, "prefill_pairs": 0,
                          "prefill_chunks": 0})

    assert at(6) == pytest.approx((0.035 + 0.060) / 2, rel=1e-6)  # halfway between the 4- and 8-row knots
    assert at(12, 1200) == pytest.approx((0.060 + 0.048) / 2 + 1.2e-3, rel=1e-6)
    assert at(8) > at(16)  # not monotone where the data is not
    assert at(0) == pytest.approx(0.020)  # flat below the first knot, the last segment extended above
    assert at(24) == pytest.approx(0.048 + (0.048 - 0.060) / 8 * 8)
    # monotone data: monotone table, everywhere between the knots
    mono = _decode_points(lambda d, ctx: 0.015 + 0.004 * d ** 0.7 + 1e-6 * ctx)
    tm = TableModel([dict(p, const=1.0) for p in mono], np.array([p["step_s"] for p in mono]))
    grid = [tm.predict({"decode_reqs": d, "decode_ctx": 0, "prefill_tokens": 0, "prefill_pairs": 0,
                        "prefill_chunks": 0}) for d in np.linspace(1, 16, 61)]
    assert all(b >= a for a, b in zip(grid, grid[1:]))
    # rare row counts join a neighbour's knot
    assert knot_groups(np.array([1] * 5 + [2, 3] + [4] * 5 + [5])) == [[1], [2, 3, 4, 5]]


def test_cross_validation_chooses_the_table_only_for_served_steps():
    rng = np.random.default_rng(0)
    knots = {1: 0.020, 2: 0.030, 4: 0.035, 8: 0.060, 16: 0.048}
    pts = _decode_points(lambda d, ctx: (knots[d] + 1e-6 * ctx) * float(rng.lognormal(0, 0.03)))
    served = StepModel(pts, table=True)
    assert served.form == "table" and served.cv["table"] < 0.5 * min(v for k, v in served.cv.items() if k != "table")
    assert served.predict({"decode_reqs": 8, "decode_ctx": 800, "prefill_tokens": 0, "prefill_pairs": 0,
                           "prefill_chunks": 0}) == pytest.approx(0.0608, rel=0.05)
    assert "table" not in StepModel(pts).cv  # a `frontierlm profile` grid keeps the linear forms
    with pytest.raises(ValueError, match="step model must be one of"):
        StepModel(pts, "table")
    # one row count only: nothing to tabulate, the table is not offered
    assert "table" not in StepModel(_decode_points(lambda d, ctx: 0.02 + 1e-6 * ctx, rows=(4,)), table=True).cv


def test_replay_from_a_synthetic_step_log_follows_a_hand_checked_schedule(tmp_path):
    """Served steps: 0.10 s with no decode row, 0.05 s with one, 0.07 s with two, plus 0.01 s per prefill
    token; context costs nothing. The log says so with wall + busy gap, and one idle gap it must ignore."""
    lines, t = [",".join(COLUMNS)], 0.0

    def step(total, gap, busy, pt, dr, ctx):  # wall + the gap before it (when busy) = total
        nonlocal t
        t += 1.0
        wall = total - (gap if busy else 0.0)
        lines.append(f"{t},{wall},{gap},{busy},{pt},{1 if pt else 0},{pt * (pt + 1) // 2},{dr},{ctx},{pt + dr}")

    for i in range(6):
        pt = 4 * (1 + i % 3)  # 4, 8, 12 prompt tokens
        step(0.10 + 0.01 * pt, 5.0 if i == 0 else 0.002, int(i > 0), pt, 0, 0)
        step(0.05, 0.001, 1, 0, 1, 5 + 3 * i)
        step(0.05 + 0.04, 0.003, 1, 4, 1, 6 + i)
        step(0.07, 0.0, 1, 0, 2, 11 + 2 * i)
    (tmp_path / "steps.csv").write_text("\n".join(lines) + "\n")
    log = read_step_log(str(tmp_path / "steps.csv"))
    prof = served_profile(step_points(log), {"num_blocks": 100, "kv_bytes_per_token": 64})
    timer = ProfileTimer(prof)
    assert timer.model.form == "table" and timer.step_overhead_s == 0.0
    assert timer.step_time(BatchShape(prefill_tokens=4, prefill_chunks=1, prefill_pairs=10, rows=1)) == \
        pytest.approx(0.14, abs=1e-9)  # the first step's idle 5 s gap is not in it
    # A (prompt 4, 3 tokens) at 0, B (prompt 4, 3 tokens) at 0.05:
    #   [0, 0.14] A's prefill; [0.14, 0.23] A decodes, B prefills; [0.23, 0.30] both decode; [0.30, 0.35] B
    wl = [SimRequest("A", 0.0, 4, 3), SimRequest("B", 0.05, 4, 3)]
    inst = InstanceConfig(num_blocks=100, block_size=4, max_num_batched_tokens=8)
    a, b = simulate(wl, timer, FleetConfig(inst)).records
    assert a.ttft == pytest.approx(0.14, abs=1e-9) and a.finish == pytest.approx(0.30, abs=1e-9)
    assert b.ttft == pytest.approx(0.18, abs=1e-9) and b.finish == pytest.approx(0.35, abs=1e-9)
