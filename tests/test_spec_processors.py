"""Custom logits processors with speculative decoding: every verification row is processed with its own prefix of
output ids (the request's output plus the proposals before it), so greedy outputs equal those of decoding without
speculation under a processor whose ban depends on the previous token, for every proposer, in batches where
only some requests ask; sampled requests never emit a banned token."""
import pytest

from frontierlm import LLM, SamplingParams
from frontierlm.layers.logits_processor import AdapterLogitsProcessor
from spec_helpers import mtp_model_dir, prompts, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

BAN = 96  # of a 512-token vocabulary


class BanAfterPrevious(AdapterLogitsProcessor):
    """Requests with extra_args={"ban_after": m} never follow token t with t, t + 1, ..., t + m - 1 (mod V)."""

    def is_argmax_invariant(self):
        return False

    def new_req_logits_processor(self, params):
        m = (params.extra_args or {}).get("ban_after")
        if not m:
            return None

        def ban(output_ids, row):
            if output_ids:
                row[[(output_ids[-1] + d) % row.shape[0] for d in range(m)]] = float("-inf")
            return row

        return ban


def _breaks_ban(tokens, vocab=512):
    return any((b - a) % vocab < BAN for a, b in zip(tokens, tokens[1:]))


def _params(i, temperature=0.0):
    extra = {"ban_after": BAN} if i % 3 != 2 else None  # every third request does not ask
    return SamplingParams(temperature=temperature, max_tokens=24, ignore_eos=True, extra_args=extra)


@pytest.mark.parametrize("method", ["draft_self", "ngram", "mtp"])
def test_greedy_identity_with_a_previous_token_ban(method, tiny_model_dir, tmp_path_factory):
    target = mtp_model_dir(tmp_path_factory) if method == "mtp" else tiny_model_dir("llama")
    spec = {"method": method, "num_speculative_tokens": 3, "adaptive": False}
    if method == "draft_self":
        spec = {**spec, "method": "draft_model", "model": target}
    ps = prompts(lens=(5, 12, 8, 17, 3, 9), seed=13)
    ps[1] = ps[1][:6] * 3  # repeats: n-gram lookup proposes
    params = [_params(i) for i in range(len(ps))]
    ref = token_ids(LLM(target, block_size=4, logits_processors=[BanAfterPrevious]), ps, params)
    unbanned = token_ids(LLM(target, block_size=4), ps, params)
    llm = LLM(target, block_size=4, logits_processors=[BanAfterPrevious], speculative_config=spec)
    assert token_ids(llm, ps, params) == ref
    asking = [i for i in range(len(ps)) if i % 3 != 2]
    assert all(not _breaks_ban(ref[i][0]) for i in asking)
    assert any(ref[i] != unbanned[i] for i in asking)  # the ban changed what greedy picks
    assert all(ref[i] == unbanned[i] for i in range(len(ps)) if i not in asking)
    st = llm.llm_engine.spec.stats
    assert st.num_drafts > 0
    if method == "draft_self":  # the draft's rows go through the processor too: its proposals are the target's
        assert st.num_accepted_tokens > 0.9 * st.num_draft_tokens


def test_sampled_requests_never_emit_a_banned_token(tiny_model_dir):
    target = tiny_model_dir("llama")
    draft = tiny_model_dir("llama", num_hidden_layers=1)
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 4, "adaptive": False}
    llm = LLM(target, block_size=4, logits_processors=[BanAfterPrevious], speculative_config=spec)
    ps = prompts(lens=(4, 10, 6, 7, 12, 5), seed=17)
    outs = token_ids(llm, ps * 2, [_params(i, temperature=1.0) for i in range(2 * len(ps))])
    assert all(not _breaks_ban(o[0]) for i, o in enumerate(outs) if i % 3 != 2)
    assert any(_breaks_ban(o[0]) for i, o in enumerate(outs) if i % 3 == 2)  # without the ban it happens
    assert llm.llm_engine.spec.stats.num_accepted_tokens > 0
