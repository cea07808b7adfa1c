"""Incremental detokenization and stop-string matching for one request.

The engine calls `update(new_token_ids)` once per step with the tokens just generated. We decode a short sliding
window of token ids (a few prompt tokens of context + the latest generated tokens) instead of the whole sequence,
so the cost per call is O(new tokens). Text is released only up to the last complete character, stop strings are
searched in the new tail only, and streamed text never contains characters that may still turn out to be part of
a stop string.

Lifecycle (what the engine must do):
    det = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens, stop, include_stop_str_in_output)
    each step:   stop_str = det.update(new_ids)     # not None -> finish the request (reason "stop")
                 delta = det.get_new_text()          # streaming delta (may be "")
    on finish:   delta = det.finish()                # ALWAYS call it, for any finish reason (stop string, EOS,
                                                     # max_tokens, abort): it flushes held-back text and
                                                     # incomplete trailing bytes and returns the last delta.
    det.output_text                                  # full text (cut at the stop string)
"""
from __future__ import annotations

from typing import Callable

_REPLACEMENT = "\ufffd"  # what decoders emit for bytes that do not (yet) form a complete UTF-8 character
# Prompt tokens used as decoding context: enough for decoders whose output depends on the previous token
# (Metaspace/SentencePiece strip the leading space of the first token, WordPiece joins "##" pieces).
_CONTEXT_TOKENS = 5
_MAX_CONTEXT_TOKENS = 64


