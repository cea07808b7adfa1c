import random

from frontierlm.engine.kv_cache import KVCacheManager
from frontierlm.engine.request import RequestStatus
from frontierlm.engine.scheduler import RunnerOutput, Scheduler
from test_kv_cache import make_request


def make_scheduler(num_blocks=100, block_size=4, max_seqs=8, budget=32, max_len=1000):
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(kv, max_seqs, budget, max_len)


def fake_step(sched: Scheduler, token=7):
    out = sched.schedule()
    result = RunnerOutput(sampled={s.request.request_id: token for s in out.scheduled if s.samples})
    sched.update_from_output(out, result)
    return out


def test_budget_respected_and_long_prompts_chunked():
    s = make_scheduler(budget=16)
    s.add_request(make_request("long", range(40), max_tokens=4))
    s.add_request(make_request("short", range(100, 105), max_tokens=4))
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("long", 16)]
    assert not out.scheduled[0].samples
    s.update_from_output(out, RunnerOutput(sampled={}))
    out = fake_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("long", 16)]
    out = fake_step(s)
    # the rest of the long prompt (8) and the whole short prompt (5) share one step
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("long", 8), ("short", 5)]
    assert all(x.samples for x in out.scheduled)
    out = fake_step(s)
    # decode of both: running requests first, one token each
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("long", 1), ("short", 1)]


def test_mixed_prefill_and_decode_in_one_batch():
    s = make_scheduler(budget=10)
    s.add_request(make_request("a", range(3), max_tokens=10))
    fake_step(s)
    s.add_request(make_request("b", range(50, 70), max_tokens=10))
    out = fake_step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 9)]


def test_waiting_admitted_by_priority_then_fcfs():
    s = make_scheduler(max_seqs=2, budget=100)
    s.add_request(make_request("late-low", range(4), priority=5, arrival=1.0))
    s.add_request(make_request("early-low", range(4), priority=5, arrival=0.5))
    s.add_request(make_request("high", range(4), priority=-1, arrival=2.0))
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["high", "early-low"]
    assert [r.request_id for r in s.waiting] == ["late-low"]


def test_preemption_takes_lowest_priority_latest_arrival_and_requeues():
    # 6 blocks of 4 tokens; three requests of 8 prompt tokens each fill all 6 blocks after the first step.
    s = make_scheduler(num_blocks=6, budget=100)
    s.add_request(make_request("p0-old", range(8), max_tokens=20, priority=0, arrival=0.0))
    s.add_request(make_request("p1", range(10, 18), max_tokens=20, priority=1, arrival=0.5))
    s.add_request(make_request("p0-new", range(20, 28), max_tokens=20, priority=0, arrival=1.0))
    fake_step(s)
    assert len(s.running) == 3 and s.kv.pool.num_free_blocks == 0
    out = fake_step(s)  # each needs a new block for token 9: the lowest priority (p1) goes first
    assert [r.request_id for r in out.preempted] == ["p1"]
    assert s.requests["p1"].status == RequestStatus.PREEMPTED and s.requests["p1"].num_computed_tokens == 0
    assert [x.request.request_id for x in out.scheduled] == ["p0-old", "p0-new"]
    # the preempted request keeps its generated token and waits at the front of its priority
    assert s.requests["p1"].output_token_ids == [7]
    assert [r.request_id for r in s.waiting] == ["p1"]


def test_same_priority_preempts_latest_arrival():
    s = make_scheduler(num_blocks=4, budget=100)
    s.add_request(make_request("first", range(8), max_tokens=20, arrival=0.0))
    s.add_request(make_request("second", range(10, 18), max_tokens=20, arrival=1.0))
    fake_step(s)
    out = fake_step(s)
    assert [r.request_id for r in out.preempted] == ["second"]


def test_max_num_seqs_caps_running():
    s = make_scheduler(max_seqs=3, budget=1000)
    for i in range(5):
        s.add_request(make_request(f"r{i}", range(i * 10, i * 10 + 3)))
    out = s.schedule()
    assert len(out.scheduled) == 3 and len(s.waiting) == 2


def test_finish_and_abort_free_blocks():
    s = make_scheduler(num_blocks=20)
    s.add_request(make_request("a", range(6), max_tokens=2))
    s.add_request(make_request("b", range(6), max_tokens=50))
    fake_step(s)
    fake_step(s)  # a reaches max_tokens=2
    assert "a" not in s.requests
    s.finish_request("b", RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished_requests()
    assert s.kv.pool.num_free_blocks == 20


def test_random_workload_finishes_everything_without_leaks():
    rng = random.Random(1)
    s = make_scheduler(num_blocks=24, block_size=4, max_seqs=6, budget=24)
    for i in range(40):
        n = rng.randint(1, 30)
        s.add_request(make_request(f"r{i}", [rng.randrange(50) for _ in range(n)], max_tokens=rng.randint(1, 30),
                                   priority=rng.randint(0, 2), arrival=float(i)))
    steps = 0
    while s.has_unfinished_requests():
        out = fake_step(s, token=rng.randrange(50))
        assert out.num_tokens <= 24 and len(s.running) <= 6
        steps += 1
        assert steps < 10_000
    assert s.kv.pool.num_free_blocks == 24
