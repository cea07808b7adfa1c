"""PayoffGuard: speculation switched off where its tokens cost more than plain ones (whatever the cost model
predicted), for a cool-down that doubles while it keeps losing; and, inside the engine, outputs unchanged."""
import pytest

from frontierlm import LLM
from frontierlm.spec import guard as g
from frontierlm.spec.guard import PayoffGuard
from spec_helpers import assert_no_leaks, greedy, mtp_model_dir, prompts, token_ids


def _steps(guard, n, num_requests, emitted, seconds, speculated):
    for _ in range(n):
        guard.tick()
        guard.record(num_requests, emitted, seconds, speculated)


def test_a_losing_trial_switches_its_bucket_off_and_the_cooldown_doubles():
    guard = PayoffGuard()
    _steps(guard, g.MIN_PLAIN_STEPS, 4, 4, 0.002, False)  # plain: 0.5 ms per token
    _steps(guard, g.TRIAL_STEPS - 1, 4, 6, 0.004, True)  # speculating: 0.67 ms per token
    assert guard.allows(4)
    _steps(guard, 1, 4, 6, 0.004, True)
    assert not guard.allows(4) and not guard.allows(7) and guard.num_vetoes == 1
    assert guard.allows(1) and guard.allows(8)  # other batch sizes keep their own record
    for _ in range(g.FIRST_COOLDOWN - 1):
        guard.tick()
    assert not guard.allows(5)
    guard.tick()
    assert guard.allows(5)  # tried again after the cool-down
    _steps(guard, g.TRIAL_STEPS, 4, 6, 0.004, True)
    assert guard.num_vetoes == 2
    off = 0
    while not guard.allows(4):
        guard.tick()
        off += 1
    assert off == 2 * g.FIRST_COOLDOWN


def test_a_paying_trial_is_never_vetoed_and_resets_the_cooldown():
    guard = PayoffGuard()
    _steps(guard, g.MIN_PLAIN_STEPS, 1, 1, 0.001, False)
    _steps(guard, 10 * g.TRIAL_STEPS, 1, 3, 0.0018, True)  # 0.6 ms per token
    assert guard.allows(1) and guard.num_vetoes == 0
    bucket = guard.buckets[1]
    bucket.cooldown = 4 * g.FIRST_COOLDOWN
    _steps(guard, g.TRIAL_STEPS, 1, 3, 0.0018, True)
    assert bucket.cooldown == g.FIRST_COOLDOWN


def test_a_loss_within_the_margin_is_noise():
    guard = PayoffGuard()
    _steps(guard, g.MIN_PLAIN_STEPS, 2, 2, 0.002, False)
    _steps(guard, g.TRIAL_STEPS, 2, 4, 0.002 * 2 * (1 + g.LOSS_MARGIN / 2), True)
    assert guard.allows(2)


def test_plain_steps_are_asked_for_when_a_trial_has_none_to_compare_with():
    guard = PayoffGuard()
    _steps(guard, g.TRIAL_STEPS, 16, 20, 0.01, True)
    assert guard.wants_plain(16) and guard.allows(16)
    _steps(guard, g.MIN_PLAIN_STEPS, 16, 16, 0.004, False)  # 0.25 ms per token vs 0.5: the trial lost
    assert not guard.wants_plain(16) and not guard.allows(16)


@pytest.mark.usefixtures("one_thread")
def test_speculation_that_loses_is_switched_off_and_outputs_stay_the_same(tmp_path_factory):
    """The cost model is made to speculate always, and every verifying step is made to look 10x dearer than
    it ran: only the guard can stop it, and it does after a trial per batch size; tokens stay the plain ones."""
    target = mtp_model_dir(tmp_path_factory)
    ps, params = prompts(lens=(7, 19, 3, 11), seed=3), greedy(max_tokens=120)
    ref = token_ids(LLM(target, block_size=4), ps, params)
    llm = LLM(target, block_size=4, speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    spec = llm.llm_engine.spec
    spec.adaptive.choose = lambda requests, caps, *rest: list(caps)
    observe = spec.observe_step
    spec.observe_step = lambda sched, seconds: observe(sched, seconds * 10 if spec._spec_step else seconds)
    assert token_ids(llm, ps, params) == ref
    assert spec.guard.num_vetoes >= 1
    steps_with_drafts = spec.stats.num_drafts  # per request and step
    assert 0 < steps_with_drafts < 0.5 * 4 * 120 / 2, steps_with_drafts
    assert_no_leaks(llm)
