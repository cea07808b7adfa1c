"""A stream resumed on another instance (engine/resume.py) loses none of the text the dead instance was still
holding back: with a stop string that was partially matched when the stream broke off, the text the client
was sent plus the resumed request's text equals the uninterrupted run's."""
import pytest

from frontierlm import LLM, SamplingParams
from frontierlm.engine.detokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The import system finds modules and loads them."
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), enforce_eager=True)


def _run(llm, stop, **extra):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, stop=stop,
                            extra_args=extra or None)
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    return out.outputs[0]


def _streamed(llm, ids, stop) -> str:
    """What an instance streaming these tokens one at a time had sent (the server sends group texts, which
    grow by get_new_text)."""
    tok = llm.llm_engine.tokenizer
    det = IncrementalDetokenizer(tok, tok.encode(PROMPT), stop=stop)
    sent = ""
    for t in ids:
        assert det.update([t]) is None
        sent += det.get_new_text()
    return sent


@pytest.fixture(scope="module")
def uninterrupted(llm):
    """A stop string that never fires but whose prefix is matched from a fifth of the text on: from there,
    every character is held back until the request ends."""
    whole = _run(llm, None)
    text = whole.text
    stop = text[len(text) // 5:] + "\u2603"
    run = _run(llm, [stop])
    assert run.text == text and run.token_ids == whole.token_ids and len(text) > 10
    return list(run.token_ids), text, stop


@pytest.mark.parametrize("cut", [MAX_TOKENS // 2, MAX_TOKENS - 3])
def test_resumed_text_includes_what_the_dead_instance_held_back(llm, uninterrupted, cut):
    ids, text, stop = uninterrupted
    sent = _streamed(llm, ids[:cut], [stop])
    decoded = llm.llm_engine.tokenizer.decode(ids[:cut])
    assert len(sent) < len(decoded.rstrip("\ufffd")), "the stop string's prefix was being held back"
    rest = _run(llm, [stop], resume_token_ids=ids[:cut], resume_text_chars=len(sent))
    assert list(rest.token_ids) == ids
    assert sent + rest.text == text
    # without the count, the text this instance would itself have released counts as sent: the same here
    assert sent + _run(llm, [stop], resume_token_ids=ids[:cut]).text == text


def test_resumed_text_without_a_stop_string(llm, uninterrupted):
    ids, text, _ = uninterrupted
    sent = _streamed(llm, ids[:10], None)
    assert sent + _run(llm, None, resume_token_ids=ids[:10], resume_text_chars=len(sent)).text == text


def test_a_stop_string_completed_after_the_resume_still_cuts(llm, uninterrupted):
    ids, text, _ = uninterrupted
    stop = text[len(text) // 5:len(text) // 2]  # held from a fifth of the text, fires at half of it
    cut = next(k for k in range(len(ids)) if len(llm.llm_engine.tokenizer.decode(ids[:k])) > len(text) // 4)
    sent = _streamed(llm, ids[:cut], [stop])
    rest = _run(llm, [stop], resume_token_ids=ids[:cut], resume_text_chars=len(sent))
    assert sent + rest.text == text[:text.index(stop)]
    assert rest.finish_reason == "stop" and rest.stop_reason == stop


def test_bad_resume_text_counts_are_refused(llm, uninterrupted):
    ids, text, _ = uninterrupted
    with pytest.raises(ValueError, match="resume_text_chars must be a non-negative integer"):
        _run(llm, None, resume_token_ids=ids[:5], resume_text_chars=-1)
    with pytest.raises(ValueError, match="characters were streamed, but the output holds"):
        _run(llm, None, resume_token_ids=ids[:5], resume_text_chars=len(text) + 1)
    with pytest.raises(ValueError, match="already contain one of the request's stop strings"):
        _run(llm, [text[:3]], resume_token_ids=ids[:10])
