"""AdaptiveK: K per request from the measured step cost and each request's acceptance; a request switched off
after bad rounds is tried again once its evidence has aged."""
from types import SimpleNamespace

from frontierlm.spec.adaptive import AdaptiveK, LinearCost


class _FreeProposer:  # n-gram lookup: proposing costs nothing measurable
    def expected_cost(self, num_requests, k):
        return 0.0


def _adaptive_with_costly_tokens() -> AdaptiveK:
    ak = AdaptiveK(num_speculative_tokens=3, adaptive=True)
    # A step costs 10 ms + 5 ms per token (the prior agrees), so one more token pays off above alpha ~ 1/3:
    # (1 + alpha) / 20 ms > 1 / 15 ms.
    ak.step_cost = LinearCost(prior_ratio=2.0)
    for tokens in range(1, 40):
        ak.step_cost.observe(tokens, 0.010 + 0.005 * tokens)
    return ak


def test_full_k_until_the_step_cost_is_measured():
    ak = AdaptiveK(num_speculative_tokens=3, adaptive=True)
    req = SimpleNamespace(request_id="a")
    assert ak.choose([req], [3], [False], 0, _FreeProposer()) == [3]


def test_good_requests_speculate_and_bad_ones_stop():
    ak = _adaptive_with_costly_tokens()
    good, bad = SimpleNamespace(request_id="good"), SimpleNamespace(request_id="bad")
    for _ in range(10):
        ak.record("good", 3, 3)
        ak.record("bad", 3, 0)
    ks = ak.choose([good, bad], [3, 3], [False, False], 0, _FreeProposer())
    assert ks[0] == 3 and ks[1] == 0


def test_a_switched_off_request_is_tried_again():
    ak = _adaptive_with_costly_tokens()
    bad = SimpleNamespace(request_id="bad")
    for _ in range(10):
        ak.record("bad", 3, 0)
    history = [ak.choose([bad], [3], [False], 0, _FreeProposer())[0] for _ in range(12)]
    assert history[0] == 0 and max(history) > 0  # its low estimate aged back towards the prior
    assert ak.acceptance("bad") > 0.3


def test_pinned_requests_keep_their_cap():
    ak = _adaptive_with_costly_tokens()
    ak.record("seeded", 3, 0)
    assert ak.choose([SimpleNamespace(request_id="seeded")], [2], [True], 0, _FreeProposer()) == [2]


def test_a_costly_verifying_step_turns_speculation_off():
    """Plain steps cost 1.6 ms whatever their size and verifying steps 3 ms (a compiled plain step against a
    speculative step's other graph and host work): a request accepting about a third of its proposals gains
    ~1.6 tokens a round for ~1.9x the time, so K = 0; it speculates while verifying is priced as a plain step."""
    ak = AdaptiveK(num_speculative_tokens=3, adaptive=True)
    req = SimpleNamespace(request_id="r")
    for _ in range(10):
        ak.record("r", 1, 1)
        ak.record("r", 1, 0)
        ak.record("r", 1, 0)
    for tokens in (1, 2, 4):
        for _ in range(8):
            ak.step_cost.observe(tokens, 0.0016)
    assert ak.choose([req], [3], [False], 0, _FreeProposer())[0] > 0
    for tokens in (2, 3, 4):
        for _ in range(8):
            ak.spec_cost.observe(tokens, 0.0030)
    assert ak.choose([req], [3], [False], 0, _FreeProposer()) == [0]


class _Path:
    """What LinearCost.observe_on reads of a fast path; `ran` is one compiled step on it."""

    def __init__(self):
        self.disabled, self.fast_steps, self._seen = False, 0, set()

    def ran(self, shape=None):
        self.fast_steps += 1
        if shape is not None:
            self._seen.add(shape)
        return self


