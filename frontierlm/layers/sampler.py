"""The batched sampler: logits [B, V] -> one token per row, on the logits' device.

Pipeline (DESIGN.md "Sampling"): logit bias + bans -> grammar bitmask -> allowed_token_ids mask + custom
logits processors (layers/logits_processor.py) -> penalties -> temperature ->
top-k -> top-p -> min-p -> typical-p (or Mirostat for the rows that ask) -> exponential-race sample -> logprobs.
Per-row parameters are gathered on the host into small tensors; all [B, V] work is batched tensor ops and
nothing reads device values back to the host except Mirostat's new mu (it must be returned as floats).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from frontierlm.layers.logits_processor import LogitsProcessors, apply_allowed_token_ids
from frontierlm.sampling_params import SamplingParams

MIROSTAT_M = 100  # top probabilities used by Mirostat v1 to estimate the Zipf exponent (paper and llama.cpp)


class SamplingState(Protocol):
    """What the sampler reads from a request (the engine's Request provides these attributes)."""

    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    mirostat_mu: float | None
    bad_words_token_ids: list[list[int]]


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor            # [B] int64
    # [B, 1 + max_N]: the sampled token, then the top max_N ids (a row that asked for N < max_N uses the
    # first 1 + N columns; rows that asked for nothing get values too and ignore them).
    logprobs_token_ids: torch.Tensor | None
    logprobs: torch.Tensor | None              # [B, 1 + max_N] float32 under the final distribution
    sampled_ranks: torch.Tensor | None         # [B] int64, 1 = most likely
    new_mirostat_mu: list[float | None]        # per row; None for rows without Mirostat


class Sampler:
    def __init__(self, vocab_size: int, seed: int | None = None, logits_processors: LogitsProcessors | None = None):
        self.vocab_size = vocab_size
        self.seed = seed
        self.logits_processors = logits_processors  # custom processors, told about the rows every step
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        """The sampler's own generator for unseeded rows (one per device, created on first use)."""
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self.seed is None:
                gen.seed()
            else:
                gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def __call__(self, logits: torch.Tensor, states: Sequence[SamplingState],
                 eos_token_ids: Sequence[int]) -> SamplerOutput:
        B, V = logits.shape
        assert len(states) == B, f"{B} logits rows for {len(states)} requests"
        params = [s.sampling_params for s in states]
        device = logits.device
        greedy = [p.greedy for p in params]
        old_mu = [_initial_mu(s) for s in states]
        procs = self.logits_processors
        if procs:
            procs.update(states)

        # Fast path: nothing can change the argmax and nobody wants logprobs.
        if all(greedy) and not any(_modifies_logits(s, eos_token_ids) or s.sampling_params.logprobs is not None
                                   for s in states) and not (procs and not procs.argmax_invariant()):
            return SamplerOutput(logits.argmax(dim=-1), None, None, None, old_mu)

        x = logits.to(torch.float32, copy=True)  # never modify the caller's logits
        x, mu_t = self._process(x, states, eos_token_ids, old_mu, procs)
        mu_rows = [i for i, (g, p) in enumerate(zip(greedy, params)) if not g and p.mirostat_mode]

        # 10. Sample. The final distribution is softmax(x); masked tokens are -inf there.
        probs = torch.softmax(x, dim=-1)
        if all(greedy):
            tokens = x.argmax(dim=-1)
        else:
            tokens = self._race(probs, states, greedy)
            if any(greedy):
                idx = _index([i for i, g in enumerate(greedy) if g], device)
                tokens[idx] = x[idx].argmax(dim=-1)

        new_mu = old_mu
        if mu_rows:
            # Observed surprise under the renormalized (truncated) distribution, then mu -= eta * (s - tau).
            idx = _index(mu_rows, device)
            p_tok = probs[idx].gather(1, tokens[idx].unsqueeze(1)).squeeze(1)
            surprise = -torch.log2(p_tok.double())
            tau = _row_tensor([params[i].mirostat_tau for i in mu_rows], device, torch.float64)
            eta = _row_tensor([params[i].mirostat_eta for i in mu_rows], device, torch.float64)
            new_vals = (mu_t - eta * (surprise - tau)).tolist()  # the one host sync, only for Mirostat batches
            new_mu = list(old_mu)
            for i, v in zip(mu_rows, new_vals):
                new_mu[i] = v

        # 11. Logprobs of the final distribution, only when some row asks.
        n_lp = [p.logprobs for p in params if p.logprobs is not None]
        if not n_lp:
            return SamplerOutput(tokens, None, None, None, new_mu)
        logp = torch.log_softmax(x, dim=-1)
        tok_lp = logp.gather(1, tokens.unsqueeze(1))
        ranks = (logp > tok_lp).sum(dim=-1) + 1
        top_lp, top_ids = logp.topk(min(max(n_lp), V), dim=-1)
        ids = torch.cat([tokens.unsqueeze(1), top_ids], dim=1)
        lps = torch.cat([tok_lp, top_lp], dim=1)
        return SamplerOutput(tokens, ids, lps, ranks, new_mu)

    def processed_logits(self, logits: torch.Tensor, states: Sequence[SamplingState],
                         eos_token_ids: Sequence[int], logits_processors: LogitsProcessors | None = None
                         ) -> torch.Tensor:
        """Stages 1-9 without sampling, for rows without Mirostat: float32 logits whose softmax is exactly the
        distribution __call__ draws from (greedy rows: whose argmax it takes). Speculative verification
        scores proposals against these. The custom processors keep state per batch row, so a caller with
        other rows than the engine's (speculation's verification rows) passes its own instance, told about
        `states` here."""
        x = logits.to(torch.float32, copy=True)
        if logits_processors:
            logits_processors.update(states)
        return self._process(x, states, eos_token_ids, [None] * len(states), logits_processors)[0]

    def _process(self, x: torch.Tensor, states: Sequence[SamplingState], eos_token_ids: Sequence[int],
                 old_mu: list[float | None], logits_processors: LogitsProcessors | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stages 1-9 on x (in place but for the custom processors); returns (x, Mirostat rows' current mu)."""
        params = [s.sampling_params for s in states]
        greedy = [p.greedy for p in params]
        self._apply_bias_and_bans(x, states, eos_token_ids)
        # 2. The grammar bitmask was applied by the runner (structured outputs) before the sampler.
        # 2b. allowed_token_ids, then the user's logits processors (the documented stage for them).
        apply_allowed_token_ids(x, states)
        if logits_processors:
            x = logits_processors.apply(x)
        self._apply_penalties(x, states)

        # 4. Temperature. Greedy rows keep temperature 1 so their logprobs are of the penalized distribution.
        temps = [1.0 if g else p.temperature for g, p in zip(greedy, params)]
        if any(t != 1.0 for t in temps):
            x.div_(torch.tensor(temps, dtype=x.dtype).to(x.device, non_blocking=True).unsqueeze(1))

        # 5-9. Truncation (or Mirostat) for sampled rows; greedy rows are left whole, as in vLLM.
        mu_rows = [i for i, (g, p) in enumerate(zip(greedy, params)) if not g and p.mirostat_mode]
        trunc_rows = [i for i, (g, p) in enumerate(zip(greedy, params)) if not g and not p.mirostat_mode and (
            p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 or p.typical_p < 1.0)]
        if mu_rows or trunc_rows:
            return x, self._truncate(x, params, trunc_rows, mu_rows, old_mu)
        return x, None

    # ---- 1. bias and bans ---------------------------------------------------------------------------------
    @staticmethod
    def _apply_bias_and_bans(x: torch.Tensor, states: Sequence[SamplingState], eos_token_ids: Sequence[int]):
        B, V = x.shape
        bias_rows, bias_cols, bias_vals, ban_rows, ban_cols = [], [], [], [], []
        for i, s in enumerate(states):
            p = s.sampling_params
            for tok, b in (p.logit_bias or {}).items():
                if tok < V:
                    bias_rows.append(i), bias_cols.append(tok), bias_vals.append(b)
            banned = _banned_tokens(s, eos_token_ids)
            ban_rows += [i] * len(banned)
            ban_cols += banned
        if bias_rows:
            x.index_put_((_index(bias_rows, x.device), _index(bias_cols, x.device)),
                         _row_tensor(bias_vals, x.device), accumulate=True)
        if ban_rows:
            keep = [(r, c) for r, c in zip(ban_rows, ban_cols) if c < V]
            if keep:
                rows, cols = zip(*keep)
                x[_index(list(rows), x.device), _index(list(cols), x.device)] = float("-inf")

    # ---- 3. penalties ---------------------------------------------------------------------------------------
    @staticmethod
    def _apply_penalties(x: torch.Tensor, states: Sequence[SamplingState]):
        rows = [i for i, s in enumerate(states) if s.sampling_params.uses_penalties]
        if not rows:
            return
        device, V = x.device, x.shape[1]
        ps = [states[i].sampling_params for i in rows]
        idx = _index(rows, device)
        sub = x[idx]
        out_counts = _token_counts([states[i].output_token_ids for i in rows], V, device)
        if any(p.repetition_penalty != 1.0 for p in ps):
            # HF semantics: every token seen in prompt or output moves toward "less likely" by the same factor.
            seen = (out_counts > 0) | (_token_counts([states[i].prompt_token_ids for i in rows], V, device) > 0)
            rp = _row_tensor([p.repetition_penalty for p in ps], device).unsqueeze(1)
            penalized = torch.where(sub > 0, sub / rp, sub * rp)
            sub = torch.where(seen, penalized, sub)
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in ps):
            # OpenAI semantics, output tokens only.
            freq = _row_tensor([p.frequency_penalty for p in ps], device).unsqueeze(1)
            pres = _row_tensor([p.presence_penalty for p in ps], device).unsqueeze(1)
            sub = sub - freq * out_counts - pres * (out_counts > 0).to(sub.dtype)
        x[idx] = sub

    # ---- 5-9. truncation and Mirostat -------------------------------------------------------------------------
    def _truncate(self, x: torch.Tensor, params: list[SamplingParams], trunc_rows: list[int],
                  mu_rows: list[int], old_mu: list[float | None]) -> torch.Tensor | None:
        """Mask x (in place) to each row's truncated distribution. One descending sort serves every stage;
        each stage masks in sorted space and sees the renormalized distribution left by the previous ones.
        Returns Mirostat rows' current mu as a tensor (order of mu_rows), or None."""
        device, V = x.device, x.shape[1]
        rows = trunc_rows + mu_rows
        idx = _index(rows, device)
        sl, si = x[idx].sort(dim=-1, descending=True)
        n_t = len(trunc_rows)
        ps = [params[i] for i in trunc_rows]
        neg_inf = float("-inf")

        def active(values) -> torch.Tensor:  # [rows, 1] bool: the stage applies to this row
            return torch.tensor(list(values) + [False] * len(mu_rows)).to(device, non_blocking=True).unsqueeze(1)

        if any(p.top_k > 0 for p in ps):
            # Keep everything tied with the k-th largest (HF / vLLM semantics).
            k = _index([min(p.top_k, V) if p.top_k > 0 else V for p in ps] + [V] * len(mu_rows), device)
            kth = sl.gather(1, (k - 1).unsqueeze(1))
            sl = sl.masked_fill((sl < kth) & active(p.top_k > 0 for p in ps), neg_inf)
        if any(p.top_p < 1.0 for p in ps):
            # Drop a token once the more likely tokens before it already hold top_p of the mass (keeps >= 1).
            probs = sl.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs
            top_p = _row_tensor([p.top_p for p in ps] + [1.0] * len(mu_rows), device).unsqueeze(1)
            remove = (before >= top_p) & active(p.top_p < 1.0 for p in ps)
            remove[:, 0] = False
            sl = sl.masked_fill(remove, neg_inf)
        if any(p.min_p > 0.0 for p in ps):
            probs = sl.softmax(dim=-1)
            min_p = _row_tensor([p.min_p for p in ps] + [0.0] * len(mu_rows), device).unsqueeze(1)
            sl = sl.masked_fill(probs < min_p * probs[:, :1], neg_inf)
        if any(p.typical_p < 1.0 for p in ps):
            sl = _typical(sl, _row_tensor([p.typical_p for p in ps] + [1.0] * len(mu_rows), device),
                          active(p.typical_p < 1.0 for p in ps).squeeze(1))
        mu_t = None
        if mu_rows:
            mu_t = _row_tensor([old_mu[i] for i in mu_rows], device, torch.float64)  # mu is kept in float64
            sl_m = _mirostat_mask(sl[n_t:], mu_t, [params[i].mirostat_mode for i in mu_rows], self.vocab_size)
            sl = torch.cat([sl[:n_t], sl_m], dim=0)
        x[idx] = torch.empty_like(sl).scatter_(1, si, sl)
        return mu_t

    # ---- 10. exponential race ---------------------------------------------------------------------------------
    def _race(self, probs: torch.Tensor, states: Sequence[SamplingState], greedy: list[bool]) -> torch.Tensor:
        """argmax(p / E) with E ~ Exp(1) i.i.d. picks token i with probability p_i, without a host sync.
        Seeded rows draw their own V noise values from their generator, so their tokens depend only on
        their seed and their logits, never on the batch around them."""
        q = torch.empty_like(probs)
        seeded = [i for i, s in enumerate(states) if s.generator is not None and not greedy[i]]
        if len(seeded) < len(states):
            q.exponential_(generator=self._generator(probs.device))
        for i in seeded:
            q[i].exponential_(generator=states[i].generator)
        # Exp(1) can round to exactly 0; 0/0 would be NaN and argmax would pick a masked token.
        return probs.div(q.clamp_min_(1e-30)).argmax(dim=-1)


# ---- helpers ---------------------------------------------------------------------------------------------------
def _index(values: list[int], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)


def _row_tensor(values: list[float], device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _initial_mu(s: SamplingState) -> float | None:
    p = s.sampling_params
    if not p.mirostat_mode:
        return None
    return s.mirostat_mu if s.mirostat_mu is not None else 2.0 * p.mirostat_tau


def _min_tokens_active(s: SamplingState) -> bool:
    return len(s.output_token_ids) < s.sampling_params.min_tokens


def _modifies_logits(s: SamplingState, eos_token_ids: Sequence[int]) -> bool:
    p = s.sampling_params
    return bool(p.logit_bias or p.banned_token_ids or s.bad_words_token_ids or p.uses_penalties
                or p.allowed_token_ids or _min_tokens_active(s))


def _banned_tokens(s: SamplingState, eos_token_ids: Sequence[int]) -> list[int]:
    p = s.sampling_params
    banned = list(p.banned_token_ids or ())
    out = s.output_token_ids
    for word in s.bad_words_token_ids or ():
        # vLLM's rule: ban a bad word's last token when the rest of the word ends the output so far.
        prefix = word[:-1]
        if not word or len(prefix) > len(out):
            continue
        if not prefix or list(out[len(out) - len(prefix):]) == list(prefix):
            banned.append(word[-1])
    if _min_tokens_active(s):
        # EOS only counts as a stop (and so is only banned) when ignore_eos is off, as in vLLM.
        banned += sorted(p.all_stop_token_ids(eos_token_ids))
    return banned


def _token_counts(seqs: list[list[int]], V: int, device) -> torch.Tensor:
    """[len(seqs), V] float counts of each token id; padding goes to an extra column that is dropped."""
    width = max((len(t) for t in seqs), default=0)
    counts = torch.zeros(len(seqs), V + 1, dtype=torch.float32, device=device)
    if width:
        padded = torch.tensor([list(t) + [V] * (width - len(t)) for t in seqs], dtype=torch.int64)
        padded = padded.clamp_(0, V).to(device, non_blocking=True)
        counts.scatter_add_(1, padded, torch.ones(padded.shape, dtype=torch.float32, device=device))
    return counts[:, :V]


def _typical(sl: torch.Tensor, mass: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """HF TypicalLogitsWarper on (sorted) logits: keep the tokens whose surprise is closest to the entropy
    until their mass reaches typical_p. Rows with active=False are returned unchanged."""
    logp = sl.log_softmax(dim=-1)
    p = logp.exp()
    entropy = -(logp * p).nansum(dim=-1, keepdim=True)  # 0 * -inf = nan for masked tokens: skip them
    shifted = (-logp - entropy).abs()
    s_sorted, order = shifted.sort(dim=-1)
    cum = p.gather(1, order).cumsum(dim=-1)
    last = (cum < mass.unsqueeze(1)).sum(dim=1).clamp_(max=sl.shape[1] - 1)
    remove = shifted > s_sorted.gather(1, last.unsqueeze(1))
    # HF never removes the first token in typicality order (min_tokens_to_keep=1).
    remove.scatter_(1, order[:, :1], False)
    return sl.masked_fill(remove & active.unsqueeze(1), float("-inf"))


def _mirostat_mask(sl: torch.Tensor, mu: torch.Tensor, modes: list[int], n_vocab: int) -> torch.Tensor:
    """Mirostat truncation (llama.cpp) of temperature-scaled, descending-sorted logits. v2 keeps tokens with
    surprise -log2 p <= mu; v1 keeps the top k with k from a Zipf fit of the top m probabilities.
    Always keeps the most likely token."""
    device, V = sl.device, sl.shape[1]
    probs = sl.softmax(dim=-1)
    pos = torch.arange(V, device=device).unsqueeze(0)
    keep_v2 = -torch.log2(probs) <= mu.float().unsqueeze(1)

    m = min(MIROSTAT_M, V)
    top = probs[:, :m].double()
    t = torch.log(torch.arange(2, m + 1, device=device, dtype=torch.float64)
                  / torch.arange(1, m, device=device, dtype=torch.float64))
    b = torch.log(top[:, :-1] / top[:, 1:])
    valid = top[:, 1:] > 0  # pairs with a masked (p = 0) token say nothing about the slope
    tw = torch.where(valid, t.unsqueeze(0), torch.zeros_like(b))
    s_hat = (tw * torch.where(valid, b, torch.zeros_like(b))).sum(1) / (tw * tw).sum(1)
    eps = s_hat - 1
    k = ((eps * torch.pow(2.0, mu)) / (1 - torch.pow(float(n_vocab), -eps))).pow(1 / s_hat)
    # A flat or degenerate head gives nan/inf: fall back to no truncation, then clamp to [1, V].
    k = torch.nan_to_num(k, nan=float(V), posinf=float(V)).clamp(1, V).floor()
    keep_v1 = pos < k.unsqueeze(1)

    is_v1 = torch.tensor([mo == 1 for mo in modes]).to(device, non_blocking=True).unsqueeze(1)
    keep = torch.where(is_v1, keep_v1, keep_v2) | (pos == 0)
    return sl.masked_fill(~keep, float("-inf"))
