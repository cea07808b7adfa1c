"""Pipeline parallelism with several batches in flight (distributed/virtual_engines.py).

The scheduling rule is checked on the real Scheduler with a simulated pipeline of depth 2 and 3 (a batch
comes back pp - 1 ticks after it went in): no request is ever in two batches in flight, in-flight requests are
never preempted, the running requests spread over the batches, and every request still gets all its tokens.
The engine runs (greedy tokens equal to transformers, with chunked prefill, prefix caching and preemption, and
two batches in flight) are in test_parallel.py and test_parallel_quant.py."""
from collections import deque

import pytest

from frontierlm.distributed.virtual_engines import schedule_free
from frontierlm.engine.scheduler import RunnerOutput
from test_kv_cache import make_request
from test_scheduler import make_scheduler


def _run_pipeline(s, pp, max_ticks=2000):
    """Tick like VirtualEngines.step; returns the per-tick batches' request ids and the most in flight."""
    in_flight, busy, batches, most = deque(), set(), [], 0
    for _ in range(max_ticks):
        if not s.has_unfinished_requests() and not any(in_flight):
            break
        out = schedule_free(s, busy, pp)
        ids = [x.request.request_id for x in out.scheduled]
        assert not set(ids) & busy, "a request in flight was scheduled again"
        assert not {r.request_id for r in out.preempted} & busy, "a request in flight was preempted"
        assert len(s.running) <= s.max_num_seqs
        busy.update(ids)
        in_flight.append(out if ids else None)
        batches.append(ids)
        most = max(most, sum(b is not None for b in in_flight))
        if len(in_flight) == pp:
            done = in_flight.popleft()
            if done is not None:
                busy.difference_update(x.request.request_id for x in done.scheduled)
                s.update_from_output(done, RunnerOutput(
                    sampled={x.request.request_id: 7 for x in done.scheduled if x.samples}))
    assert not s.has_unfinished_requests()
    return batches, most


@pytest.mark.parametrize("pp", [2, 3])
def test_batches_in_flight_never_share_a_request(pp):
    s = make_scheduler(num_blocks=200, budget=64)
    reqs = [make_request(f"r{i}", range(10 * i, 10 * i + 5 + i), max_tokens=6) for i in range(8)]
    for r in reqs:
        s.add_request(r)
    batches, most = _run_pipeline(s, pp)
    assert most == pp
    assert all(r.num_output_tokens == 6 for r in reqs)
    # decoding: the 8 running requests spread over the pp batches (at most ceil(8 / pp) each), not all in one
    decode = [b for b in batches[pp + 1:-2 * pp] if b]
    assert decode and all(len(b) <= -(-8 // pp) for b in decode)
    assert sum(1 for b in batches[pp + 1:-2 * pp] if not b) <= 1  # the pipeline stays full


def test_preemption_only_takes_requests_not_in_flight():
    """Too few blocks for everyone: requests are preempted and recomputed, never one whose batch is out."""
    s = make_scheduler(num_blocks=14, budget=16)
    reqs = [make_request(f"r{i}", range(20 * i, 20 * i + 9), max_tokens=12) for i in range(6)]
    for r in reqs:
        s.add_request(r)
    _run_pipeline(s, 2)
    assert s.num_preemptions > 0
    assert all(r.num_output_tokens == 12 for r in reqs)


def test_a_lone_request_alternates_with_empty_ticks():
    """One request cannot fill two batches: every other tick only drains the pipeline."""
    s = make_scheduler()
    s.add_request(make_request("only", range(5), max_tokens=4))
    batches, most = _run_pipeline(s, 2)
    assert most == 1
    assert batches == [["only"], [], ["only"], [], ["only"], [], ["only"], []]
