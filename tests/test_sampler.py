"""The batched sampler against independent numpy references: exact filtered distributions (checked through
the logprobs and by chi-square on 20k draws), penalties and bans by hand, Mirostat's feedback loop, seeds."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from frontierlm.layers.sampler import Sampler, SamplerOutput
from frontierlm.sampling_params import SamplingParams

EOS = 2
BASE = np.array([2.0, 1.5, 1.2, 1.0, 0.7, 0.5, 0.2, 0.0, -0.3, -0.8, -1.5, -2.5])
# A dominant head token that is *not* typical: typical_p drops it along with the tail.
HEAVY_HEAD = np.array([2.2, 0.4, 0.35, 0.3, 0.25, 0.2, 0.1, 0.0, -0.1, -0.2, -1.5, -3.0])
V = len(BASE)


@dataclass
class State:
    sampling_params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    mirostat_mu: float | None = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list)


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ---- numpy references (HF warper semantics, written independently of the sampler) ---------------------------
def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z[np.isfinite(z)].max())
    return e / e.sum()


def ref_logits(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0):
    z = np.asarray(logits, dtype=np.float64) / temperature
    if top_k:
        z = np.where(z < np.sort(z)[::-1][top_k - 1], -np.inf, z)
    if top_p < 1.0:  # ascending cumulative mass; drop the tail holding <= 1 - top_p, keep the top token
        order = np.argsort(z)
        cum = np.cumsum(np_softmax(z)[order])
        remove = cum <= 1 - top_p
        remove[-1] = False
        z[order[remove]] = -np.inf
    if min_p > 0.0:
        p = np_softmax(z)
        z = np.where(p < min_p * p.max(), -np.inf, z)
    if typical_p < 1.0:
        p = np_softmax(z)
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.log(p)
            ent = -np.nansum(logp * p)
        shifted = np.abs(-logp - ent)
        order = np.argsort(shifted, kind="stable")
        cum = np.cumsum(p[order])
        last = min(int((cum < typical_p).sum()), len(z) - 1)
        remove = shifted > shifted[order[last]]
        remove[order[0]] = False
        z = np.where(remove, -np.inf, z)
    return z


def final_logprobs(out: SamplerOutput) -> torch.Tensor:
    """Scatter the [B, 1 + V] logprobs (asked with logprobs=V) back to [B, V] by token id."""
    full = torch.full((out.logprobs.shape[0], V), float("nan"))
    return full.scatter(1, out.logprobs_token_ids[:, 1:], out.logprobs[:, 1:])


# ---- exact distributions: internal (logprobs) and empirical (chi-square) -----------------------------------------
CASES = {
    "temperature": (BASE, dict(temperature=0.7)),
    "top_k": (BASE, dict(top_k=4)),
    "top_p": (BASE, dict(top_p=0.7)),
    "min_p": (BASE, dict(min_p=0.3)),
    "typical_p": (BASE, dict(typical_p=0.6)),
    "typical_p_drops_head": (HEAVY_HEAD, dict(typical_p=0.42)),
    "combination": (BASE, dict(temperature=1.3, top_k=8, top_p=0.9, min_p=0.1, typical_p=0.85)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_filtered_distribution_is_exact(name):
    base, kw = CASES[name]
    expected = np_softmax(ref_logits(base, **kw))
    allowed = expected > 0
    assert 2 <= allowed.sum() and (name == "temperature" or allowed.sum() < V)  # a real test of the stage
    if name == "typical_p_drops_head":
        assert not allowed[0]

    sampler = Sampler(V, seed=1234)
    logits = torch.tensor(base, dtype=torch.float32)
    # Internally the final distribution matches the reference to float precision.
    out = sampler(logits[None], [State(SamplingParams(**kw, logprobs=V))], [EOS])
    np.testing.assert_allclose(final_logprobs(out)[0].exp().numpy(), expected, atol=1e-6)

    rows, calls = 2000, 10
    states = [State(SamplingParams(**kw)) for _ in range(rows)]
    draws = torch.cat([sampler(logits.expand(rows, V), states, [EOS]).sampled_token_ids for _ in range(calls)])
    counts = np.bincount(draws.numpy(), minlength=V)
    assert counts[~allowed].sum() == 0, "a truncated token was sampled"
    n = rows * calls
    assert chisquare(counts[allowed], expected[allowed] * n).pvalue > 1e-3


def test_matches_hf_warpers_on_random_rows():
    from transformers.generation.logits_process import (MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                                                        TypicalLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 2
    kw = dict(temperature=0.9, top_k=30, top_p=0.95, min_p=0.02, typical_p=0.9)
    out = Sampler(50, seed=0)(logits, [State(SamplingParams(**kw, logprobs=50)) for _ in range(6)], [EOS])
    z = logits / 0.9
    for w in (TopKLogitsWarper(30), TopPLogitsWarper(0.95), MinPLogitsWarper(0.02), TypicalLogitsWarper(0.9)):
        z = w(None, z)
    got = torch.full((6, 50), float("nan")).scatter(1, out.logprobs_token_ids[:, 1:], out.logprobs[:, 1:])
    torch.testing.assert_close(got, torch.log_softmax(z, dim=-1), atol=1e-5, rtol=0)


def test_disabled_stages_leave_rows_untouched_in_mixed_batch():
    logits = torch.tensor(BASE, dtype=torch.float32).expand(3, V)
    states = [State(SamplingParams(logprobs=V)), State(SamplingParams(top_k=3, logprobs=V)),
              State(SamplingParams(temperature=0.5, typical_p=0.5, logprobs=V))]
    lp = final_logprobs(Sampler(V, seed=0)(logits, states, [EOS]))
    for row, kw in zip(lp, [{}, dict(top_k=3), dict(temperature=0.5, typical_p=0.5)]):
        np.testing.assert_allclose(row.exp().numpy(), np_softmax(ref_logits(BASE, **kw)), atol=1e-6)


# ---- greedy, logprobs --------------------------------------------------------------------------------------------
def test_greedy_fast_path_is_argmax():
    torch.manual_seed(1)
    logits = torch.randn(5, 100)
    before = logits.clone()
    out = Sampler(100)(logits, [State(SamplingParams(temperature=0.0)) for _ in range(5)], [EOS])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.sampled_ranks is None and out.new_mirostat_mu == [None] * 5
    assert torch.equal(logits, before)


def test_logprobs_shapes_values_and_ranks():
    torch.manual_seed(2)
    logits = torch.randn(4, 40)
    states = [State(SamplingParams(temperature=0.0, logprobs=2)), State(SamplingParams(top_k=5, logprobs=5)),
              State(SamplingParams(temperature=0.8)), State(SamplingParams(temperature=1.0, logprobs=0))]
    out = Sampler(40, seed=3)(logits, states, [EOS])
    assert out.logprobs_token_ids.shape == (4, 6) and out.logprobs.shape == (4, 6)
    assert out.logprobs.dtype == torch.float32 and out.logprobs_token_ids.dtype == torch.int64
    assert torch.equal(out.logprobs_token_ids[:, 0], out.sampled_token_ids)
    expected = [np.log(np_softmax(ref_logits(logits[0].numpy()))),  # greedy: temperature 1, no truncation
                np.log(np_softmax(ref_logits(logits[1].numpy(), top_k=5)) + 1e-300),
                np.log(np_softmax(ref_logits(logits[2].numpy(), temperature=0.8))),
                np.log(np_softmax(ref_logits(logits[3].numpy())))]
    assert out.sampled_token_ids[0].item() == logits[0].argmax().item()
    for i, exp_lp in enumerate(expected):
        tok = out.sampled_token_ids[i].item()
        np.testing.assert_allclose(out.logprobs[i, 0].item(), exp_lp[tok], rtol=1e-5)
        assert out.sampled_ranks[i].item() == 1 + int((exp_lp > exp_lp[tok] + 1e-6).sum())
        top = np.sort(exp_lp)[::-1][:5]
        np.testing.assert_allclose(out.logprobs[i, 1:].numpy(), top, rtol=1e-5)
        assert np.allclose(exp_lp[out.logprobs_token_ids[i, 1:].numpy()], top, rtol=1e-5)
    assert np.isneginf(out.logprobs[1, 1:].numpy()).sum() == 0  # top_k=5 leaves exactly 5 finite


def test_no_logprobs_when_nobody_asks():
    out = Sampler(V, seed=0)(torch.tensor(BASE, dtype=torch.float32)[None], [State(SamplingParams(top_p=0.5))], [EOS])
    assert out.logprobs is None and out.logprobs_token_ids is None and out.sampled_ranks is None


# ---- bias, bans, penalties against hand-computed logits ------------------------------------------------------------
def processed(logits: list[float], state: State) -> torch.Tensor:
    """Greedy + logprobs=V exposes log_softmax of the penalized logits at temperature 1."""
    state.sampling_params.temperature = 0.0
    state.sampling_params.logprobs = len(logits)
    out = Sampler(len(logits))(torch.tensor([logits], dtype=torch.float32), [state], [EOS])
    return torch.full((len(logits),), float("nan")).scatter(0, out.logprobs_token_ids[0, 1:], out.logprobs[0, 1:])


def check(got: torch.Tensor, expected_logits: list[float]):
    torch.testing.assert_close(got, torch.log_softmax(torch.tensor(expected_logits), dim=-1), atol=1e-5, rtol=0)


L6 = [2.0, -1.0, 0.5, -0.5, 1.0, 0.0]


def test_repetition_penalty_above_one_hf_semantics():
    s = State(SamplingParams(repetition_penalty=2.0), prompt_token_ids=[0, 1], output_token_ids=[1, 3, 3])
    check(processed(L6, s), [1.0, -2.0, 0.5, -1.0, 1.0, 0.0])


def test_repetition_penalty_below_one():
    s = State(SamplingParams(repetition_penalty=0.5), prompt_token_ids=[4], output_token_ids=[1])
    check(processed(L6, s), [2.0, -0.5, 0.5, -0.5, 2.0, 0.0])


def test_presence_and_frequency_penalties_count_output_only():
    s = State(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
              prompt_token_ids=[0, 0, 2], output_token_ids=[4, 4, 4, 1])
    check(processed(L6, s), [2.0, -1.0 - 0.25 - 0.5, 0.5, -0.5, 1.0 - 0.75 - 0.5, 0.0])


def test_all_penalties_together():
    s = State(SamplingParams(repetition_penalty=1.5, presence_penalty=-1.0, frequency_penalty=0.5),
              prompt_token_ids=[0], output_token_ids=[3, 3])
    check(processed(L6, s), [2.0 / 1.5, -1.0, 0.5, -0.5 * 1.5 - 1.0 + 1.0, 1.0, 0.0])


def test_logit_bias_and_banned_ids():
    s = State(SamplingParams(logit_bias={"5": 3.0, 1: -2.5}, banned_token_ids=[0, 3]))
    check(processed(L6, s), [-math.inf, -3.5, 0.5, -math.inf, 1.0, 3.0])


def test_bad_words_multi_token_rule():
    words = [[4], [1, 2, 5], [3, 0]]
    s = State(SamplingParams(), output_token_ids=[2, 1, 2], bad_words_token_ids=words)
    check(processed(L6, s), [2.0, -1.0, 0.5, -0.5, -math.inf, -math.inf])  # [4] always; [1, 2] ends output -> 5
    s = State(SamplingParams(), output_token_ids=[1, 2, 3], bad_words_token_ids=words)
    check(processed(L6, s), [-math.inf, -1.0, 0.5, -0.5, -math.inf, 0.0])  # [3] ends output -> 0
    s = State(SamplingParams(), output_token_ids=[], bad_words_token_ids=[[1, 2, 5]])
    check(processed(L6, s), L6)  # prefix longer than the output: nothing banned


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    sp = dict(min_tokens=3, stop_token_ids=[5])
    check(processed(L6, State(SamplingParams(**sp), output_token_ids=[0, 1])),
          [2.0, -1.0, -math.inf, -0.5, 1.0, -math.inf])
    check(processed(L6, State(SamplingParams(**sp), output_token_ids=[0, 1, 4])), L6)
    # With ignore_eos, EOS is not a stop token, so (as in vLLM) only the stop ids are banned.
    check(processed(L6, State(SamplingParams(**sp, ignore_eos=True), output_token_ids=[])),
          [2.0, -1.0, 0.5, -0.5, 1.0, -math.inf])


def test_greedy_uses_penalized_logits_and_penalties_change_sampled_rows_only_where_asked():
    logits = torch.tensor([L6, L6])
    states = [State(SamplingParams(temperature=0.0, repetition_penalty=3.0), output_token_ids=[0]),
              State(SamplingParams(temperature=0.0))]
    out = Sampler(6)(logits, states, [EOS])
    assert out.sampled_token_ids.tolist() == [4, 0]


# ---- seeds --------------------------------------------------------------------------------------------------------------
def run_seeded(seed: int, position: int, others: list[SamplingParams], steps: int = 30) -> list[int]:
    torch.manual_seed(position)
    flat = torch.zeros(V)  # uniform: the tokens are decided by the noise alone
    g = gen(seed)
    sampler = Sampler(V, seed=position + 100)
    tokens = []
    for _ in range(steps):
        states = [State(p) for p in others]
        states.insert(position, State(SamplingParams(top_k=10), generator=g))
        logits = torch.randn(len(states), V)
        logits[position] = flat
        tokens.append(sampler(logits, states, [EOS]).sampled_token_ids[position].item())
    return tokens


def test_same_seed_same_tokens_in_any_batch():
    a = run_seeded(7, 0, [])
    b = run_seeded(7, 2, [SamplingParams(), SamplingParams(temperature=0.0), SamplingParams(seed=3, top_p=0.5)])
    c = run_seeded(7, 1, [SamplingParams(mirostat_mode=2), SamplingParams(logprobs=3, repetition_penalty=1.2)])
    assert a == b == c
    assert run_seeded(8, 0, []) != a


def test_seeded_rows_draw_exactly_v_values_per_token():
    g = gen(11)
    Sampler(V)(torch.zeros(1, V), [State(SamplingParams(), generator=g)], [EOS])
    ref = gen(11)
    torch.empty(V).exponential_(generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


# ---- Mirostat -----------------------------------------------------------------------------------------------------------
ZIPF_V = 1000
ZIPF = torch.log(1.0 / torch.arange(1, ZIPF_V + 1, dtype=torch.float64) ** 1.1).float()


def np_mirostat_v1_k(p_sorted: np.ndarray, mu: float, n_vocab: int, m: int = 100) -> int:
    t = np.log(np.arange(2, m + 1) / np.arange(1, m))
    b = np.log(p_sorted[: m - 1] / p_sorted[1:m])
    s_hat = (t * b).sum() / (t * t).sum()
    eps = s_hat - 1
    return max(int((eps * 2 ** mu / (1 - n_vocab ** -eps)) ** (1 / s_hat)), 1)


@pytest.mark.parametrize("mode", [1, 2])
@pytest.mark.parametrize("mu", [2.0, 5.0, 8.0, 10.0, 12.0])
def test_mirostat_truncation_size(mode, mu):
    p_sorted = np_softmax(ZIPF.numpy())
    out = Sampler(ZIPF_V, seed=0)(ZIPF[None], [State(SamplingParams(mirostat_mode=mode, logprobs=ZIPF_V),
                                                     mirostat_mu=mu)], [EOS])
    kept = torch.isfinite(out.logprobs[0, 1:]).sum().item()
    if mode == 2:
        assert kept == max(int((-np.log2(p_sorted) <= mu).sum()), 1)
    else:
        assert kept == np_mirostat_v1_k(p_sorted, mu, ZIPF_V)
    # Kept tokens are the most likely ones, renormalized.
    lp = out.logprobs[0, 1:kept + 1].double()
    assert out.logprobs_token_ids[0, 1:kept + 1].sort().values.tolist() == list(range(kept))
    np.testing.assert_allclose(lp.exp().sum().item(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("mode", [1, 2])
def test_mirostat_surprise_settles_near_tau(mode):
    tau, eta, rows, steps = 4.0, 0.1, 8, 300
    sampler = Sampler(ZIPF_V, seed=5)
    mus = [2 * tau] * rows
    surprises = []
    p_sorted = np_softmax(ZIPF.numpy())
    for step in range(steps):
        states = [State(SamplingParams(mirostat_mode=mode, mirostat_tau=tau, mirostat_eta=eta,
                                       logprobs=ZIPF_V if step < 3 else None), mirostat_mu=mu) for mu in mus]
        out = sampler(ZIPF.expand(rows, ZIPF_V), states, [EOS])
        if step < 3:  # the truncation itself, against the formula
            finite = torch.isfinite(out.logprobs[:, 1:]).sum(dim=1)
            for r in range(rows):
                if mode == 2:  # keep tokens with surprise <= mu (probabilities are sorted by token id)
                    want = max(int((-np.log2(p_sorted) <= mus[r]).sum()), 1)
                else:
                    want = np_mirostat_v1_k(p_sorted, mus[r], ZIPF_V)
                assert abs(finite[r].item() - want) <= 1, (r, finite[r].item(), want)  # float32 vs 64 at a boundary
            s = -out.logprobs[:, 0].double() / math.log(2)  # observed surprise, renormalized distribution
            expected_mu = [mu - eta * (si - tau) for mu, si in zip(mus, s.tolist())]
            np.testing.assert_allclose(out.new_mirostat_mu, expected_mu, rtol=1e-5)
        new = out.new_mirostat_mu
        # mu moved by eta * (surprise - tau): recover the surprise of each sampled token
        surprises += [tau + (mu - nm) / eta for mu, nm in zip(mus, new)]
        mus = new
    avg = np.mean(surprises[rows * 50:])
    assert abs(avg - tau) < 0.3, avg


def test_mirostat_rows_mixed_with_others_and_greedy_keeps_mu():
    logits = ZIPF.expand(3, ZIPF_V)
    states = [State(SamplingParams(mirostat_mode=2), mirostat_mu=3.0), State(SamplingParams(top_k=5)),
              State(SamplingParams(mirostat_mode=1, temperature=0.0), mirostat_mu=9.0)]
    out = Sampler(ZIPF_V, seed=0)(logits, states, [EOS])
    assert out.new_mirostat_mu[1] is None and out.new_mirostat_mu[2] == 9.0
    assert out.new_mirostat_mu[0] != 3.0
    assert out.sampled_token_ids[2].item() == 0
    # mu = 3 bits keeps only tokens with p >= 1/8 under the Zipf distribution.
    assert out.sampled_token_ids[0].item() < int((-np.log2(np_softmax(ZIPF.numpy())) <= 3.0).sum().clip(1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_batch_and_seeds():
    dev = torch.device("cuda")
    logits = torch.tensor(BASE, dtype=torch.float32, device=dev).expand(4, V).contiguous()

    def seeded_tokens(pos):
        g = torch.Generator(device=dev)
        g.manual_seed(99)
        sampler, toks = Sampler(V, seed=pos), []
        for _ in range(10):
            states = [State(SamplingParams(top_p=0.9, logprobs=2)), State(SamplingParams(temperature=0.0)),
                      State(SamplingParams(mirostat_mode=2), mirostat_mu=6.0)]
            states.insert(pos, State(SamplingParams(top_k=6), generator=g))
            out = sampler(logits, states, [EOS])
            assert out.sampled_token_ids.device.type == "cuda" and out.logprobs.shape == (4, 3)
            assert out.sampled_token_ids[2 if pos <= 1 else 1].item() == 0  # the greedy row
            toks.append(out.sampled_token_ids[pos].item())
        return toks

    assert seeded_tokens(0) == seeded_tokens(3)
