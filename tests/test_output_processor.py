"""Detokenization off the engine thread (engine/output_processor.py): with the engine's steps turned into token
deltas and text made on another thread, a stop string found one or more steps late still gives exactly the
offline output (text, token ids, finish and stop reasons, log-probs, cumulative log-prob), the tokens sampled
meanwhile never appear, and the engine is told to finish the request; through AsyncEngine, detokenization runs on
the output thread and streams equal LLM.generate."""
import asyncio
import threading

import pytest

from frontierlm import LLM, SamplingParams
from frontierlm.engine import detokenizer
from frontierlm.engine.async_engine import AsyncEngine
from frontierlm.engine.llm_engine import LLMEngine
from frontierlm.engine.output_processor import OutputProcessor, output_copy
from frontierlm.sampling_params import RequestOutputKind

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [5, 17, 33, 9, 41]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def base_text(model):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    text = LLM(model).generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text
    assert len(text) > 20, text
    return text


def _params(stop, temperature=0.0, **kw):
    return SamplingParams(temperature=temperature, max_tokens=24, ignore_eos=True, stop=[stop], logprobs=2, **kw)


def _same(out, ref):
    assert len(out.outputs) == len(ref.outputs)
    for c, r in zip(out.outputs, ref.outputs):
        assert (c.text, list(c.token_ids), c.finish_reason, c.stop_reason) == \
            (r.text, list(r.token_ids), r.finish_reason, r.stop_reason)
        assert len(c.logprobs) == len(r.logprobs) == len(c.token_ids)
        assert c.cumulative_logprob == pytest.approx(r.cumulative_logprob, abs=1e-4)
        for a, b in zip(c.logprobs, r.logprobs):
            assert a.keys() == b.keys() and all(a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4) for t in a)


def _late(model, params, lag):
    """Run the engine in delta mode and feed the processor `lag` steps behind (lag=None: only once the engine
    has finished by itself). Returns (final output, streamed outputs, finish_late calls, steps run)."""
    engine = LLMEngine.from_engine_args(model)
    engine.detokenize_in_step = False
    late = []
    proc = OutputProcessor(engine._decode_one, lambda rid, stop: late.append((rid, stop)))
    engine.add_request("r", PROMPT, params)
    proc.add(output_copy(engine.groups["r"]))
    pending, outs, steps = [], [], 0
    while engine.has_unfinished_requests():
        pending.append(engine.step())
        steps += 1
        while pending and (lag is not None and len(pending) > lag):
            for delta in pending.pop(0):
                out = proc.process(delta)
                if out is not None:
                    outs.append(out)
            for rid, stop in late:  # what AsyncEngine's command queue does between steps
                engine.finish_late(rid, stop)
    for deltas in pending:
        for delta in deltas:
            out = proc.process(delta)
            if out is not None:
                outs.append(out)
    return outs[-1], outs, late, steps


@pytest.mark.parametrize("lag", [0, 1, 3, None], ids=["on-time", "one-step", "three-steps", "after-the-end"])
@pytest.mark.parametrize("include", [False, True], ids=["cut", "included"])
def test_late_stop_string_gives_the_offline_output(model, base_text, lag, include):
    stop = base_text[8:11]
    params = _params(stop, include_stop_str_in_output=include)
    ref = LLM(model).generate([PROMPT], params, use_tqdm=False)[0]
    assert ref.outputs[0].finish_reason == "stop" and ref.outputs[0].stop_reason == stop
    final, _, late, steps = _late(model, params, lag)
    assert final.finished
    _same(final, ref)
    assert late == [("r", stop)]
    if lag is None:  # the engine ran to max_tokens unaware; the extra tokens never reached the output
        assert steps == 24 and len(final.outputs[0].token_ids) < 24


def test_late_stop_with_n_samples_and_delta_streaming(model, base_text):
    stop = base_text[5:8]
    params = _params(stop, 0.9, n=2, seed=7, output_kind=RequestOutputKind.DELTA)
    ref_params = _params(stop, 0.9, n=2, seed=7)
    ref = LLM(model).generate([PROMPT], ref_params, use_tqdm=False)[0]
    _, outs, _, _ = _late(model, params, 2)
    assert outs[-1].finished
    for i, c in enumerate(ref.outputs):  # the streamed pieces add up to the offline text and tokens
        pieces = [o.outputs[i] for o in outs]
        assert "".join(p.text for p in pieces) == c.text
        assert sum((list(p.token_ids) for p in pieces), []) == list(c.token_ids)
        assert pieces[-1].finish_reason == c.finish_reason and pieces[-1].stop_reason == c.stop_reason


def test_async_engine_detokenizes_on_the_output_thread(model, base_text, monkeypatch):
    threads = set()
    update = detokenizer.IncrementalDetokenizer.update

    def recording(self, ids):
        threads.add(threading.current_thread().name)
        return update(self, ids)

    monkeypatch.setattr(detokenizer.IncrementalDetokenizer, "update", recording)
    cases = [_params(base_text[8:11]), _params(base_text[3:6], 0.8, n=2, seed=1),
             SamplingParams(temperature=0, max_tokens=9, logprobs=1)]
    refs = [LLM(model).generate([PROMPT], p, use_tqdm=False)[0] for p in cases]
    threads.clear()
    engine = AsyncEngine(lambda: LLMEngine.from_engine_args(model)).start()
    try:
        engine.wait_ready(60)

        async def run_all():
            async def one(i, p):
                track = await engine.add_request(f"q{i}", PROMPT, p)
                last = None
                async for out in engine.stream(track):
                    last = out
                return last
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(cases)))

        outs = asyncio.run(run_all())
    finally:
        engine.shutdown()
    assert threads == {"frontierlm-output"}
    for out, ref in zip(outs, refs):
        _same(out, ref)
    assert engine.num_unfinished == 0
