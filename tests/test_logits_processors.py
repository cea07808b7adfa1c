"""Custom logits processors (vLLM v1's interface) and allowed_token_ids: the example from
docs/logits_processors.md changes exactly the rows that ask, in the sampler and through the engine while rows
come, go and move; the BatchUpdate bookkeeping leaves every processor's state on the right row."""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from frontierlm import LLM, SamplingParams
from frontierlm.layers.logits_processor import (AdapterLogitsProcessor, BatchUpdate, LogitsProcessors,
                                                 MoveDirectionality, _batch_update, process_dict_updates)
from frontierlm.layers.sampler import Sampler
from test_sampler import State

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = Path(__file__).resolve().parents[1] / "docs" / "logits_processors.md"


def _doc_example():
    """The ForceTokenProcessor class exactly as the docs show it."""
    block = next(b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if "class ForceToken" in b)
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    return namespace["ForceTokenProcessor"]


ForceTokenProcessor = _doc_example()


class ScaleProcessor:
    """Duck-typed (no base class), argmax-invariant: divides the asking rows by extra_args['scale']."""

    def __init__(self, config, device, is_pin_memory):
        self.rows: dict[int, float] = {}

    def is_argmax_invariant(self):
        return True

    def update_state(self, batch_update):
        process_dict_updates(self.rows, batch_update, lambda p, _, __: (p.extra_args or {}).get("scale"))

    def apply(self, logits):
        for row, scale in self.rows.items():
            logits[row] /= scale
        return logits


def test_batch_update_keeps_state_on_its_row():
    rng = random.Random(0)
    pool = [object() for _ in range(40)]
    old: list = []
    entries: dict[int, object] = {}
    for _ in range(300):
        keep = [r for r in old if rng.random() < 0.7]
        fresh = [r for r in pool if r not in old and rng.random() < 0.1][:rng.randint(0, 5)]
        new = keep + fresh
        rng.shuffle(new)
        update = _batch_update(old, new, lambda r: (r, [], []))
        if update is None:
            assert old == new
        else:
            assert update.batch_size == len(new)
            assert all(max(a, b) < max(len(old), len(new)) for a, b, _ in update.moved)
            process_dict_updates(entries, update, lambda params, _, __: params)  # state = the request itself
        assert entries == dict(enumerate(new))
        old = new


def test_process_dict_updates_order_and_swap():
    entries = {0: "a", 1: "b", 2: "c"}
    update = BatchUpdate(3, removed=[1], added=[(1, None, [], [])],
                         moved=[(0, 2, MoveDirectionality.SWAP), (1, 0, MoveDirectionality.UNIDIRECTIONAL)])
    process_dict_updates(entries, update, lambda *a: "d")
    # removed 1, added "d" at 1, swapped 0 <-> 2, then "d" moved onto 0 (replacing "c" there)
    assert entries == {0: "d", 2: "a"}


def test_sampler_changes_exactly_the_rows_that_ask():
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    procs = LogitsProcessors([ForceTokenProcessor, ScaleProcessor], None, torch.device("cpu"))
    sampler, plain = Sampler(50, seed=0, logits_processors=procs), Sampler(50, seed=0)
    asks = {1: {"force_token": 7}, 3: {"scale": 2.0}, 4: {"force_token": 11, "scale": 4.0}}
    states = [State(SamplingParams(temperature=0, logprobs=50, extra_args=asks.get(i))) for i in range(5)]
    got, ref = sampler(logits, states, [2]), plain(logits, states, [2])

    def dist(out, i):  # the final log-probs of row i, in token order
        return torch.full((50,), float("-inf")).scatter_(0, out.logprobs_token_ids[i, 1:], out.logprobs[i, 1:])

    for i in (0, 2):
        assert torch.equal(dist(got, i), dist(ref, i))
    assert got.sampled_token_ids.tolist()[1] == 7 and got.sampled_token_ids.tolist()[4] == 11
    assert dist(got, 1)[7] == 0 and torch.isinf(dist(got, 1)).sum() == 49
    torch.testing.assert_close(dist(got, 3), torch.log_softmax(logits[3] / 2.0, -1))


