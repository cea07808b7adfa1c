import json
import random

import pytest

from factories import SPECIAL_TOKENS, save_tokenizer
from frontierlm.engine.detokenizer import IncrementalDetokenizer

MULTIBYTE_TEXT = "naïve café — 日本語のテキスト ✓ done 🎉🚀 and 👩‍💻, ok: Ω≈ç√∫ end"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """Byte-level BPE (GPT-2 style) from tests/factories.py."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("bpe-tok")
    save_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(path))


def _sentencepiece_style(kind: str):
    """Metaspace tokenizers: 'metaspace' (Metaspace decoder) or 'llama' (byte fallback + Replace/Fuse/Strip)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(list(topics.values()), trainer=trainer)
    if kind == "metaspace":
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    else:
        # Rebuild the model with <0xXX> byte tokens in the vocab, as Llama/Mistral SentencePiece models have.
        model = json.loads(tok.to_str())["model"]
        vocab = dict(model["vocab"])
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", len(vocab))
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
        tok.add_special_tokens(SPECIAL_TOKENS)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module", params=["metaspace", "llama"])
def sp(request):
    return _sentencepiece_style(request.param)


def stream(det, ids, chunks=1, rng=None):
    """Feed ids in chunks (an int, or random 1..chunks with rng); return (pieces, stop). Checks per-step invariants."""
    pieces, i, stop = [], 0, None
    while i < len(ids) and stop is None:
        n = rng.randint(1, chunks) if rng else chunks
        stop = det.update(ids[i:i + n])
        i += n
        pieces.append(det.get_new_text())
        assert det.output_text.startswith("".join(pieces))
    pieces.append(det.finish())
    return pieces, stop


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------- multi-byte characters


@pytest.mark.parametrize("chunks", [1, 2, 3])
def test_multibyte_text_never_streams_replacement_chars(bpe, chunks):
    ids = encode(bpe, MULTIBYTE_TEXT)
    assert bpe.decode(ids) == MULTIBYTE_TEXT
    det = IncrementalDetokenizer(bpe, encode(bpe, "Say:"))
    pieces, stop = stream(det, ids, chunks)
    assert stop is None
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == det.output_text == MULTIBYTE_TEXT


def test_multibyte_text_is_held_until_the_character_completes(bpe):
    ids = encode(bpe, "日")
    assert len(ids) > 1  # split across byte-level tokens
    det = IncrementalDetokenizer(bpe, [])
    for t in ids[:-1]:
        assert det.update([t]) is None
        assert det.get_new_text() == "" and det.output_text == ""
    det.update(ids[-1:])
    assert det.get_new_text() == "日" == det.output_text


def test_multibyte_with_byte_fallback(sp):
    prompt = encode(sp, "Say")
    ids = encode(sp, "Say " + MULTIBYTE_TEXT)[len(prompt):]
    det = IncrementalDetokenizer(sp, prompt)
    pieces, _ = stream(det, ids, 1)
    expected = sp.decode(prompt + ids, skip_special_tokens=True)[len(sp.decode(prompt)):]
    assert "".join(pieces) == det.output_text == expected
    if "<0xE6>" in sp.get_vocab():  # byte fallback really spelled the CJK characters in bytes
        assert "\ufffd" not in expected and all("\ufffd" not in p for p in pieces)


def test_finish_flushes_an_incomplete_character_like_decode(bpe):
    gen = encode(bpe, "日")[:1]
    det = IncrementalDetokenizer(bpe, encode(bpe, "x"))
    det.update(gen)
    assert det.get_new_text() == "" and det.output_text == ""
    assert det.finish() == bpe.decode(gen) == det.output_text == "\ufffd"
    assert det.finish() == ""  # idempotent


def test_prompt_ending_mid_character(bpe):
    ids = encode(bpe, "x日本")
    prompt, gen = ids[:2], ids[2:]  # the prompt ends inside "日"
    det = IncrementalDetokenizer(bpe, prompt)
    pieces, _ = stream(det, gen)
    assert "".join(pieces) == det.output_text == bpe.decode(gen)


