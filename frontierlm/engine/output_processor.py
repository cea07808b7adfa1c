"""New tokens -> text, stop strings and RequestOutputs: on the engine thread (offline) or off it (the server).

`detokenize()` is the one rule for both. LLMEngine.step() calls it on the engine thread by default
(LLM.generate). With `engine.detokenize_in_step = False` (AsyncEngine sets it) a step returns one
`GroupDelta` per request that moved instead (token ids, log-prob rows, status: no text), and an
`OutputProcessor` on another thread keeps its own copy of each request (`SampleState`s in a RequestGroup),
runs the same detokenize() and make_output() on it, and hands out the RequestOutputs.

A stop string is then found after the engine has gone on, possibly a step or more later: the processor cuts
the sample at the token that completed it (finish_reason "stop", the stop string as stop_reason) exactly as
the engine would have, and asks the engine to finish the request (`finish_late`). Tokens the engine sampled
in between are dropped on arrival: they reach no text, token_ids, log-probs or usage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from frontierlm.engine.request import RequestStatus
from frontierlm.engine.request_group import Decode, RequestGroup, logprob_dict, make_output
from frontierlm.outputs import RequestOutput
from frontierlm.sampling_params import RequestOutputKind, SamplingParams

Finish = Callable[[object, RequestStatus], None]  # (request or SampleState, status): end it now


def detokenize(group: RequestGroup, idx: int, req, finish: Finish, decode_one: Decode) -> None:
    """Feed sample idx's new output tokens to its detokenizer; a stop string ends the sample (through
    `finish` when nothing else ended it) and cuts the tokens after the one that completed it."""
    detok = group.detoks[idx]
    new = req.output_token_ids[group.num_detokenized[idx]:]
    if len(new) == 1:
        stop = detok.update(new)
    else:  # several tokens this step (speculation, jump-forward, a late stop): stop at the one that ends it
        stop, fed = None, 0
        while stop is None and fed < len(new):
            stop = detok.update(new[fed:fed + 1])
            fed += 1
        if stop is not None and fed < len(new):  # the tokens after it were never generated
            del req.output_token_ids[fed - len(new):]
            del req.all_token_ids[fed - len(new):]
            if req.logprobs:
                del req.logprobs[req.num_output_tokens:]
                req.cumulative_logprob = sum(e[1][0] for e in req.logprobs)  # the same additions, in order
            if req.is_finished:  # by a rule that a later token met: the stop string came first
                req.status, req.stop_reason = RequestStatus.FINISHED_STOPPED, stop
    group.num_detokenized[idx] = req.num_output_tokens
    if stop is not None and not req.is_finished:
        req.stop_reason = stop
        finish(req, RequestStatus.FINISHED_STOPPED)
    if not req.is_finished:
        group.texts[idx] += detok.get_new_text()
    else:
        group.texts[idx] += detok.finish()
        if detok.stop_str is not None and req.stop_reason is None:  # flushed text completed a stop string
            req.stop_reason = detok.stop_str
            req.status = RequestStatus.FINISHED_STOPPED
    if req.sampling_params.logprobs is not None:  # one entry per new token (several with speculation)
        text, done = req.sampling_params.detokenize, group.logprobs[idx]
        done += [logprob_dict(e, text, decode_one) for e in req.logprobs[len(done):]]


# ---- the engine's side ------------------------------------------------------------------------------------
@dataclass
class SampleDelta:
    """What one sample (child request) did since its previous delta, as plain values."""
    index: int
    new_token_ids: list[int]
    logprobs: list  # the (ids, logprobs, rank) rows of the new tokens, when the request asks for log-probs
    status: RequestStatus
    stop_reason: int | str | None
    cumulative_logprob: float
    num_cached_tokens: int


@dataclass
class GroupDelta:
    request_id: str
    samples: list[SampleDelta]
    prompt_logprobs: list | None = None  # once, when the prefill has scored every prompt token


def group_delta(group: RequestGroup, touched: list[int] | None = None) -> GroupDelta:
    """On the engine thread: the samples' progress since the previous delta (group.num_detokenized counts the
    output tokens already handed on)."""
    samples = []
    for i in range(len(group.children)) if touched is None else touched:
        req = group.children[i]
        start = group.num_detokenized[i]
        new = req.output_token_ids[start:]
        group.num_detokenized[i] = req.num_output_tokens
        lp = list(req.logprobs[start:]) if req.sampling_params.logprobs is not None else []
        samples.append(SampleDelta(i, list(new), lp, req.status, req.stop_reason, req.cumulative_logprob,
                                   req.num_cached_tokens))
    first, prompt_lps = group.children[0], None
    if (first.sampling_params.prompt_logprobs is not None and group.prompt_logprobs is None
            and len(first.prompt_logprobs) >= first.num_prompt_tokens - 1):
        prompt_lps, group.prompt_logprobs = list(first.prompt_logprobs), []  # [] = handed on
    return GroupDelta(group.request_id, samples, prompt_lps)


# ---- the output side -----------------------------------------------------------------------------------
@dataclass(eq=False)
class SampleState:
    """The output side's copy of one sample, read by detokenize() and make_output() as they read a Request.
    all_token_ids holds only the output tokens here (detokenize() trims both lists from the end)."""
    request_id: str
    sampling_params: SamplingParams
    num_prompt_tokens: int
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    logprobs: list = field(default_factory=list)
    cumulative_logprob: float = 0.0
    num_cached_tokens: int = -1
    prompt_logprobs: list = field(default_factory=list)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


def output_copy(group: RequestGroup) -> RequestGroup:
    """On the engine thread, when a request is added: the output side's RequestGroup. It takes over the
    detokenizers and streamed text; its samples are SampleStates that only deltas update."""
    states = [SampleState(r.request_id, r.sampling_params, r.num_prompt_tokens, list(r.output_token_ids),
                          list(r.output_token_ids)) for r in group.children]
    return RequestGroup(group.request_id, group.prompt, group.prompt_token_ids, states, group.detoks,
                        group.logprobs, group.texts, list(group.num_detokenized), group.sent)


class OutputProcessor:
    """Runs on one thread, fed in order: add(group copy), abort(request id), process(deltas).
    `finish_late(sample id, stop string)` asks the engine (through its command queue) to end a sample."""

    def __init__(self, decode_one: Decode, finish_late: Callable[[str, str], None]):
        self._decode_one = decode_one
        self._finish_late = finish_late
        self.groups: dict[str, RequestGroup] = {}

    def add(self, group: RequestGroup) -> None:
        self.groups[group.request_id] = group

    def abort(self, request_id: str) -> None:
        self.groups.pop(request_id, None)

    def _finish(self, state: SampleState, status: RequestStatus) -> None:
        state.status = status
        self._finish_late(state.request_id, state.stop_reason)

    def process(self, delta: GroupDelta) -> RequestOutput | None:
        group = self.groups.get(delta.request_id)
        if group is None:  # aborted, or already finished here by a stop string
            return None
        for d in delta.samples:
            state = group.children[d.index]
            if state.is_finished:  # ended here by a stop string: what the engine sampled since is dropped
                continue
            state.output_token_ids += d.new_token_ids
            state.all_token_ids += d.new_token_ids
            state.logprobs += d.logprobs
            state.status, state.stop_reason = d.status, d.stop_reason
            state.cumulative_logprob, state.num_cached_tokens = d.cumulative_logprob, d.num_cached_tokens
            detokenize(group, d.index, state, self._finish, self._decode_one)
        if delta.prompt_logprobs is not None:
            group.children[0].prompt_logprobs = delta.prompt_logprobs
        if not (group.finished or group.children[0].sampling_params.output_kind != RequestOutputKind.FINAL_ONLY):
            return None
        out = make_output(group, self._decode_one)
        if group.finished:
            del self.groups[group.request_id]
        return out