def test_allowed_token_ids_mask_in_sampler():
    torch.manual_seed(1)
    logits = torch.randn(3, 30)
    states = [State(SamplingParams(temperature=1.0, logprobs=30, allowed_token_ids=[3, 9, 28] if i == 1 else None))
              for i in range(3)]
    out = Sampler(30, seed=0)(logits, states, [2])
    ids, lps = out.logprobs_token_ids[1, 1:], out.logprobs[1, 1:]
    allowed = {int(t) for t, lp in zip(ids, lps) if lp > float("-inf")}
    assert allowed == {3, 9, 28}
    torch.testing.assert_close(lps[:3].sort(descending=True).values,
                               torch.log_softmax(logits[1, [3, 9, 28]], -1).sort(descending=True).values)
    assert torch.isfinite(out.logprobs[0]).all() and torch.isfinite(out.logprobs[2]).all()


def test_engine_rows_that_ask_and_rows_that_do_not(tiny_model_dir):
    d = tiny_model_dir("llama")
    llm = LLM(d, block_size=4, max_num_seqs=3, logits_processors=[ForceTokenProcessor])
    plain = LLM(d, block_size=4, max_num_seqs=3)
    # different lengths and max_num_seqs=3: rows finish, wait, join and move between steps
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(6)]
    params = [SamplingParams(max_tokens=3 + 2 * i, ignore_eos=True, temperature=0.8 if i % 2 else 0, seed=i,
                             extra_args={"force_token": 40 + i} if i in (1, 2, 5) else None) for i in range(6)]
    got = llm.generate(prompts, params, use_tqdm=False)
    ref = plain.generate(prompts, params, use_tqdm=False)
    for i, (g, r) in enumerate(zip(got, ref)):
        if i in (1, 2, 5):
            assert g.outputs[0].token_ids == [40 + i] * (3 + 2 * i)
        else:
            assert g.outputs[0].token_ids == r.outputs[0].token_ids


def test_processor_by_name_and_bad_requests(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), block_size=4,
              logits_processors=["frontierlm.layers.logits_processor:AdapterLogitsProcessor"])
    assert llm.llm_engine.runner.sampler.logits_processors
    with pytest.raises(ValueError, match="cannot be imported"):
        LLM(tiny_model_dir("llama"), logits_processors=["no_such_module:Thing"])
    with pytest.raises(ValueError, match="AdapterLogitsProcessor"):
        LLM(tiny_model_dir("llama"), logits_processors=[lambda ids, row: row])
    forced = LLM(tiny_model_dir("llama"), block_size=4, logits_processors=[ForceTokenProcessor])
    with pytest.raises(ValueError, match="force_token"):
        forced.generate([[1, 2]], SamplingParams(extra_args={"force_token": "x"}), use_tqdm=False)
    assert not forced.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="allowed_token_ids"):
        forced.generate([[1, 2]], SamplingParams(allowed_token_ids=[10**6]), use_tqdm=False)


class BanFirstChoice(AdapterLogitsProcessor):
    """Per-request functions: ban the token given in extra_args['ban'] (vLLM's AdapterLogitsProcessor shape)."""

    def is_argmax_invariant(self):
        return False

    def new_req_logits_processor(self, params):
        ban = (params.extra_args or {}).get("ban")
        if ban is None:
            return None

        def fn(output_ids, row):
            row[ban] = float("-inf")
            return row
        return fn


def test_adapter_processor_per_request_functions(tiny_model_dir):
    d = tiny_model_dir("llama")
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    plain = LLM(d, block_size=4).generate([[5, 6, 7], [9, 10]], greedy, use_tqdm=False)
    first = plain[0].outputs[0].token_ids[0]
    llm = LLM(d, block_size=4, logits_processors=[BanFirstChoice])
    got = llm.generate([[5, 6, 7], [9, 10]], [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                             extra_args={"ban": first}), greedy], use_tqdm=False)
    assert first not in got[0].outputs[0].token_ids and got[0].outputs[0].token_ids != plain[0].outputs[0].token_ids
    assert got[1].outputs[0].token_ids == plain[1].outputs[0].token_ids
