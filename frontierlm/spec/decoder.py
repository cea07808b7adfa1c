"""SpecDecoder: what the engine's step calls when speculative decoding is configured.

    sched = scheduler.schedule()          # a request with proposals spends K + 1 of the token budget
    result = runner.execute(sched)        # one forward for the batch; SpecDecoder.verify scores the proposals
    scheduler.update_from_output(...)     # appends the accepted prefix + one token, winds the rest back
    spec.propose(scheduler.running, busy) # proposals for the next step, K chosen by AdaptiveK

Which requests speculate: running requests that are decoding (all but their newest token computed). Mirostat
requests do not (their mu update is sequential per token; counted in `num_mirostat_skipped`). Requests that
ask for logprobs get one entry per kept token (verify.py); custom logits processors see every verification
and drafting row as a request of its own, through instances of their own (the engine's instance keeps the
plain rows)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from frontierlm.spec.adaptive import AdaptiveK, cost_clock
from frontierlm.spec.config import SpeculativeConfig
from frontierlm.spec.guard import PayoffGuard
from frontierlm.spec.verify import Proposal, Verified, verify


@dataclass
class SpecStats:
    """Cumulative counters with vLLM's meanings."""
    num_drafts: int = 0  # verification rounds (a request with >= 1 proposal in a step)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    num_mirostat_skipped: int = 0  # decode steps of Mirostat requests that ran without speculation

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification round: accepted proposals + the one the target adds."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def as_dict(self) -> dict:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "accepted_per_pos": list(self.accepted_per_pos),
                "num_mirostat_skipped": self.num_mirostat_skipped,
                "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length}

    def summary(self) -> str:
        per_pos = ", ".join(f"{n / self.num_drafts:.2f}" for n in self.accepted_per_pos) if self.num_drafts else "-"
        return (f"{self.num_drafts} drafts, {self.num_draft_tokens} draft tokens, acceptance "
                f"{self.acceptance_rate:.1%}, mean accepted length {self.mean_accepted_length:.2f}, "
                f"per position [{per_pos}]")


def build_proposer(cfg: SpeculativeConfig, engine):
    runner, mc = engine.runner, engine.model_config
    eos = mc.eos_token_ids
    if cfg.method == "ngram":
        from frontierlm.spec.proposer import NgramProposer

        return NgramProposer(cfg.prompt_lookup_min, cfg.prompt_lookup_max)
    if cfg.method == "mtp":
        from frontierlm.spec.mtp import MTPProposer

        return MTPProposer(runner.model, engine.kv.num_blocks, engine.config.block_size, runner.sampler, eos,
                           fast_rows=_fast_rows(cfg, engine), max_model_len=engine.max_model_len)
    from frontierlm.config import ModelConfig
    from frontierlm.engine.tokenizer import load_tokenizer
    from frontierlm.spec.draft_model import DraftModelProposer, check_same_tokenizer

    try:
        draft_mc = ModelConfig.from_pretrained(cfg.model, engine.config.torch_dtype)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"speculative_config.model: {e}") from None
    check_same_tokenizer(mc.model_dir, mc.vocab_size, engine.tokenizer, cfg.model, draft_mc.vocab_size,
                         load_tokenizer(cfg.model))
    c = engine.config
    return DraftModelProposer(draft_mc, runner.device, engine.kv.num_blocks, c.block_size, runner.sampler, eos,
                              seed=c.seed, fast_rows=_fast_rows(cfg, engine),
                              max_model_len=min(engine.max_model_len, draft_mc.max_model_len))


def _fast_rows(cfg: SpeculativeConfig, engine) -> int:
    """Rows a proposer's compiled step takes (K + 1 per request), or 0 where the engine stays eager."""
    c = engine.config
    if engine.runner.fast_decode is None or engine.runner.parallel is not None:
        return 0
    return c.max_num_seqs * (cfg.num_speculative_tokens + 1)