def test_the_cost_model_keeps_only_steady_compiled_steps():
    cost, path = LinearCost(), _Path()
    cost.seed(1, 0.004)  # a start-up (eager) sample
    for _ in range(5):  # the path's eager warm-up steps: not kept
        cost.observe_on(path, 3, 0.004)
    assert not cost.obs and cost.seeds
    cost.observe_on(path.ran((3, 8)), 3, 20.0)  # the first compiled step (it compiled): starts the model afresh
    assert not cost.obs and not cost.seeds and cost.compiled
    for _ in range(4):
        cost.observe_on(path.ran(), 3, 0.0015)
    cost.observe_on(path, 40, 0.006)  # a mixed step, eager: not kept
    cost.observe_on(path.ran((5, 8)), 5, 0.004)  # a shape met for the first time: its guards cost the step
    cost.observe_on(path.ran(), 5, 0.0018)
    assert [t for _, t in cost.obs] == [0.0015] * 4 + [0.0018]
    cost.observe_on(path.ran(), 5, 9.0)  # a later compile inside a step (50x its prediction): left out
    assert len(cost.obs) == 5 and cost.num_outliers == 1
    assert abs(cost.predict(3) - 0.0015) < 0.0003
    eager = LinearCost()  # an engine without a fast path keeps every step
    eager.observe_on(None, 1, 0.004)
    assert len(eager.obs) == 1


def test_plain_steps_run_until_the_plain_path_is_measured_compiled():
    """Verifying steps compiled, the plain step known only from its eager warm-up: plain steps run (they compile
    the plain path, then measure it), a bounded number of times."""
    from frontierlm.spec import adaptive as adaptive_module

    ak = AdaptiveK(num_speculative_tokens=3, adaptive=True)
    ak.plain_path = plain = _Path()
    reqs = [SimpleNamespace(request_id="a")]
    ak.step_cost.seed(1, 0.003)  # eager: 3x what the compiled step will cost
    verify = _Path()
    ak.spec_cost.observe_on(verify.ran((4, 8)), 4, 5.0)  # compiled now
    for _ in range(5):
        ak.spec_cost.observe_on(verify.ran(), 4, 0.0012)
    assert ak.choose(reqs, [3], [False], 0, _FreeProposer()) == [0] and ak.forced_plain == 1
    ak.step_cost.observe_on(plain.ran((1, 8)), 1, 4.0)  # the plain step that compiled: still unmeasured
    assert ak.choose(reqs, [3], [False], 0, _FreeProposer()) == [0] and ak.forced_plain == 2
    ak.step_cost.observe_on(plain.ran(), 1, 0.001)
    assert ak.choose(reqs, [3], [False], 0, _FreeProposer()) != [0] and ak.forced_plain == 2
    stuck = AdaptiveK(num_speculative_tokens=3, adaptive=True)  # a plain path that never compiles
    stuck.plain_path, stuck.spec_cost = _Path(), ak.spec_cost
    stuck.step_cost.seed(1, 0.003)
    for _ in range(adaptive_module.MAX_FORCED_PLAIN + 3):
        stuck.choose(reqs, [3], [False], 0, _FreeProposer())
    assert stuck.forced_plain == adaptive_module.MAX_FORCED_PLAIN


def test_the_cost_line_prices_the_steps_it_measured_at_their_cost():
    """Verifying steps measured only near one size (9 rows at 2.2-2.6 ms) are priced there at what they cost:
    the prior shapes the slope, not the level (a prior in the intercept priced them at 3.5 ms)."""
    cost = LinearCost()
    for i in range(8):
        cost.observe(9 - i % 2, 0.0022 + 0.0001 * (i % 5))
    assert abs(cost.predict(8.5) - 0.0024) < 0.0002
    a, b = cost.coefficients()
    assert a > 0 and 0 < b < a / 8  # a step's fixed cost dominates, as the prior says
    wide = LinearCost()
    for tokens in range(1, 60):
        wide.observe(tokens, 0.001 + 0.0002 * tokens)
    a, b = wide.coefficients()
    assert abs(a - 0.001) < 1e-4 and abs(b - 0.0002) < 1e-5  # varied x: the data decide
