"""A request is a few counters; everything else is derived from them."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from frontierlm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    WAITING_FOR_REMOTE_KVS = "waiting_for_remote_kvs"  # admitted; its prompt blocks arrive from another instance
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved: never None, already clipped to the context
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    # sampler state (see layers/sampler.SamplingState)
    generator: torch.Generator | None = None
    mirostat_mu: float | None = None
    bad_words_token_ids: list[list[int]] = field(default_factory=list)
    grammar: object | None = None  # xgrammar matcher when structured_outputs is set (structured/backend.py)
    grammar_future: object | None = None  # the compile in flight; the request is not scheduled before it ends

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling (-1 = not yet scheduled)
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    # logprobs of each output token: (ids, logprobs, rank of sampled) rows as host lists
    logprobs: list[tuple[list[int], list[float], int]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    prompt_logprobs: list = field(default_factory=list)  # one (ids, logprobs, rank) per prompt token after the first
    first_token_time: float | None = None
    block_keys: list = field(default_factory=list)  # memoized prefix-cache hashes of full blocks (kv_cache.py)
    spec_token_ids: list[int] = field(default_factory=list)  # proposals to verify next step (frontierlm/spec)

    def __post_init__(self):
        # all_token_ids grows by append; prompt_token_ids and output_token_ids are views of its parts
        self.all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def waiting_for_grammar(self) -> bool:
        return self.grammar_future is not None and self.grammar is None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def sort_key(self) -> tuple[int, float]:
        """Scheduling order: lower priority value first, then earlier arrival."""
        return (self.priority, self.arrival_time)

    def check_invariants(self) -> None:
        assert 0 <= self.num_computed_tokens <= self.num_tokens
        assert self.num_tokens == self.num_prompt_tokens + self.num_output_tokens
