"""A check on the adaptive draft length by what speculation actually yielded.

AdaptiveK predicts a step's price from a cost model of the forward alone. What a speculating step really costs
includes more: the proposer's host work, a batch whose rows route to more MoE experts, graphs that a linear
model in tokens fits badly across batch sizes. When the prediction is wrong, the cost model can keep
speculating at a loss (n-gram at batch 4 ran at 0.85x while the model expected a gain). This guard measures
the outcome instead: per batch-size bucket (1, 2-3, 4-7, ...), the seconds per emitted token of pure decode
steps that verified proposals and of those that did not, each including the proposer's time. Once a bucket's
speculating steps have cost more per token than its plain steps, speculation is off there for a cool-down,
doubled on every further loss (so a bucket where it never pays spends a vanishing share of steps finding
that out again), and reset when a later trial pays."""
from __future__ import annotations

# Speculating steps a trial takes before it is judged, and plain steps it is compared with.
TRIAL_STEPS = 16
MIN_PLAIN_STEPS = 4
# A trial loses when its tokens cost this much more than plain ones (below it, measurement noise).
LOSS_MARGIN = 0.02
FIRST_COOLDOWN, MAX_COOLDOWN = 64, 8192  # steps
# Weight of a new plain step in their running average (about the last 4).
PLAIN_WEIGHT = 0.25


class _Bucket:
    __slots__ = ("spec_s", "spec_tokens", "plain_s", "plain_tokens", "trial_steps", "plain_steps", "off_until",
                 "cooldown")

    def __init__(self):
        self.spec_s = self.spec_tokens = self.plain_s = self.plain_tokens = 0.0
        self.trial_steps = self.plain_steps = 0
        self.off_until, self.cooldown = 0, FIRST_COOLDOWN


def _bucket_of(num_requests: int) -> int:
    return num_requests.bit_length()


class PayoffGuard:
    def __init__(self):
        self.buckets: dict[int, _Bucket] = {}
        self.steps = 0  # steps run (tick)
        self.num_vetoes = 0  # trials that lost (each switched a bucket off for a cool-down)

    def _bucket(self, num_requests: int) -> _Bucket:
        b = self.buckets.get(_bucket_of(num_requests))
        if b is None:
            b = self.buckets[_bucket_of(num_requests)] = _Bucket()
        return b

    def steps_off(self, num_requests: int) -> int:
        """Steps before a batch of this many decoding requests may speculate again (0: it may now)."""
        b = self.buckets.get(_bucket_of(num_requests))
        return 0 if b is None else max(b.off_until - self.steps, 0)

    def allows(self, num_requests: int) -> bool:
        return not self.steps_off(num_requests)

    def wants_plain(self, num_requests: int) -> bool:
        """A trial is due for judgment but its bucket has too few plain steps to compare with: ask for some."""
        b = self.buckets.get(_bucket_of(num_requests))
        return b is not None and b.trial_steps >= TRIAL_STEPS and b.plain_steps < MIN_PLAIN_STEPS

    def tick(self) -> None:
        """A step ran (cool-downs count steps, whether or not they were recorded)."""
        self.steps += 1

    def record(self, num_requests: int, emitted: int, seconds: float, speculated: bool) -> None:
        """A pure decode step: `emitted` tokens for `num_requests` requests in `seconds` (forward + proposer)."""
        b = self._bucket(num_requests)
        if speculated:  # a trial: its totals
            b.spec_s, b.spec_tokens = (b.spec_s + seconds, b.spec_tokens + emitted) if b.trial_steps else \
                (seconds, emitted)
            b.trial_steps += 1
        else:  # plain steps: a running average of the recent ones (the context grows, and so does their cost)
            w = PLAIN_WEIGHT if b.plain_steps else 1.0
            b.plain_s, b.plain_tokens = (1 - w) * b.plain_s + w * seconds, (1 - w) * b.plain_tokens + w * emitted
            b.plain_steps += 1
        if b.trial_steps >= TRIAL_STEPS and b.plain_steps >= MIN_PLAIN_STEPS:
            self._judge(b)

    def _judge(self, b: _Bucket) -> None:
        spec_cost = b.spec_s / max(b.spec_tokens, 1e-9)
        plain_cost = b.plain_s / max(b.plain_tokens, 1e-9)
        b.trial_steps = 0
        if spec_cost > plain_cost * (1 + LOSS_MARGIN):
            self.num_vetoes += 1
            b.off_until = self.steps + b.cooldown
            b.cooldown = min(2 * b.cooldown, MAX_COOLDOWN)
        else:
            b.cooldown = FIRST_COOLDOWN
