"""Rejection sampling is lossless: on a 16-token vocabulary, the empirical distribution of each of the first 4
generated tokens with speculation (a draft that disagrees often, or n-gram's one-hot proposals) matches the
exact target distribution, computed by enumerating every prefix with transformers' logits and the sampler's
stages (temperature 1, top-p, min-p, repetition penalty counting the tokens so far). Chi-square, fixed seeds."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from factories import load_hf_model, make_model_dir
from frontierlm import LLM, SamplingParams
from frontierlm.layers.sampler import Sampler

pytestmark = pytest.mark.usefixtures("one_thread")

V = 16
PROMPT = [5, 6, 7, 5, 6, 7, 5, 6]  # repeats, so n-gram lookup proposes
N = 1500
STEPS = 4


def _model(path, seed, layers):
    make_model_dir(path, "llama", seed=seed, vocab_size=V, num_hidden_layers=layers, hidden_size=32,
                   intermediate_size=64)
    for f in os.listdir(path):  # token ids only: the BPE tokenizer cannot be this small
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(path / f)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return (_model(tmp_path_factory.mktemp("t16"), 0, 2), _model(tmp_path_factory.mktemp("d16"), 7, 1))


def exact_marginals(target: str, params: SamplingParams) -> np.ndarray:
    """[STEPS, V]: P(token at output position t) under the target with the sampler's stages."""
    hf = load_hf_model(target)
    sampler = Sampler(V)
    seqs, probs = [[]], torch.ones(1, dtype=torch.float64)
    out = []
    for _ in range(STEPS):
        with torch.no_grad():
            logits = hf(torch.tensor([PROMPT + s for s in seqs])).logits[:, -1].float()
        states = [SimpleNamespace(sampling_params=params, prompt_token_ids=PROMPT, output_token_ids=s,
                                  generator=None, mirostat_mu=None, bad_words_token_ids=[]) for s in seqs]
        p = torch.softmax(sampler.processed_logits(logits, states, [2]), dim=-1).double()
        joint = probs[:, None] * p  # [prefixes, V]
        out.append(joint.sum(0).numpy())
        seqs = [s + [t] for s in seqs for t in range(V)]
        probs = joint.flatten()
    return np.stack(out)


PARAMS = {
    "temperature": SamplingParams(temperature=1.0),
    "top_p": SamplingParams(temperature=1.0, top_p=0.7),
    "min_p": SamplingParams(temperature=1.0, min_p=0.15),
    "repetition_penalty": SamplingParams(temperature=1.0, repetition_penalty=1.6),
}
CASES = [(name, "draft_model") for name in PARAMS] + [("temperature", "ngram"), ("repetition_penalty", "ngram")]


@pytest.mark.parametrize("name,method", CASES)
def test_speculative_samples_follow_the_target_distribution(name, method, models):
    target, draft = models
    base = PARAMS[name]
    params = SamplingParams(temperature=base.temperature, top_p=base.top_p, min_p=base.min_p,
                            repetition_penalty=base.repetition_penalty, max_tokens=STEPS, ignore_eos=True)
    spec = {"method": method, "num_speculative_tokens": 3, "adaptive": False}
    if method == "draft_model":
        spec["model"] = draft
    llm = LLM(target, block_size=4, max_num_seqs=512, speculative_config=spec, seed=1)
    outs = llm.generate([PROMPT] * N, params, use_tqdm=False)
    st = llm.llm_engine.spec.stats
    # the proposals are scored, and often rejected
    assert st.num_drafts > N // 3 and 0 < st.num_accepted_tokens < 0.8 * st.num_draft_tokens
    tokens = np.array([o.outputs[0].token_ids for o in outs])
    exact = exact_marginals(target, params)
    for t in range(STEPS):
        counts = np.bincount(tokens[:, t], minlength=V)
        expected = exact[t] * N
        assert counts[expected == 0].sum() == 0, f"position {t}: a token with probability 0 was generated"
        big = expected >= 5  # pool the rare tokens into one cell
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(expected[big], expected[~big].sum())
        keep = exp > 0
        p = chisquare(obs[keep], exp[keep] * obs.sum() / exp[keep].sum()).pvalue
        assert p > 1e-4, f"position {t}: chi-square p = {p:.2e}\n{counts}\n{expected.round(1)}"
