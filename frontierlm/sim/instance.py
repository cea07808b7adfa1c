"""One simulated engine instance: FrontierLM's own Scheduler and KVCacheManager, with a stand-in runner whose
forward only reports how long it would take. Everything the scheduler decides (batch composition, chunked prefill,
admission, preemption, priorities) is the engine's code, so the simulator follows the scheduler as it changes."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from frontierlm.engine.kv_cache import KVCacheManager
from frontierlm.engine.request import Request, RequestStatus
from frontierlm.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from frontierlm.sampling_params import SamplingParams
from frontierlm.sim.timing import BatchShape, prefill_pairs

TOKEN = 7  # every stand-in sample; no EOS is configured, so requests run to their output length


@dataclass
class SpecConfig:
    k: int = 0  # draft tokens proposed per decode step (0: off)
    acceptance: float = 0.0  # probability each draft token is accepted (independently, until the first reject)

    def __post_init__(self):
        if self.k < 0 or not 0 <= self.acceptance <= 1:
            raise ValueError(f"spec K must be >= 0 and acceptance in [0, 1], got {self.k} and {self.acceptance}")

    def expected_tokens(self) -> float:
        a = self.acceptance
        return float(self.k + 1) if a == 1 else (1 - a ** (self.k + 1)) / (1 - a)


@dataclass
class InstanceConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 1 << 20
    policy: str = "continuous"  # or "static": whole batches, admitted only when the previous one is done
    static_batch_size: int = 8
    enable_prefix_caching: bool = False
    spec: SpecConfig = field(default_factory=SpecConfig)

    def __post_init__(self):
        if self.policy not in ("continuous", "static"):
            raise ValueError(f"policy must be continuous or static, got {self.policy!r}")
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "static_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class Instance:
    def __init__(self, name: str, config: InstanceConfig, timer, seed: int = 0):
        self.name, self.config, self.timer = name, config, timer
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len)
        self.rng = random.Random(seed)
        self.pending: list[tuple[Request, int]] = []  # static batching: requests not yet in a batch
        self.batch_size = 0  # static batching: rows of the running batch (finished rows still cost)
        self.transferred: dict[str, int] = {}  # request id -> prompt tokens whose KV arrived from a prefill instance
        self.busy_until = 0.0
        self.busy_time = 0.0
        # server CPU of requests that arrived since the last step began (timer.request_overhead_s each): it
        # shares the engine's core, so the next step ends that much later
        self.host_backlog = 0.0
        self.steps = 0
        self.slot_steps = 0  # static batching: rows x steps, and the rows that did useful work
        self.useful_slot_steps = 0
        self.in_flight: SchedulerOutput | None = None
        self.kv_trace: list[tuple[float, float, int]] = []  # (time, usage, running)
        self.busy_trace: list[tuple[float, float]] = []  # (start, end) of each step

    @property
    def capacity_tokens(self) -> int:
        return self.config.num_blocks * self.config.block_size

    @property
    def num_unfinished(self) -> int:
        return len(self.scheduler.requests) + len(self.pending)

    def fits(self, total_tokens: int) -> bool:
        return total_tokens <= min(self.capacity_tokens, self.config.max_model_len)

    def add(self, request_id: str, prompt_ids: list[int], max_tokens: int, priority: int, arrival: float,
            transferred: int = 0) -> None:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        req = Request(request_id, prompt_ids, params, max_tokens, (), priority, arrival)
        if transferred:
            self.transferred[request_id] = transferred
        else:  # a request from a client (not a KV hand-off): its HTTP side runs on this instance's core
            self.host_backlog += getattr(self.timer, "request_overhead_s", 0.0)
        if self.config.policy == "static":
            self.pending.append((req, transferred))
        else:
            self.scheduler.add_request(req)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.pending)

    # ---- one step: schedule -> timed stand-in -> update -----------------------------------------------
    def start_step(self, now: float) -> float | None:
        """Schedule a step at `now`; returns its duration, or None if there is nothing to run."""
        if self.config.policy == "static" and not self.scheduler.has_unfinished_requests() and self.pending:
            batch, self.pending = self.pending[:self.config.static_batch_size], self.pending[self.config.static_batch_size:]
            for req, _ in batch:
                self.scheduler.add_request(req)
            self.batch_size = len(batch)
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return None
        self.in_flight = sched
        shape, decode_rows = self._batch_shape(sched)
        if self.config.policy == "static" and decode_rows:  # finished rows of a static batch still run (padding)
            shape.decode_ctx = shape.decode_ctx * self.batch_size // decode_rows
            shape.rows += self.batch_size - decode_rows
            shape.decode_reqs = self.batch_size
        duration = self.timer.step_time(shape) + self.host_backlog
        self.host_backlog = 0.0
        self.kv_trace.append((now, self.kv.usage, len(self.scheduler.running)))
        self.busy_trace.append((now, now + duration))
        self.busy_until = now + duration
        self.busy_time += duration
        self.steps += 1
        if self.config.policy == "static":
            self.slot_steps += self.batch_size
            self.useful_slot_steps += sum(1 for s in sched.scheduled if s.samples)
        return duration

    def _batch_shape(self, sched: SchedulerOutput) -> tuple[BatchShape, int]:
        b, k = BatchShape(), self.config.spec.k
        decode_rows = 0
        for s in sched.scheduled:
            r, q = s.request, s.num_new_tokens
            start = r.num_computed_tokens
            skip = max(0, min(self.transferred.get(r.request_id, 0) - start, q))  # KV already received
            start, q = start + skip, q - skip
            if q == 0:
                continue
            b.rows += 1
            decoding = (r.num_output_tokens > 0 or skip > 0) and start + q == r.num_tokens and q <= max(1, k + 1)
            if decoding:
                decode_rows += 1
                b.decode_reqs += 1
                b.decode_ctx += start + q
                if k:  # the verify forward scores K drafts per decode row, whatever is accepted
                    b.spec_tokens += k
                    b.spec_ctx += k * (start + q)
            else:
                b.prefill_chunks += 1
                b.prefill_tokens += q
                b.prefill_pairs += prefill_pairs(start, q)
                b.prefill_ctx += start + q
        return b, decode_rows

    def finish_step(self) -> tuple[list[tuple[Request, int]], list[Request]]:
        """Apply the in-flight step; returns ((request, new tokens) for each that advanced, finished requests)."""
        sched, self.in_flight = self.in_flight, None
        had_output = {s.request.request_id: s.request.num_output_tokens > 0 for s in sched.scheduled}
        result = RunnerOutput(sampled={s.request.request_id: TOKEN for s in sched.scheduled if s.samples})
        updated = self.scheduler.update_from_output(sched, result)
        spec = self.config.spec
        advanced = []
        for r in updated:
            extra = 0
            if spec.k and not r.is_finished and had_output.get(r.request_id):
                accepted = 0
                while accepted < spec.k and self.rng.random() < spec.acceptance:
                    accepted += 1
                # extra accepted tokens join the request uncomputed, as accepted drafts do in the engine; one that
                # reaches max_tokens ends the request as the engine's length check would
                extra = min(accepted, r.max_tokens - r.num_output_tokens)
                for _ in range(extra):
                    r.append_token(TOKEN)
                if r.num_output_tokens >= r.max_tokens:
                    self.scheduler.finish_request(r.request_id, RequestStatus.FINISHED_LENGTH)
            advanced.append((r, 1 + extra))
        finished = [r for r in updated if r.is_finished]
        for r in finished:
            self.transferred.pop(r.request_id, None)
        assert self.kv.pool.num_free_blocks <= self.config.num_blocks
        return advanced, finished
