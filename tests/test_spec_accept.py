"""The tensorised parts of a verification step against their per-token references: greedy acceptance
(verify.accept_greedy), the leading run of accepted proposals (verify.leading_accepted), the incremental
n-gram index (proposer.NgramIndex vs ngram_lookup's scan), and greedy identity of n-gram speculation through
the static-shape verification step (spec/fast_verify.py) at K = 1..5, one request and several."""
import os
import random

import numpy as np
import pytest
import torch

from frontierlm import LLM
from frontierlm.spec.proposer import NgramIndex, ngram_lookup
from frontierlm.spec.verify import accept_greedy, leading_accepted
from spec_helpers import assert_no_leaks, greedy, prompts, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(am: list[int], proposals: list[list[int]]) -> tuple[list[int], list[int]]:
    """The per-token loop the tensor version replaced."""
    counts, nxt, st = [], [], 0
    for p in proposals:
        a = 0
        while a < len(p) and am[st + a] == p[a]:
            a += 1
        counts.append(a)
        nxt.append(am[st + a])
        st += len(p) + 1
    return counts, nxt


def test_greedy_acceptance_equals_the_reference_loop():
    rng = random.Random(0)
    for _ in range(500):
        ks = [rng.randint(0, 8) for _ in range(rng.randint(1, 6))]
        vocab = rng.choice([2, 3, 50])  # small vocabularies: long accepted runs and full acceptance happen
        am = [rng.randrange(vocab) for _ in range(sum(k + 1 for k in ks))]
        proposals, st = [], 0
        for k in ks:  # proposals that follow the argmax for a while, then may diverge
            agree = rng.randint(0, k)
            proposals.append(am[st:st + agree] + [rng.randrange(vocab) for _ in range(k - agree)])
            st += k + 1
        got = accept_greedy(torch.tensor(am), proposals)
        assert got == _reference(am, proposals), (am, proposals)
    counts, _ = accept_greedy(torch.tensor([1, 2, 3, 4]), [[1, 2, 3]])
    assert counts == [3]  # every proposal accepted: the next token is the last row's argmax


def test_leading_accepted_stops_at_the_first_rejection():
    rng = random.Random(1)
    for _ in range(300):
        ks = [rng.randint(1, 8) for _ in range(rng.randint(1, 6))]
        flags = [rng.random() < 0.7 for _ in range(sum(ks))]
        want, pos = [], 0
        for k in ks:
            a = 0
            while a < k and flags[pos + a]:
                a += 1
            want.append(a)
            pos += k
        assert leading_accepted(torch.tensor(flags), ks).tolist() == want


def test_ngram_index_equals_the_scan():
    rng = random.Random(2)
    for _ in range(200):
        n_min = rng.randint(1, 3)
        n_max = rng.randint(n_min, 5)
        tokens = [rng.randrange(6) for _ in range(rng.randint(1, 12))]
        index = NgramIndex(n_min, n_max)
        for _ in range(25):  # the text grows by 1 .. 4 tokens between lookups, as accepted runs do
            k = rng.randint(1, 8)
            assert index.lookup(tokens, k) == ngram_lookup(np.asarray(tokens), k, n_min, n_max)
            tokens += [rng.randrange(6) for _ in range(rng.randint(1, 4))]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_static_shape_ngram_verification_is_greedy_identical(k, tiny_model_dir):
    """The vectorised fill of K + 1 rows per request (one table repeated, mixed plain and verifying requests)
    and the tensor acceptance give the plain engine's tokens. The static-shape forward runs uncompiled here
    (inductor would take minutes on this box); FRONTIERLM_COMPILE_TESTS=1 compiles it."""
    target = tiny_model_dir("llama")
    spec = {"method": "ngram", "num_speculative_tokens": k, "adaptive": False}
    ref = LLM(target, block_size=4, enforce_eager=True)
    llm = LLM(target, block_size=4, max_num_seqs=4, enforce_eager=False, speculative_config=spec)
    fast = llm.llm_engine.spec.fast
    fast.warmup_steps = 0
    if not os.environ.get("FRONTIERLM_COMPILE_TESTS"):
        fast._compiled = fast._forward
    ps, params = prompts(lens=(6, 9, 4), seed=5), greedy(max_tokens=20)
    ps[0] = ps[0][:3] * 4  # repeats: the lookup proposes, and often is right
    want = token_ids(ref, ps, params)
    assert token_ids(llm, ps[:1], params) == want[:1]  # batch 1: every row reads one block table
    assert token_ids(llm, ps, params) == want
    st = llm.llm_engine.spec.stats
    assert fast.fast_steps > 5 and st.num_drafts > 5 and st.num_accepted_tokens > 0
    assert_no_leaks(llm)
