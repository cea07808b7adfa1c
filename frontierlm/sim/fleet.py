"""The discrete-event loop over a fleet of instances: data-parallel replicas behind a router (colocated), or
N_p prefill and N_d decode instances with a KV transfer between them (disaggregated). Time is simulated; every
scheduling decision is made by the engine's own Scheduler inside each Instance."""
from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from dataclasses import dataclass, field

from frontierlm.sim.instance import TOKEN, Instance, InstanceConfig
from frontierlm.sim.workload import SimRequest

ROUTERS = ("least_loaded", "round_robin", "least_kv", "random")


@dataclass
class FleetConfig:
    instance: InstanceConfig
    replicas: int = 1
    disagg: tuple[int, int] | None = None  # (N_p, N_d); None = colocated replicas
    decode_instance: InstanceConfig | None = None  # the decode side's settings (default: `instance`)
    router: str = "least_loaded"
    kv_bytes_per_token: float = 0.0  # for the prefill -> decode transfer
    kv_transfer_bw: float = 50e9  # bytes/s per prefill instance's link
    kv_transfer_latency: float = 0.0005
    ingress_latency: float = 0.0  # from a client's send to the engine's queue (HTTP, parsing); counts in TTFT
    # closed loop (a client with at most this many requests in flight, like `bench serve --max-concurrency`): a
    # request is sent at its arrival time or when an earlier one finishes, whichever is later; None: open loop
    max_concurrency: int | None = None

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.replicas <= 0:
            raise ValueError(f"replicas must be positive, got {self.replicas}")
        if self.disagg is not None and (len(self.disagg) != 2 or min(self.disagg) <= 0):
            raise ValueError(f"disaggregation needs N_p:N_d with both positive, got {self.disagg}")
        if self.kv_transfer_bw <= 0 or self.kv_transfer_latency < 0 or self.ingress_latency < 0:
            raise ValueError("kv transfer bandwidth must be > 0, its latency and the ingress latency >= 0")
        if self.max_concurrency is not None and self.max_concurrency <= 0:
            raise ValueError(f"max_concurrency must be positive, got {self.max_concurrency}")


@dataclass
class Record:
    request_id: str
    arrival: float
    prompt_len: int
    output_len: int
    priority: int
    first_token: float | None = None
    finish: float | None = None
    tokens: int = 0
    preemptions: int = 0
    completions: int = 0  # how many times the request finished (must end at exactly 1)
    rejected: str | None = None
    transfer_s: float = 0.0

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


@dataclass
class SimResult:
    records: list[Record]
    instances: list[Instance]
    roles: list[str]
    end_time: float
    start_time: float = 0.0
    meta: dict = field(default_factory=dict)


class _Router:
    def __init__(self, policy: str, seed: int):
        self.policy, self.rng, self.turn = policy, random.Random(seed), itertools.count()

    def pick(self, pool: list[Instance]) -> Instance:
        if self.policy == "round_robin":
            return pool[next(self.turn) % len(pool)]
        if self.policy == "random":
            return self.rng.choice(pool)
        if self.policy == "least_kv":
            return min(pool, key=lambda i: (i.kv.usage, i.num_unfinished))
        return min(pool, key=lambda i: (i.num_unfinished, i.kv.usage))


