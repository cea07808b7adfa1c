"""Pipeline parallelism with several batches in flight (vLLM's virtual engines): while the later stages run
the batches scheduled before, rank 0 schedules the next one and runs it through stage 0.

Each engine step is one pipeline tick (pipeline.StageQueue): schedule a batch from the requests that are not
in flight, send it into stage 0, and take back the batch that entered pp - 1 ticks ago, whose logits are
sampled and whose requests are updated as in the one-batch step. So up to pp batches are outstanding, and a
request is never in two of them: its next tokens depend on the one it is in. When every schedulable request
is in flight the tick brings no batch and only drains the pipeline.

A batch takes at most a 1/pp share of the unfinished requests, so the running requests spread over the pp
batches instead of all landing in the first one (which would leave the next pp - 1 ticks empty).

Speculative decoding: a request's proposals go into the batch with it (K + 1 rows, as in the one-batch step)
and are verified when the batch comes back; the proposer skips requests in flight (`busy`), so proposals are
only ever made from a request's verified state, and a request with pending proposals is in no batch or in
exactly one.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from frontierlm.engine.request import Request
from frontierlm.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput


def schedule_free(scheduler: Scheduler, busy: set[str], pp: int) -> SchedulerOutput:
    """The scheduler's step over the requests not in flight (`busy`), at most a 1/pp share of the unfinished
    requests, with the running ones still counted against max_num_seqs. In-flight requests are hidden from the
    scheduler meanwhile, so it neither schedules nor preempts them (their blocks are in use)."""
    running = scheduler.running
    cap = max(1, -(-(len(running) + len(scheduler.waiting)) // pp))
    free = [r for r in running if r.request_id not in busy][:cap]
    chosen = {id(r) for r in free}
    held = [r for r in running if id(r) not in chosen]
    limit = scheduler.max_num_seqs
    scheduler.running = free
    scheduler.max_num_seqs = max(0, min(limit - len(held), cap))
    try:
        return scheduler.schedule()
    finally:
        scheduler.running = sorted(held + scheduler.running, key=Request.sort_key)
        scheduler.max_num_seqs = limit


@dataclass
class InFlight:
    sched: SchedulerOutput
    num_tokens: int
    logits_index: list[int]
    spec_index: list[int]  # the K + 1 rows of each request with proposals (speculative decoding)
    spec_mask_job: object  # their grammar masks, filled while the batch is out
    rows: list
    matchers: list
    bitmask_job: object


class VirtualEngines:
    """The engine's step for pipeline_parallel_size > 1 (LLMEngine.step calls `step`)."""

    def __init__(self, engine):
        self.scheduler, self.runner = engine.scheduler, engine.runner
        self.pp = engine.config.pipeline_parallel_size
        self.in_flight: deque[InFlight | None] = deque()  # one entry per tick, the oldest first
        self.busy: set[str] = set()
        self.max_in_flight = 0  # the most batches outstanding at once (tests, the start-up report's claim)
        self.ticks = self.empty_ticks = 0

    @property
    def num_in_flight(self) -> int:
        return sum(b is not None for b in self.in_flight)

    @torch.inference_mode()
    def step(self) -> tuple[SchedulerOutput, RunnerOutput] | None:
        """One tick: (the batch that completed, its runner output), or None when none did."""
        sched = schedule_free(self.scheduler, self.busy, self.pp)
        if sched.is_empty and not self.num_in_flight:
            if self.scheduler.waiting:  # only grammar compiles are pending: do not spin
                time.sleep(0.001)
            return None
        runner, entry = self.runner, None
        if sched.is_empty:
            hidden = runner.model.tick()
            self.empty_ticks += 1
        else:
            num_tokens, meta, logits_index, spec_index = runner._prepare(sched)
            spec_mask_job = runner._spec_mask_job(sched) if runner.spec is not None else None
            entry = InFlight(sched, num_tokens, logits_index, spec_index, spec_mask_job,
                             *runner._sampling_rows(sched))
            self.busy.update(s.request.request_id for s in sched.scheduled)
            hidden = runner.model.tick(runner._dev["input_ids"][:num_tokens], runner._dev["positions"][:num_tokens],
                                       meta)
        self.ticks += 1
        self.in_flight.append(entry)
        self.max_in_flight = max(self.max_in_flight, self.num_in_flight)
        done = self.in_flight.popleft() if len(self.in_flight) == self.pp else None
        if done is None:
            if runner.device.type == "cuda":  # the next tick refills the pinned host buffers this one copied from
                torch.cuda.current_stream(runner.device).synchronize()
            return None
        self.busy.difference_update(s.request.request_id for s in done.sched.scheduled)
        prompt_lps, logits = runner._logits(done.sched, hidden, done.logits_index, done.num_tokens)
        if runner.spec is not None and (runner.spec.proposer.uses_hidden or done.spec_index):
            return done.sched, runner._verify(done.sched, hidden, logits, prompt_lps, done.spec_index, None,
                                              done.rows, done.matchers, done.bitmask_job, done.spec_mask_job)
        if logits is None:
            return done.sched, RunnerOutput(sampled={}, prompt_logprobs=prompt_lps)
        return done.sched, runner._sample(logits, done.rows, done.matchers, done.bitmask_job, prompt_lps)
