"""Resuming a request elsewhere (the router's stream migration, frontierlm/router/migration.py): the tokens a
client already received arrive as SamplingParams.extra_args["resume_token_ids"] and are taken as output the
request has already generated. They count toward max_tokens and min_tokens, the penalties see them, and a
grammar's matcher is advanced over them before the next token is sampled, so structured outputs continue where
they stopped. The detokenizer takes them as output, of which the first extra_args["resume_text_chars"]
characters count as streamed: the client has those. The rest is text the dead instance was still holding back
(the start of a possible stop string, an incomplete UTF-8 character), and it streams from here, so the
concatenated text equals that of an uninterrupted run."""
from __future__ import annotations

from frontierlm.sampling_params import SamplingParams


def resume_token_ids(params: SamplingParams, vocab_size: int, max_tokens: int) -> list[int]:
    ids = (params.extra_args or {}).get("resume_token_ids")
    if ids is None:
        return []
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError("resume_token_ids must be a list of token ids")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"resume_token_ids has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    if len(ids) >= max_tokens:
        raise ValueError(f"resume_token_ids holds {len(ids)} tokens, not fewer than max_tokens ({max_tokens})")
    if params.n != 1 or params.logprobs is not None or params.prompt_logprobs is not None:
        raise ValueError("resume_token_ids works for n=1 requests without logprobs")
    return list(ids)


def replay_grammar(request) -> None:
    """Advance a freshly made matcher over the resumed tokens; one it refuses is an error (a ValueError)."""
    for t in request.output_token_ids:
        if not request.grammar.accept_token(t):
            raise ValueError(f"resume_token_ids: token {t} is not allowed by the request's grammar at that point")


def replay_text(detok, resumed: list[int], params: SamplingParams) -> None:
    """Feed the resumed tokens to a fresh detokenizer as output and count what the client has as streamed:
    resume_text_chars characters, or, without that count, what this detokenizer would itself have released."""
    if not resumed:
        return
    chars = (params.extra_args or {}).get("resume_text_chars")
    if chars is not None and (not isinstance(chars, int) or isinstance(chars, bool) or chars < 0):
        raise ValueError(f"resume_text_chars must be a non-negative integer, got {chars!r}")
    if detok.update(resumed) is not None:
        raise ValueError("resume_token_ids already contain one of the request's stop strings")
    released = len(detok.get_new_text())
    detok.mark_streamed(released if chars is None else chars)