def simulate(workload: list[SimRequest], timer, cfg: FleetConfig, decode_timer=None, seed: int = 0) -> SimResult:
    if not workload:
        raise ValueError("the workload holds no requests")
    if cfg.disagg:
        n_p, n_d = cfg.disagg
        prefill = [Instance(f"prefill{i}", cfg.instance, timer, seed + i) for i in range(n_p)]
        decode = [Instance(f"decode{i}", cfg.decode_instance or cfg.instance, decode_timer or timer, seed + 1000 + i)
                  for i in range(n_d)]
        instances, roles = prefill + decode, ["prefill"] * n_p + ["decode"] * n_d
    else:
        prefill = decode = [Instance(f"replica{i}", cfg.instance, timer, seed + i) for i in range(cfg.replicas)]
        instances, roles = list(prefill), ["colocated"] * cfg.replicas
    is_prefill = {id(i) for i in prefill} if cfg.disagg else set()
    router = _Router(cfg.router, seed)
    records = {r.request_id: Record(r.request_id, r.arrival, r.prompt_len, r.output_len, r.priority) for r in workload}
    if len(records) != len(workload):
        raise ValueError("workload request ids must be unique")
    events: list = []
    seq = itertools.count()
    link_free: dict[int, float] = {}
    now = 0.0

    def push(t, kind, data):
        heapq.heappush(events, (t, next(seq), kind, data))

    def kick(inst: Instance, t: float):
        if inst.in_flight is None and inst.has_work():
            d = inst.start_step(t)
            if d is not None:
                push(t + d, "step", inst)

    held = deque(sorted(workload, key=lambda r: r.arrival))  # not sent yet (open loop: all sent on time)

    def send_next(t: float) -> None:
        r = held.popleft()
        rec = records[r.request_id]
        rec.arrival = max(r.arrival, t)  # closed loop: the client's clock starts when the request goes out
        push(rec.arrival + cfg.ingress_latency, "arrive", r)

    for _ in range(min(cfg.max_concurrency or len(held), len(held))):
        send_next(0.0)

    def client_done(t: float) -> None:  # a request finished (or was refused): a closed-loop client sends the next
        if held and cfg.max_concurrency:
            send_next(t)

    while events:
        now, _, kind, data = heapq.heappop(events)
        if kind == "arrive":
            r, rec = data, records[data.request_id]
            pool = prefill
            inst = router.pick(pool)
            if not inst.fits(r.prompt_len + (1 if cfg.disagg else r.output_len)) or (
                    cfg.disagg and not decode[0].fits(r.prompt_len + r.output_len)):
                rec.rejected = (f"prompt {r.prompt_len} + output {r.output_len} tokens can never fit "
                                f"(KV capacity {inst.capacity_tokens} tokens)")
                client_done(now)
                continue
            if r.prompt_ids is not None:  # the workload's own tokens: prefix hits where the server had them
                ids = list(r.prompt_ids)
            elif inst.config.enable_prefix_caching:  # distinct prompts: no hits
                ids = [random.Random(hash(r.request_id)).randrange(1000) for _ in range(r.prompt_len)]
            else:
                ids = [TOKEN] * r.prompt_len
            inst.add(r.request_id, ids, 1 if cfg.disagg else r.output_len, r.priority, now)
            kick(inst, now)
        elif kind == "step":
            inst = data
            advanced, finished = inst.finish_step()
            for req, n in advanced:
                rec = records[req.request_id]
                if rec.first_token is None:
                    rec.first_token = now
                rec.tokens += n
            for req in finished:
                rec = records[req.request_id]
                rec.preemptions += req.num_preemptions
                if id(inst) in is_prefill and rec.output_len > 1:
                    size = cfg.kv_bytes_per_token * rec.prompt_len
                    start = max(now, link_free.get(id(inst), 0.0))
                    done = start + cfg.kv_transfer_latency + size / cfg.kv_transfer_bw
                    link_free[id(inst)] = done
                    rec.transfer_s = done - now
                    push(done, "transferred", (req.prompt_token_ids, rec))
                else:
                    rec.finish = now
                    rec.completions += 1
                    client_done(now)
            kick(inst, now)
        else:  # KV arrived at the decode side: the prompt's KV is there, the first output token is not
            prompt_ids, rec = data
            inst = router.pick(decode)
            inst.add(rec.request_id, list(prompt_ids) + [TOKEN], rec.output_len - 1, rec.priority,
                     rec.arrival, transferred=rec.prompt_len)
            kick(inst, now)
    for inst in instances:
        assert not inst.has_work() and inst.in_flight is None, f"{inst.name} still has work at the end"
        assert inst.kv.pool.num_free_blocks == inst.config.num_blocks, f"{inst.name} leaked KV blocks"
    return SimResult(list(records.values()), instances, roles, now, min(r.arrival for r in workload))