# ---------------------------------------------------------------- property: pieces join to decode()


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_join_to_decode(bpe, skip):
    rng = random.Random(1234 + skip)
    vocab = len(bpe)
    for _ in range(400):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        gen = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        det = IncrementalDetokenizer(bpe, prompt, skip_special_tokens=skip)
        pieces, stop = stream(det, gen, 3, rng)
        assert stop is None
        assert "".join(pieces) == det.output_text == bpe.decode(gen, skip_special_tokens=skip), (prompt, gen)


def test_real_text_one_token_at_a_time_joins_to_decode(bpe):
    from pydoc_data.topics import topics

    rng = random.Random(7)
    docs = list(topics.values())
    for doc in rng.sample(docs, 20):
        ids = encode(bpe, doc[:2000] + " " + MULTIBYTE_TEXT)
        cut = rng.randint(0, 20)
        det = IncrementalDetokenizer(bpe, ids[:cut])
        pieces, _ = stream(det, ids[cut:])
        assert "".join(pieces) == det.output_text == bpe.decode(ids[cut:])


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_sentencepiece_keeps_prompt_context(sp, skip):
    rng = random.Random(99)
    # Byte tokens are left out: ByteFallback decodes a run of byte tokens as a whole, so a run split between
    # prompt and output has no prefix-consistent text at all.
    ids = [i for t, i in sp.get_vocab().items() if not t.startswith("<0x")]
    for _ in range(300):
        prompt = [rng.choice(ids) for _ in range(rng.randint(0, 12))]
        gen = [rng.choice(ids) for _ in range(rng.randint(0, 30))]
        det = IncrementalDetokenizer(sp, prompt, skip_special_tokens=skip)
        pieces, _ = stream(det, gen, 3, rng)
        p_text = sp.decode(prompt, skip_special_tokens=skip)
        assert p_text + "".join(pieces) == p_text + det.output_text == sp.decode(prompt + gen,
                                                                                 skip_special_tokens=skip)


def test_sentencepiece_leading_space_from_prompt_context(sp):
    prompt = encode(sp, "Hello")
    full = encode(sp, "Hello world again")
    assert full[:len(prompt)] == prompt
    gen = full[len(prompt):]
    det = IncrementalDetokenizer(sp, prompt)
    pieces, _ = stream(det, gen)
    assert "".join(pieces) == det.output_text == " world again"
    # Context made only of skipped special tokens: look further back for text.
    det = IncrementalDetokenizer(sp, prompt + [sp.convert_tokens_to_ids("<|end|>")] * 8)
    pieces, _ = stream(det, gen)
    assert det.output_text == " world again"


# ---------------------------------------------------------------- special tokens


def test_skip_special_tokens(bpe):
    end = bpe.convert_tokens_to_ids("<|end|>")
    gen = encode(bpe, "hi") + [bpe.eos_token_id] + encode(bpe, " there") + [end]
    for skip, expected in [(True, "hi there"), (False, "hi</s> there<|end|>")]:
        det = IncrementalDetokenizer(bpe, encode(bpe, "<|assistant|>"), skip_special_tokens=skip)
        pieces, _ = stream(det, gen)
        assert "".join(pieces) == det.output_text == expected == bpe.decode(gen, skip_special_tokens=skip)


# ---------------------------------------------------------------- stop strings


def test_stop_string_split_across_tokens(bpe):
    gen = encode(bpe, "xa") + encode(bpe, "bc") + encode(bpe, "yz")
    det = IncrementalDetokenizer(bpe, [], stop=["abc"])
    stops, streamed = [], ""
    for t in gen:
        stops.append(det.update([t]))
        streamed += det.get_new_text()
        assert "a" not in streamed  # the stop's first char is held back, never streamed
        if stops[-1]:
            break
    assert stops[-1] == "abc" and stops.count("abc") == 1
    assert det.output_text == "x" and streamed + det.finish() == "x"
    assert det.update(encode(bpe, "more")) is None and det.output_text == "x"  # ignored after stop


