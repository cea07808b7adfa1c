"""One user request's bookkeeping on the engine side (its n samples, their detokenizers and streamed text),
and how a RequestOutput is assembled from it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from frontierlm.engine.detokenizer import IncrementalDetokenizer
from frontierlm.engine.request import Request
from frontierlm.outputs import CompletionOutput, Logprob, RequestOutput
from frontierlm.sampling_params import RequestOutputKind

Decode = Callable[[int], str]  # one token id -> its text


@dataclass
class RequestGroup:
    """One user request: its n samples (child requests) and their detokenizers."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    logprobs: list[list[dict[int, Logprob]]] = field(default_factory=list)
    # streamed text per sample: grows monotonically and never shows a prefix of a stop string that is cut later
    texts: list[str] = field(default_factory=list)
    num_detokenized: list[int] = field(default_factory=list)  # output tokens already given to each detokenizer
    sent: list[tuple[int, int]] = field(default_factory=list)  # (text chars, tokens) already sent, for DELTA
    prompt_logprobs: list | None = None  # built once the prefill has scored every prompt token

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)


class NoText:
    """Stands in for the detokenizer when the model directory has no tokenizer: token ids only."""
    stop_str = None

    def update(self, new_token_ids):
        return None

    def get_new_text(self) -> str:
        return ""

    finish = get_new_text

    def mark_streamed(self, num_chars: int) -> None:
        pass


def logprob_dict(entry, detokenize: bool, decode_one: Decode) -> dict[int, Logprob]:
    """(ids, logprobs, rank) -> {token id: Logprob}: the chosen token first, then the top N by rank."""
    ids, lps, rank = entry
    decode = decode_one if detokenize else (lambda t: None)
    out = {ids[0]: Logprob(lps[0], rank, decode(ids[0]))}
    for r, (t, lp) in enumerate(zip(ids[1:], lps[1:]), start=1):
        out.setdefault(t, Logprob(lp, r, decode(t)))
    return out

def prompt_logprobs(group: RequestGroup, decode_one: Decode) -> list | None:
    first = group.children[0]
    if first.sampling_params.prompt_logprobs is None:
        return None
    if group.prompt_logprobs is None and len(first.prompt_logprobs) >= first.num_prompt_tokens - 1:
        detok = first.sampling_params.detokenize
        group.prompt_logprobs = [None] + [logprob_dict(e, detok, decode_one) for e in first.prompt_logprobs]
    return group.prompt_logprobs


def make_output(group: RequestGroup, decode_one: Decode) -> RequestOutput:
    outs = []
    delta = group.children[0].sampling_params.output_kind == RequestOutputKind.DELTA
    for i, req in enumerate(group.children):
        params = req.sampling_params
        text, ids, lps = group.texts[i], list(req.output_token_ids), group.logprobs[i]
        if delta:  # only what is new since this sample's previous output
            (t0, k0), group.sent[i] = group.sent[i], (len(text), len(ids))
            text, ids, lps = text[t0:], ids[k0:], lps[k0:]
        outs.append(CompletionOutput(
            index=i, text=text, token_ids=ids,
            cumulative_logprob=req.cumulative_logprob if params.logprobs is not None else None,
            logprobs=list(lps) if params.logprobs is not None else None,
            finish_reason=req.status.value if req.is_finished else None,
            stop_reason=req.stop_reason))
    first = group.children[0]
    prompt_lps = prompt_logprobs(group, decode_one)
    if delta and prompt_lps is not None:  # sent once, with the first output that has them ([] = sent)
        prompt_lps, group.prompt_logprobs = (prompt_lps or None), []
    return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs, group.finished,
                         num_cached_tokens=max(first.num_cached_tokens, 0), prompt_logprobs=prompt_lps)