def _make_decode(tokenizer, spaces_between_special_tokens: bool = True) -> Callable[[list[int], bool], str]:
    backend = getattr(tokenizer, "_tokenizer", None)  # tokenizers.Tokenizer behind a PreTrainedTokenizerFast
    if backend is not None and hasattr(backend, "decode"):
        # Same call transformers' decode makes, minus its Python overhead. clean_up_tokenization_spaces is not
        # applied: it rewrites text non-locally and transformers already skips it for BPE tokenizers.
        return backend.decode
    # Slow (Python) tokenizers honour spaces_between_special_tokens; the Rust decoder above has no such option.
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False,
                                              spaces_between_special_tokens=spaces_between_special_tokens)


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text, emitting only complete characters.

    update(ids) -> matched stop string or None. get_new_text() -> text added since its previous call, holding back
    a trailing part that could still start a stop string. finish() -> flushes everything held back and returns
    the final delta; call it once when the request ends. After a stop string fired, further update() calls are
    ignored. `stop_str` is the matched stop string (or None); `finished` tells whether the text is final.

    Invariants: the concatenation of all get_new_text()/finish() pieces equals output_text; with no stop string
    fired, output_text after finish() equals the tokenizer's decode of the generated ids in the prompt's context
    (for byte-level BPE: exactly tokenizer.decode(generated_ids)). When two stop strings end at the same
    character, the longer one (starting earlier) is the match.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False,
                 spaces_between_special_tokens: bool = True):
        self._decode_fn = _make_decode(tokenizer, spaces_between_special_tokens)
        self.skip_special_tokens = skip_special_tokens
        self.include_stop_str_in_output = include_stop_str_in_output
        self._stops = list(dict.fromkeys(s for s in (stop or ()) if s))  # dedupe, keep order, drop ""
        self._max_stop = max((len(s) for s in self._stops), default=0)

        # Window of token ids; decode(window)[:self._emitted] has already become output text.
        ids, text = self._context(list(prompt_token_ids))
        self._ids: list[int] = ids
        self._emitted = len(text)
        # Window positions where the decoded text ended on a complete character: safe places to cut the window.
        self._clean: list[int] = [len(ids)]

        self._chunks: list[str] = []  # output text in pieces; joined lazily by the output_text property
        self._len = 0                 # len(output_text)
        self._tail = ""               # last max_stop-1 output chars: look-back for stop strings split across steps
        self._unstreamed = ""         # output text not yet returned by get_new_text
        self._hold = 0                # trailing chars of _unstreamed that may start a stop string
        self.stop_str: str | None = None
        self.finished = False

    # ------------------------------------------------------------------ public API

    @property
    def output_text(self) -> str:
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append newly generated tokens; return the matched stop string (generation must stop) or None."""
        if self.finished or not new_token_ids:
            return None
        ids = self._ids
        ids.extend(new_token_ids)
        full = self._decode(ids)
        # A trailing U+FFFD may be an incomplete character that the next token completes: hold it back.
        # (Byte-fallback decoders emit one U+FFFD per pending byte, hence rstrip rather than [-1].)
        stable = len(full.rstrip(_REPLACEMENT))
        piece = ""
        if stable > self._emitted:
            piece = full[self._emitted:stable]
            self._emitted = stable
        if stable == len(full):
            self._clean.append(len(ids))
            self._maybe_trim()
        return self._append(piece) if piece else None

    def get_new_text(self) -> str:
        """Text added to output_text since the previous call, minus a tail that may still start a stop string."""
        n = len(self._unstreamed) - self._hold
        if n <= 0:
            return ""
        out, self._unstreamed = self._unstreamed[:n], self._unstreamed[n:]
        return out

    def finish(self) -> str:
        """End of generation: flush incomplete trailing bytes (as U+FFFD, like decode()) and the stop-string
        hold-back; return the text not yet returned by get_new_text. Idempotent."""
        if not self.finished:
            self.finished = True
            if self._ids:
                full = self._decode(self._ids)
                if len(full) > self._emitted:
                    piece = full[self._emitted:]
                    self._emitted = len(full)
                    self._append(piece)  # the flushed text may still complete a stop string
            self._hold = 0
            self._ids = []
        return self.get_new_text()

    def mark_streamed(self, num_chars: int) -> None:
        """Count the first `num_chars` characters of output_text as streamed (by another instance, for a resumed
        request): get_new_text() continues after them, still holding back what may start a stop string."""
        if not 0 <= num_chars <= self._len:
            raise ValueError(f"{num_chars} characters were streamed, but the output holds {self._len}")
        self._unstreamed = self.output_text[num_chars:]
        self._hold = min(self._hold, len(self._unstreamed))

    # ------------------------------------------------------------------ internals

    def _decode(self, ids: list[int]) -> str:
        return self._decode_fn(ids, self.skip_special_tokens)

    def _context(self, prompt: list[int]) -> tuple[list[int], str]:
        n = _CONTEXT_TOKENS
        while True:
            ctx = prompt[-n:] if prompt else []
            text = self._decode(ctx)
            # Context that decodes to nothing (only skipped special tokens) would not give the first generated
            # token its leading space: look further back.
            if text or n >= len(prompt) or n >= _MAX_CONTEXT_TOKENS:
                break
            n *= 2
        # A prompt ending mid-character: drop the dangling tokens so the generated text decodes as it would alone
        # (its orphan continuation bytes become U+FFFD, exactly as in decode(generated_ids)).
        while ctx and text.endswith(_REPLACEMENT):
            ctx.pop()
            text = self._decode(ctx)
        return ctx, text

    def _maybe_trim(self) -> None:
        # Called right after a clean step (everything decoded is emitted). Keep >= _CONTEXT_TOKENS tokens of
        # context starting at a clean boundary; amortized, the window stays under ~2x context + new tokens.
        ids = self._ids
        if len(ids) <= 2 * _CONTEXT_TOKENS:
            return
        limit = len(ids) - _CONTEXT_TOKENS
        start = 0
        for b in reversed(self._clean):
            if b <= limit:
                start = b
                break
        if start == 0:
            return
        window = ids[start:]
        text = self._decode(window)
        if not text:  # no visible context left (e.g. skipped specials): keep the longer window for now
            return
        self._ids = window
        self._emitted = len(text)
        self._clean = [b - start for b in self._clean if b >= start]

    def _push(self, piece: str) -> None:
        self._chunks.append(piece)
        self._len += len(piece)
        self._unstreamed += piece

    def _append(self, piece: str) -> str | None:
        if not self._stops:
            self._push(piece)
            return None
        # Only matches that end inside `piece` are new; they start at most max_stop-1 chars before it.
        search = self._tail + piece
        best = None  # (end, start, stop)
        for s in self._stops:
            i = search.find(s)
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is not None:
            end, start, s = best
            cut = end if self.include_stop_str_in_output else start  # position in `search`
            keep = cut - len(self._tail)                                # chars of `piece` to keep
            if keep >= 0:
                self._push(piece[:keep])
            else:  # the stop string began in text emitted by an earlier step (held back from streaming)
                self._truncate(self._len + keep)
            self.stop_str = s
            self.finished = True
            self._hold = 0
            self._ids = []
            return s
        self._push(piece)
        self._tail = search[max(0, len(search) - self._max_stop + 1):]
        self._hold = min(self._stop_prefix_len(search), len(self._unstreamed))
        return None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        last = text[-1]
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if s[k - 1] == last and text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _truncate(self, n: int) -> None:
        drop = self._len - n
        self._chunks = [self.output_text[:n]]
        self._len = n
        # Held-back text covers the dropped part; clamp in case a caller bypassed the hold.
        self._unstreamed = self._unstreamed[:max(0, len(self._unstreamed) - drop)]