@pytest.mark.parametrize("chunks", [1, 100])
def test_earliest_ending_stop_wins(bpe, chunks):
    gen = encode(bpe, "abcdefgh")
    for stop_list in (["cdef", "bcd", "de"], ["de", "cdef", "bcd"]):
        det = IncrementalDetokenizer(bpe, [], stop=stop_list)
        pieces, stop = stream(det, gen, chunks)
        assert stop == "bcd" and det.output_text == "".join(pieces) == "a"
    # Two stops ending at the same character: the longer one is the match.
    det = IncrementalDetokenizer(bpe, [], stop=["cd", "bcd"])
    assert stream(det, gen, chunks)[1] == "bcd" and det.output_text == "a"


@pytest.mark.parametrize("chunks", [1, 100])
def test_include_stop_str_in_output(bpe, chunks):
    gen = encode(bpe, "hello world. more text")
    det = IncrementalDetokenizer(bpe, [], stop=["d. m"], include_stop_str_in_output=True)
    pieces, stop = stream(det, gen, chunks)
    assert stop == "d. m" and "".join(pieces) == det.output_text == "hello world. m"


def test_held_back_text_released_when_it_cannot_be_a_stop(bpe):
    det = IncrementalDetokenizer(bpe, [], stop=["abc", "zzz"])
    det.update(encode(bpe, "say ab"))
    assert det.get_new_text() == "say " and det.output_text == "say ab"
    det.update(encode(bpe, "d"))
    assert det.get_new_text() == "abd"
    det.update(encode(bpe, " xyz"))
    assert det.get_new_text() == " xy"  # "z" could start "zzz"
    assert det.finish() == "z" and det.output_text == "say abd xyz"
    det = IncrementalDetokenizer(bpe, [], stop=["abc"])
    det.update(encode(bpe, "ok ab"))
    assert det.get_new_text() == "ok "
    assert det.finish() == "ab"  # generation ended (EOS / max_tokens): the hold-back is flushed


def test_stop_string_with_multibyte_characters(bpe):
    gen = encode(bpe, "before 日本語 after")
    det = IncrementalDetokenizer(bpe, [], stop=["本語"])
    pieces, stop = stream(det, gen)
    assert stop == "本語" and "".join(pieces) == det.output_text == "before 日"


def test_random_stop_strings_never_leak(bpe):
    rng = random.Random(5)
    words = ["the", "a", "cat", "sat", "on", "mat", "日本", "✓", "🎉", "x", "ab", "aab", "\n", ".", ","]
    for trial in range(300):
        text = "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randint(1, 25)))
        gen = encode(bpe, text)
        stops = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.8 and text:
                i = rng.randrange(len(text))
                stops.append(text[i:i + rng.randint(1, 6)])
            else:
                stops.append(rng.choice(["zz", "cat mat", "日日", "q"]))
        include = rng.random() < 0.5
        det = IncrementalDetokenizer(bpe, encode(bpe, "Q:"), stop=stops, include_stop_str_in_output=include)
        pieces, stop = stream(det, gen, 3, rng)

        # Brute force over the whole text: the earliest-ending match, ties to the longer stop.
        found = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        if found:
            end, start, s = min(found)
            expected = text[:end] if include else text[:start]
        else:
            s, expected = None, text
        assert stop == s, (text, stops)
        assert det.output_text == expected, (text, stops, include)
        # stream() already checked that every streamed prefix is a prefix of the text at that step; the final text
        # is the shortest, so the streamed pieces never contained text that was cut later.
        assert "".join(pieces) == expected


# ---------------------------------------------------------------- cost per step


def test_window_stays_bounded(bpe):
    from pydoc_data.topics import topics

    ids = encode(bpe, "".join(list(topics.values())[:5]) + MULTIBYTE_TEXT)
    assert len(ids) > 2000
    det = IncrementalDetokenizer(bpe, ids[:50], stop=["never appears here"])
    longest, streamed = 0, ""
    for t in ids[50:]:
        det.update([t])
        streamed += det.get_new_text()
        longest = max(longest, len(det._ids), len(det._clean), len(det._tail), len(det._unstreamed))
    assert longest <= 20
    assert streamed + det.finish() == det.output_text == bpe.decode(ids[50:])
