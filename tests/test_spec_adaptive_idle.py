"""Adaptive K = 0 for the whole batch: the step is the plain decode step, also for MTP (which otherwise needs the
target's hidden states from the speculative step); speculation resumes afterwards; outputs never change."""
import pytest

from frontierlm import LLM
from spec_helpers import assert_no_leaks, greedy, mtp_model_dir, prompts, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mtp_off_for_the_batch_takes_the_plain_step_then_resumes(tmp_path_factory):
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
