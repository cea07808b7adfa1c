"""Token-budget scheduler (the vLLM v1 rule). There is no prefill or decode phase: every request has
num_computed_tokens catching up with num_tokens, and each step spends max_num_batched_tokens on running requests
first, then on waiting ones. Chunked prefill, mixed batches and prefix hits all fall out of that one rule."""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from frontierlm.engine.kv_cache import KVCacheManager
from frontierlm.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_ids: list[int]
    samples: bool = False  # this step reaches the request's last token, so its logits yield a new token
    spec_token_ids: list[int] = field(default_factory=list)  # proposals scored after the last token

    def __post_init__(self):
        self.samples = (self.request.num_computed_tokens + self.num_new_tokens
                        == self.request.num_tokens + len(self.spec_token_ids))


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class RunnerOutput:
    """What the model runner returns for the requests that sampled (in scheduled order)."""
    sampled: dict[str, int]  # request id -> new token
    spec_accepted: dict[str, list[int]] = field(default_factory=dict)  # accepted proposals, before `sampled`
    logprobs: dict[str, tuple[list[int], list[float], int]] = field(default_factory=dict)
    spec_logprobs: dict[str, list[tuple]] = field(default_factory=dict)  # entries of the accepted proposals
    mirostat_mu: dict[str, float] = field(default_factory=dict)
    prompt_logprobs: dict[str, list] = field(default_factory=dict)  # engine/prompt_logprobs.py entries


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # Both queues stay sorted by (priority, arrival): the front is served first, the back is preempted first.
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.connector = None  # frontierlm/kv_transfer: KV blocks that arrive from / leave for other instances

    # ---- queue management -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=Request.sort_key)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.WAITING_FOR_REMOTE_KVS:
            self.connector.cancel_load(request)
        else:
            (self.running if request.status == RequestStatus.RUNNING else self.waiting).remove(request)
        request.status = status
        if self.connector is None or not self.connector.request_finished(request):  # a producer may hold them
            self.kv.free(request)
        return request

    # ---- one step --------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        if self.connector is not None:
            self._take_remote_kvs()
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            pending = request.num_tokens - request.num_computed_tokens
            num_new = min(pending + len(request.spec_token_ids), budget)
            del request.spec_token_ids[max(num_new - pending, 0):]  # proposals the budget cannot verify
            block_ids = self.kv.allocate_slots(request, num_new)
            if block_ids is None and request.spec_token_ids:  # speculate less before preempting anyone
                num_new -= len(request.spec_token_ids)
                request.spec_token_ids.clear()
                block_ids = self.kv.allocate_slots(request, num_new)
            while block_ids is None:  # out of blocks: preempt from the back until this one fits
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
                block_ids = self.kv.allocate_slots(request, num_new)
            if block_ids is None:
                break
            out.scheduled.append(ScheduledRequest(request, num_new, block_ids, spec_token_ids=request.spec_token_ids))
            request.spec_token_ids = []
            budget -= num_new
            i += 1

        # Admit waiting requests only when nothing had to be preempted this step.
        loading = self.connector.num_loading if self.connector is not None else 0
        while not out.preempted and self.waiting and budget > 0 and len(self.running) + loading < self.max_num_seqs:
            # a request whose grammar is still compiling lets the ones behind it go first
            request = next((r for r in self.waiting if not r.waiting_for_grammar), None)
            if request is None:
                break
            hit_blocks, num_hit = self.kv.get_computed_blocks(request)
            if self.connector is not None and self._load_remote(request, hit_blocks, num_hit):
                loading += 1
                continue
            num_new = min(request.num_tokens - num_hit, budget)
            block_ids = self.kv.allocate_slots(request, num_new, hit_blocks)
            if block_ids is None:
                break
            self.waiting.remove(request)
            self.kv.prefix_queries += request.num_tokens
            self.kv.prefix_hits += num_hit
            request.num_computed_tokens = num_hit  # before ScheduledRequest, which derives `samples` from it
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=Request.sort_key)
            out.scheduled.append(ScheduledRequest(request, num_new, block_ids))
            budget -= num_new
        return out

    def _load_remote(self, request: Request, hit_blocks, num_hit: int) -> bool:
        """KV transfer: if more of the prompt's blocks can come from another instance, allocate them and let
        the request wait for them outside both queues (True), costing no budget this step."""
        num_external = self.connector.get_num_new_matched_tokens(request, num_hit)
        if not num_external or not self.kv.allocate_external(request, hit_blocks, num_hit + num_external):
            return False
        self.waiting.remove(request)
        self.kv.prefix_queries += request.num_tokens
        self.kv.prefix_hits += num_hit
        request.num_computed_tokens = num_hit
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit
        request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        self.connector.start_load(request, num_hit, num_external)
        return True

    def _take_remote_kvs(self) -> None:
        """Requests whose blocks arrived (or failed to: then they compute them) join the running queue."""
        self.connector.poll()
        for request in self.connector.take_finished():
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=Request.sort_key)

    def _preempt(self, request: Request) -> None:
        """Preempt by recompute: drop the blocks, keep the tokens, requeue in priority order."""
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=Request.sort_key)

    def update_from_output(self, sched: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Advance counters, append sampled tokens, apply token-level stop rules. Returns the requests that
        received a token this step (finished ones included, already released)."""
        now = time.monotonic()
        updated = []
        for s in sched.scheduled:
            request = s.request
            if request.is_finished:  # aborted while the step ran
                continue
            accepted = result.spec_accepted.get(request.request_id, [])
            # rejected proposals are wound back: their KV slots are overwritten later, their blocks freed below
            request.num_computed_tokens += s.num_new_tokens - (len(s.spec_token_ids) - len(accepted))
            if request.request_id in result.prompt_logprobs:
                request.prompt_logprobs.extend(result.prompt_logprobs[request.request_id])
            token = result.sampled.get(request.request_id)
            if token is None:
                request.check_invariants()
                continue
            status = None
            accepted_lps = result.spec_logprobs.get(request.request_id)
            for j, t in enumerate(accepted):  # accepted proposals are ordinary tokens: each passes the stop rules
                request.append_token(t)
                if accepted_lps is not None:
                    self._append_logprob(request, accepted_lps[j])
                status = self._check_stop(request, t)
                if status is not None:
                    break
            if status is None:
                request.append_token(token)
                if request.request_id in result.logprobs:
                    self._append_logprob(request, result.logprobs[request.request_id])
                status = self._check_stop(request, token)
            if request.first_token_time is None:
                request.first_token_time = now
            if request.request_id in result.mirostat_mu:
                request.mirostat_mu = result.mirostat_mu[request.request_id]
            request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
            request.check_invariants()
            if status is not None:
                self.finish_request(request.request_id, status)
            elif len(accepted) < len(s.spec_token_ids):
                self.kv.free_tail(request.request_id, request.num_tokens)
            updated.append(request)
        return updated

    @staticmethod
    def _append_logprob(request: Request, entry) -> None:
        request.logprobs.append(entry)
        request.cumulative_logprob += entry[1][0]

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.grammar is not None:
            request.grammar.accept_token(token)
            if request.grammar.is_terminated():  # the grammar ended and its stop token was taken
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
