"""Adaptive draft length.

Per request, the chance that the next proposal is accepted is estimated from its recent rounds (decayed counts
of accepted proposals and of the first rejections, with a prior). Per step, a cost model measured on the fly
(target step seconds vs tokens in the step, plain and verifying steps apart, proposer seconds vs requests per
draft forward, fitted by least squares over recent observations) prices every candidate proposal; the proposals
are taken in order of their expected value (alpha_i ** j for the j-th proposal of request i) while that raises the expected tokens per
second of the step. A large batch makes each verified token cost as much as a generated one, so K falls to 0
there; a lone request with a good proposer gets the full K."""
from __future__ import annotations

import time
from collections import deque

import numpy as np


def cost_clock(device) -> callable:
    """What the cost model times with: CPU seconds of the process on a CPU device (the work done, which a
    CPU shared with other processes does not inflate the way it inflates wall time), wall seconds on an
    accelerator (its work is not CPU time)."""
    return time.process_time if str(device).startswith("cpu") else time.perf_counter


# The ridge prior on a cost line's slope weighs as much as prior_weight observations this many units of x
# either side of the data's mean.
PRIOR_SPREAD = 4.0


# An observation this many times its prediction is not a step's cost but something inside it (a compile).
OUTLIER_RATIO = 50.0


class LinearCost:
    """seconds ~ a + b * x over the last `window` observations, through their mean; a ridge prior on the slope
    (a = `prior_ratio` * b, the fixed cost of a step worth that many units of x) keeps it sane while x has
    barely varied."""

    def __init__(self, window: int = 256, prior_ratio: float = 64.0, prior_weight: float = 4.0):
        self.obs: deque[tuple[float, float]] = deque(maxlen=window)
        self.seeds: list[tuple[float, float]] = []  # start-up samples, used until the first real observation
        self.prior_ratio, self.prior_weight = prior_ratio, prior_weight
        self._fit: tuple[float, float] | None = None
        self._since_fit = 0
        self.num_outliers = 0  # observations left out (see observe)
        self.compiled = False  # a compiled step has been observed (see observe_on)
        self._shapes = 0  # shapes the observed path had run by the last observation
        self._steps = 0  # and its compiled steps

    def observe(self, x: float, seconds: float) -> None:
        if self.num_observations >= 4 and seconds > OUTLIER_RATIO * max(self.predict(x), 1e-9):
            # a step that compiled a graph (seconds where steps take milliseconds): one such observation
            # made verifying look 100x dearer than it is, and since verifying steps are only measured when
            # speculation runs, K stayed 0 for good
            self.num_outliers += 1
            return
        self.obs.append((float(x), float(seconds)))
        self._since_fit += 1
        if self._fit is None or self._since_fit >= min(16, len(self.obs)):  # refit now and then: a step must
            # stay cheap (and at once while there are few observations)
            self._fit, self._since_fit = None, 0

    def observe_on(self, path, x: float, seconds: float) -> None:
        """observe a step that ran on `path` (a fast path with `fast_steps`, `_seen` and `disabled`, or None for
        an eager-only engine). Only the steps that ran compiled are kept: eager ones (the path's warm-up, and
        mixed or prefill steps later) cost something else, and one line through both priced a compiled
        1 ms decode step at 2.9 ms when most plain steps seen were eager prefills (MTP then speculated at
        0.75x), or verification at 3.5-5 ms where compiled it took 1.4-2.3 (K then stayed 0 for good). The
        first compiled step, which compiled, is not kept either, and starts the model afresh; nor is a step
        that met a shape the path had not run (its first call checks every guard: 3-5 ms, vs 1.5 after)."""
        if path is None or path.disabled:
            return self.observe(x, seconds)
        steps, self._steps = self._steps, path.fast_steps
        shapes, self._shapes = self._shapes, len(path._seen)
        if path.fast_steps == steps:  # this step ran eager
            return
        if not self.compiled:
            self.compiled = True
            self.obs.clear()
            self.seeds.clear()
            self._fit = None
            return
        if shapes == self._shapes:
            self.observe(x, seconds)

    def skip_on(self, path) -> None:
        """A step on `path` that is not observed (sampling): keep the counters observe_on compares with, or the
        next observed step would be judged by what ran since the last one (an eager prefill step then passed
        for a compiled decode: one 16-token prefill at 7 ms made the plain step's slope 20x too steep)."""
        if path is not None and not path.disabled:
            self._steps, self._shapes = path.fast_steps, len(path._seen)

    def seed(self, x: float, seconds: float) -> None:
        """A start-up sample: it may come from another path than the steps that will run (the eager forward
        where steps run compiled), so the first real observation replaces all of them."""
        self.seeds.append((float(x), float(seconds)))
        self._fit = None

    @property
    def num_observations(self) -> int:
        return len(self.obs) or len(self.seeds)

    def coefficients(self) -> tuple[float, float]:
        if self._fit is None:
            data = self.obs or self.seeds
            if not data:
                self._fit = (0.0, 0.0)
            else:
                x, t = np.array(data).T
                # the line goes through the data's mean; its slope is a ridge fit that leans, while x has barely
                # varied, on the prior line seconds = b0 * (prior_ratio + x) (a step's fixed cost worth
                # prior_ratio units of x). A prior in the intercept instead (pseudo-points at x = 0 and far out)
                # priced 9-row verifying steps measured at 2.4 ms at 3.5 ms, and speculation stopped.
                xm, tm = x.mean(), t.mean()
                b0 = tm / (self.prior_ratio + xm)
                lam = self.prior_weight * PRIOR_SPREAD ** 2
                dx = x - xm
                b = max(float((dx @ (t - tm) + lam * b0) / (dx @ dx + lam)), 0.0)
                self._fit = (max(float(tm - b * xm), 0.0), b)
        return self._fit

    def predict(self, x: float) -> float:
        a, b = self.coefficients()
        return a + b * x


