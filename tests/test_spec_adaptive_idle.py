"""Adaptive K = 0 for the whole batch: the step is the plain decode step, also for MTP (which otherwise needs the
target's hidden states from the speculative step); speculation resumes afterwards; outputs never change."""
import pytest

from frontierlm import LLM
from frontierlm.spec import decoder
from spec_helpers import assert_no_leaks, greedy, mtp_model_dir, prompts, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mtp_off_for_the_batch_takes_the_plain_step_then_resumes(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(decoder, "IDLE_RECHECK_STEPS", 0)  # choose on every step, as the script below counts
    target = mtp_model_dir(tmp_path_factory)
    ps, params = prompts(lens=(7, 19, 3), seed=5), greedy(max_tokens=40)
    ref = token_ids(LLM(target, block_size=4), ps, params)
    llm = LLM(target, block_size=4, speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    engine = llm.llm_engine
    adaptive, runner = engine.spec.adaptive, engine.runner
    choices, steps = [], []  # per propose call: speculate or not; per step: [the choice before it, spec step?]
    original_choose, original_spec, original_execute = adaptive.choose, runner._execute_spec, runner.execute

    def choose(requests, caps, *rest):
        on = not 8 <= len(choices) < 20  # K = 0 for the whole batch for calls 8..19, on before and after
        choices.append(on)
        return [max(k, 1) if on else 0 for k in original_choose(requests, caps, *rest)]

    def spec_step(sched, *rest):
        steps[-1][1] = True
        return original_spec(sched, *rest)

    def execute(sched):
        steps.append([choices[-1] if choices else None, False])
        return original_execute(sched)

    adaptive.choose, runner._execute_spec, runner.execute = choose, spec_step, execute
    assert token_ids(llm, ps, params) == ref
    off = [spec for before, spec in steps if before is False]
    assert len(off) >= 10 and not any(off), steps  # K = 0 for all: every such step was the plain step
    assert any(spec for before, spec in steps[22:] if before), "speculation did not resume"
    assert engine.spec.stats.num_drafts > 0
    assert_no_leaks(llm)


def test_an_idle_choice_is_kept_for_the_same_batch_then_made_again(tmp_path_factory):
    """K = 0 for the whole batch is kept for IDLE_RECHECK_STEPS steps while the decoding batch keeps its size
    (pricing every step cost 4-10% of a compiled batch-4 step), and made again when the size changes."""
    target = mtp_model_dir(tmp_path_factory)
    ps = prompts(lens=(7, 19, 3), seed=5)
    params = [greedy(max_tokens=n) for n in (30, 60, 60)]  # the batch shrinks from 3 to 2 after ~30 steps
    ref = token_ids(LLM(target, block_size=4), ps, params)
    llm = LLM(target, block_size=4, speculative_config={"method": "ngram", "num_speculative_tokens": 2})
    adaptive = llm.llm_engine.spec.adaptive
    calls = []

    def choose(requests, caps, *rest):
        calls.append(len(requests))
        return [0] * len(requests)

    adaptive.choose = choose
    assert token_ids(llm, ps, params) == ref
    per_size = {n: calls.count(n) for n in set(calls)}
    every = decoder.IDLE_RECHECK_STEPS + 1
    assert set(per_size) == {3, 2}  # the new size was priced at once
    assert per_size[3] <= -(-30 // every) + 1 and per_size[2] <= -(-30 // every) + 2, per_size
    assert len(calls) <= 16  # not one per step (~60 steps)
    assert per_size[3] >= 2  # and asked again while the size stayed
    assert llm.llm_engine.spec.stats.num_drafts == 0
    assert_no_leaks(llm)