def placement(cfg: SpeculativeConfig, parallel) -> str:
    """Where the proposer runs in a parallel run (the start-up report); verification is the ordinary step."""
    if cfg.method == "ngram":
        return "proposals on rank 0"
    if cfg.method == "draft_model":  # vLLM's draft_tensor_parallel_size=1
        return "the draft whole on rank 0, with its own KV cache there"
    tp = parallel.ctx.tp_size
    return f"the MTP module on stage 0's {tp} TP ranks, a latent cache on each" if tp > 1 else \
        "the MTP module on rank 0 (stage 0)"


# Steps that keep an all-zero adaptive choice for an unchanged batch before it is made again.
IDLE_RECHECK_STEPS = 8


class SpecDecoder:
    def __init__(self, cfg: SpeculativeConfig, engine):
        self.config = cfg
        self.proposer = build_proposer(cfg, engine)
        parallel = engine.runner.parallel
        self.placement = placement(cfg, parallel) if parallel is not None else ""
        self.processors = None  # custom logits processors for the verification rows (their state is per row)
        if engine.config.logits_processors:
            from frontierlm.layers.logits_processor import LogitsProcessors

            specs, device = engine.config.logits_processors, engine.runner.device
            self.processors = LogitsProcessors(specs, engine.config, device)
            self.proposer.processors = LogitsProcessors(specs, engine.config, device)
        self.adaptive = AdaptiveK(cfg.num_speculative_tokens, cfg.adaptive)
        self.adaptive.plain_path = engine.runner.fast_decode
        self.clock = cost_clock(engine.runner.device)
        self.fast = None  # verification steps through the static-shape decode path (fast_verify.py)
        runner = engine.runner
        if runner.fast_decode is not None and runner.parallel is None:
            from frontierlm.spec.fast_verify import FastVerify

            fd = runner.fast_decode
            self.fast = FastVerify(runner.model, runner.device, _fast_rows(cfg, engine), fd.max_model_len,
                                   fd.block_size, scratch_block=engine.kv.num_blocks)
        if cfg.adaptive:
            self._profile(engine)
        self.stats = SpecStats(accepted_per_pos=[0] * cfg.num_speculative_tokens)
        self.max_model_len = engine.max_model_len
        self.max_num_batched_tokens = engine.config.max_num_batched_tokens
        self._q: dict[str, torch.Tensor | None] = {}
        self._idle = False  # the last choice was K = 0 for the whole batch
        self._idle_ids: list[str] = []  # its running requests (all decoding), or [] where that did not hold
        self._idle_left = 0  # steps before asking again
        self.guard = PayoffGuard()
        self._propose_s = 0.0  # seconds of the proposal round before the next step
        self._seen_drafts = self._seen_accepted = 0  # stats as of the last step observed
        self._fast_counts: tuple = ((), 0)  # the fast paths' compiled steps and shapes seen, as of the last step
        self._idle_steps_seen = 0
        self._warmups_shared = False
        self._spec_step = False  # the step being run verifies proposals

    def _profile(self, engine) -> None:
        """Seed the cost model: target decode batches of 1 .. 256 tokens, and the proposer's forwards."""
        from frontierlm.spec.profile import profile_decode, profile_mtp

        runner, cfg = engine.runner, engine.config
        most = min(cfg.max_num_batched_tokens, cfg.max_num_seqs * (1 + self.config.num_speculative_tokens))
        sizes = [n for n in (1, 4, 16, 64, 256) if n <= most]
        for n, t in profile_decode(runner.model, runner.device, cfg.block_size, sizes):
            self.adaptive.step_cost.seed(n, t)  # eager forwards: replaced by the first measured step
        seqs = [n for n in (1, 4, 16, 64) if n <= cfg.max_num_seqs]
        prop = self.proposer
        if self.config.method == "draft_model":
            samples = profile_decode(prop.model, runner.device, cfg.block_size, seqs)
        elif self.config.method == "mtp":
            samples = profile_mtp(prop, seqs)
        else:
            samples = []
        for n, t in samples:
            prop.cost.seed(n, t)

    # ---- between steps ------------------------------------------------------------------------------
    def propose(self, running: list, busy=()) -> None:
        """busy: ids of requests whose batch is in flight (pipeline parallel): their proposals are being
        verified and their state is not final yet, so they get none now. A request that still holds
        proposals (it was not scheduled since they were made, so they still follow its last token) keeps
        them: proposals are only replaced once verified."""
        t0 = self.clock()
        self._propose(running, busy)
        self._propose_s = self.clock() - t0  # the next step's proposer time (PayoffGuard)

    def _propose(self, running: list, busy) -> None:
        if self._idle and self._idle_left > 0 and not busy and len(running) == len(self._idle_ids) \
                and [r.request_id for r in running] == self._idle_ids:
            # speculation is off for this batch, whose requests were all decoding: keep it off without
            # pricing every step again (on this CPU the choice cost 4-10% of a compiled batch-4 step, and the
            # bookkeeping below 2-3% of a batch-1 step); every IDLE_RECHECK_STEPS steps ask again
            self._idle_left -= 1
            return
        live = {r.request_id: r for r in running}
        self.proposer.release(live)
        self.adaptive.forget(live)
        waiting = {r.request_id for r in running if r.request_id in busy or r.spec_token_ids}
        self._q = {rid: q for rid, q in self._q.items() if rid in waiting}
        decoding, caps, pinned, other = [], [], [], 0
        for r in running:
            if r.request_id in waiting:
                if r.request_id not in busy:  # its kept proposals join the next step's tokens
                    other += r.num_tokens - r.num_computed_tokens + len(r.spec_token_ids)
                continue
            if r.num_computed_tokens != r.num_tokens - 1:
                other += r.num_tokens - r.num_computed_tokens
                continue
            p = r.sampling_params
            if p.mirostat_mode:
                self.stats.num_mirostat_skipped += 1
                continue
            cap = min(self.config.num_speculative_tokens, r.max_tokens - r.num_output_tokens - 1,
                      self.max_model_len - r.num_tokens - 1)
            decoding.append(r)
            caps.append(max(cap, 0))
            pinned.append(not p.greedy and r.generator is not None)  # seeded sampling: K must not depend on load
        if not decoding:
            self._idle = False
            return
        vetoed = self.guard.steps_off(len(decoding)) if self.config.adaptive else 0
        if not self.config.adaptive:
            ks = caps
        elif vetoed or self.guard.wants_plain(len(decoding)):
            ks = [c if p else 0 for c, p in zip(caps, pinned)]  # speculating has not paid at this batch size
        else:
            ks = self.adaptive.choose(decoding, caps, pinned, min(other, self.max_num_batched_tokens), self.proposer)
        # adaptive K = 0 for every request, nothing kept: the next step is the plain decode step (see wants_spec_step)
        idle = self.config.adaptive and not any(ks) and not waiting
        # (not longer while it stays off: at batch 1 a choice costs ~0.5% of a step spread over 8 steps, and an
        # interval doubled while a request's acceptance hovered near the line lost it 60 steps of n-gram runs)
        self._idle, self._idle_left = idle, min(IDLE_RECHECK_STEPS, vetoed or IDLE_RECHECK_STEPS)
        # the fast path above needs every running request among the decoding ones (none prefilling, none Mirostat)
        self._idle_ids = [r.request_id for r in running] if idle and len(decoding) == len(running) else []
        for r, prop in zip(decoding, self.proposer.propose(decoding, ks)):
            r.spec_token_ids = list(prop.tokens)
            if prop.tokens:
                self._q[r.request_id] = prop.q

    def wants_spec_step(self, sched) -> bool:
        """Whether this step goes through the speculative step: it verifies proposals, or the proposer needs the
        target's hidden states (MTP) and speculation is not off for the whole batch. When adaptive K chose 0 for
        every request the step is the plain (compiled) decode step and MTP gets no hidden states from it: its
        cache restarts at the first position it is shown again (mtp.py), which can only lower acceptance. The
        first step after speculation resumes collects them, so proposals start one step later."""
        self._spec_step = any(s.spec_token_ids for s in sched.scheduled)
        return self._spec_step or (self.proposer.uses_hidden and not self._idle)

    def observe_step(self, sched, seconds: float) -> None:
        """The step just run: a verifying step feeds the cost of speculating, any other the plain one; a pure
        decode step also feeds the payoff guard with what it yielded."""
        guard, st = self.guard, self.stats
        guard.tick()
        drafts, accepted = st.num_draft_tokens - self._seen_drafts, st.num_accepted_tokens - self._seen_accepted
        self._seen_drafts, self._seen_accepted = st.num_draft_tokens, st.num_accepted_tokens
        # the guard compares steady compiled steps (not a path's eager warm-up, 2-3x dearer; not the step that
        # compiled a graph, seconds; not a shape's first call, which checks every guard: 3-5 ms vs 1.5)
        paths = [p for p in (self.fast, self.adaptive.plain_path) if p is not None and not p.disabled]
        steps, shapes = tuple(p.fast_steps for p in paths), sum(len(p._seen) for p in paths)
        steady = not paths or (steps != self._fast_counts[0] and shapes == self._fast_counts[1])
        self._fast_counts = steps, shapes
        if not self._spec_step and self._idle and len(self.adaptive.step_cost.obs) >= 64:
            self._idle_steps_seen += 1  # speculation off and the plain step well measured: sample 1 step in 8
            if self._idle_steps_seen % 8:  # (the Python of pricing was 4-5% of a compiled batch-1 step)
                self.adaptive.step_cost.skip_on(self.adaptive.plain_path)
                return
        n = len(sched.scheduled)
        if self.config.adaptive and steady and sched.num_tokens == n + drafts:  # every request decoded
            guard.record(n, n + accepted, seconds + self._propose_s, drafts > 0)
        if not self._warmups_shared:
            # one warm-up for both decode paths: once either runs compiled, the other compiles on its next step
            paths = [p for p in (self.fast, self.adaptive.plain_path) if p is not None]
            if any(p.fast_steps for p in paths):
                for p in paths:
                    p.warmup_steps = min(p.warmup_steps, p.decode_steps)
                self._warmups_shared = True
        if self._spec_step:
            self.adaptive.spec_cost.observe_on(self.fast, sched.num_tokens, seconds)
        else:
            self.adaptive.step_cost.observe_on(self.adaptive.plain_path, sched.num_tokens, seconds)
            self.adaptive.rounds_without_plain = 0

    # ---- inside the runner's step --------------------------------------------------------------------
    def verify(self, sampler, logits: torch.Tensor, scheduled: list, eos_token_ids) -> list[Verified]:
        """logits: the K + 1 rows of each scheduled request with proposals, in order."""
        requests = [s.request for s in scheduled]
        proposals = []
        for s in scheduled:
            q = self._q.pop(s.request.request_id, None)
            k = len(s.spec_token_ids)
            proposals.append(Proposal(s.spec_token_ids, q[:k] if q is not None else None))
        results = verify(sampler, logits, requests, proposals, eos_token_ids, self.processors)
        st = self.stats
        for r, prop, (acc, _, _) in zip(requests, proposals, results):
            st.num_drafts += 1
            st.num_draft_tokens += len(prop.tokens)
            st.num_accepted_tokens += len(acc)
            for j in range(len(acc)):
                st.accepted_per_pos[j] += 1
            self.adaptive.record(r.request_id, len(prop.tokens), len(acc))
        return results

    def observe(self, sched, hidden: torch.Tensor, spec_accepted: dict) -> None:
        """Give the proposer the target hidden states of each request's valid positions of this forward."""
        if not self.proposer.uses_hidden:
            return
        rows, offset = {}, 0
        for s in sched.scheduled:
            rejected = len(s.spec_token_ids) - len(spec_accepted.get(s.request.request_id, s.spec_token_ids))
            rows[s.request.request_id] = (offset, s.num_new_tokens - rejected, s.request.num_computed_tokens)
            offset += s.num_new_tokens
        self.proposer.observe(sched, hidden, rows)

    def close(self) -> None:
        self.proposer.close()