# A plain step's cost is only measured when one runs; a batch that always speculates would be priced against
# a stale (or start-up, eager) estimate, so after this many speculating rounds one round proposes nothing.
PLAIN_PROBE_ROUNDS = 64


# Verifying steps measured before their own cost model prices them (see choose).
MIN_VERIFY_SAMPLES = 8


# The most plain steps plain_unmeasured asks for (a plain path that never compiles must not stop speculation).
MAX_FORCED_PLAIN = 16


class AdaptiveK:
    def __init__(self, num_speculative_tokens: int, adaptive: bool, prior: float = 0.6, prior_weight: float = 2.0,
                 decay: float = 0.8):
        self.k_max = num_speculative_tokens
        self.adaptive = adaptive
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        self.counts: dict[str, tuple[float, float]] = {}  # request id -> decayed (accepted, trials)
        self.step_cost = LinearCost()  # plain decode steps (compiled where the engine compiles)
        # steps that verify proposals: on a compiled CPU path they cost more than a plain step of as many tokens
        # (another graph, the rows' host work), which one line through both kinds of step would not see
        self.spec_cost = LinearCost()
        self.rounds_without_plain = 0  # speculating rounds since a plain step was last measured
        self.plain_path = None  # the engine's plain decode fast path (SpecDecoder sets it), see plain_unmeasured
        self.forced_plain = 0  # plain steps run because of plain_unmeasured

    def acceptance(self, request_id: str) -> float:
        acc, trials = self.counts.get(request_id, (0.0, 0.0))
        return (acc + self.prior * self.prior_weight) / (trials + self.prior_weight)

    def record(self, request_id: str, proposed: int, accepted: int) -> None:
        if proposed == 0:
            return
        acc, trials = self.counts.get(request_id, (0.0, 0.0))
        # a round is a run of Bernoulli trials that stops at the first rejection
        self.counts[request_id] = (self.decay * acc + accepted,
                                   self.decay * trials + accepted + (1 if accepted < proposed else 0))

    def relax(self, request_id: str) -> None:
        """A round in which the request did not speculate: it gathered no evidence, so its estimate drifts back
        towards the prior. Without this a request whose first rounds went badly would keep K = 0 for good,
        since only rounds with proposals are recorded."""
        if request_id in self.counts:
            acc, trials = self.counts[request_id]
            self.counts[request_id] = (self.decay * acc, self.decay * trials)

    def forget(self, live) -> None:
        for rid in [r for r in self.counts if r not in live]:
            del self.counts[rid]

    def plain_unmeasured(self) -> bool:
        """The verifying steps run compiled while the plain step has no compiled measurement: run plain steps
        (they compile the plain path, then measure it) rather than price it by its eager warm-up, which is
        3x a compiled step here and made MTP speculate at 0.6x. A few at most: a plain step that is never a
        pure decode (a prefill in every step) never compiles."""
        p = self.plain_path
        if p is None or p.disabled or not self.spec_cost.compiled or self.forced_plain >= MAX_FORCED_PLAIN:
            return False
        return not (self.step_cost.compiled and self.step_cost.obs)

    def choose(self, requests: list, caps: list[int], pinned: list[bool], other_tokens: int, proposer) -> list[int]:
        """K per request. caps: the most each may propose (K, max_tokens, context); pinned: requests whose K
        must not depend on the batch (seeded sampling stays reproducible); other_tokens: prefill tokens
        expected in the step besides these decodes."""
        if self.adaptive and self.plain_unmeasured():
            self.forced_plain += 1
            return [c if p else 0 for c, p in zip(caps, pinned)]
        if not self.adaptive or not self.step_cost.num_observations:  # no cost model yet: measure with full K
            return list(caps)
        ks = [c if p else 0 for c, p in zip(caps, pinned)]
        alphas = np.array([self.acceptance(r.request_id) for r in requests])
        free = [(i, c) for i, (c, p) in enumerate(zip(caps, pinned)) if not p and c > 0]
        if not free:
            return ks
        # every candidate proposal (request i, its j-th token) with its expected value alpha_i ** j
        idx = np.concatenate([np.full(c, i) for i, c in free])
        js = np.concatenate([np.arange(1, c + 1) for _, c in free])
        values = alphas[idx] ** js
        order = np.argsort(-values, kind="stable")  # within a request j rises, so prefixes stay consistent
        idx, js, values = idx[order], js[order], values[order]
        n = len(requests)
        base_tokens = other_tokens + n + sum(ks)
        base_value = n + sum(float(alphas[i]) ** j for i, k in enumerate(ks) for j in range(1, k + 1))
        base_reqs, base_top = sum(1 for k in ks if k), max(ks)
        # after taking the first m candidates (m = 0 .. M)
        tokens = base_tokens + np.arange(len(values) + 1)
        value = base_value + np.concatenate([[0.0], np.cumsum(values)])
        new_req = (js == 1) & np.array([ks[i] == 0 for i in idx])  # a request's first proposal
        reqs = base_reqs + np.concatenate([[0], np.cumsum(new_req)])
        top = np.maximum(base_top, np.concatenate([[0], np.maximum.accumulate(js)]))
        # until verifying steps are measured a few times, price them as plain steps of as many tokens: one early
        # dear sample (a shape's first call) priced them out for good, since only speculating measures them;
        # where the optimism is wrong, the samples it buys correct it (and PayoffGuard caps the loss)
        verify_cost = self.spec_cost if len(self.spec_cost.obs) >= MIN_VERIFY_SAMPLES else self.step_cost
        cost = np.where(top > 0, verify_cost.predict(tokens) + proposer.expected_cost(reqs, top),
                        self.step_cost.predict(tokens))
        rate = np.where(cost > 0, value / np.maximum(cost, 1e-12), np.inf)
        best_m = int(np.argmax(rate)) if rate.max() > rate[0] * (1 + 1e-9) else 0
        for i, j in zip(idx[:best_m], js[:best_m]):
            ks[i] = max(ks[i], int(j))
        self.rounds_without_plain += 1
        if self.rounds_without_plain > PLAIN_PROBE_ROUNDS and any(k for k, p in zip(ks, pinned) if not p):
            ks = [k if p else 0 for k, p in zip(ks, pinned)]  # a plain step now and then, to price it
            self.rounds_without_plain = 0
        for i, _ in free:
            if ks[i] == 0:
                self.relax(requests[i].request_id)
        return ks
