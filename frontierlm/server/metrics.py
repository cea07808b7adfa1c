"""Prometheus metrics with vLLM's names under the `frontierlm:` prefix.

Each server gets its own CollectorRegistry, so several servers (tests) can live in one process. The engine
thread feeds this through the AsyncEngine's StatsSink hooks; the HTTP layer reports the requests it rejects.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from frontierlm.engine.async_engine import StatsSink
from frontierlm.kv_transfer.metrics import KVTransferCollector
from frontierlm.spec.metrics import SpecDecodeCollector

# the *_created series only add noise to every counter and histogram (vLLM turns them off too)
prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0, 10.0)

# request_failure_total{reason}: the reasons the server reports
FAILURE_REASONS = ("invalid_request", "queue_full", "shutting_down", "client_disconnect", "timeout", "shutdown",
                   "engine_error", "unauthorized", "request_too_large", "internal")


class _Series:
    """Per-second sums for the dashboard's charts (last `window` seconds); written by the engine thread,
    read by the HTTP thread."""

    FIELDS = ("tokens", "ttft_sum", "ttft_n", "itl_sum", "itl_n", "prefix_queries", "prefix_hits")

    def __init__(self, window: int = 120):
        self.window = window
        self.buckets: OrderedDict[int, dict] = OrderedDict()
        self.lock = threading.Lock()

    def add(self, **values) -> None:
        sec = int(time.time())
        with self.lock:
            b = self.buckets.get(sec)
            if b is None:
                b = self.buckets[sec] = dict.fromkeys(self.FIELDS, 0.0)
                while len(self.buckets) > self.window:
                    self.buckets.popitem(last=False)
            for k, v in values.items():
                b[k] += v

    def snapshot(self, seconds: int = 60) -> dict:
        end = int(time.time())
        with self.lock:
            rows = [(t, self.buckets.get(t)) for t in range(end - seconds, end)]  # the current second is partial

        def ratio(b, num, den, scale=1.0):
            return None if not b or not b[den] else round(scale * b[num] / b[den], 3)

        return {"t": [t - end for t, _ in rows],
                "tokens_per_s": [b["tokens"] if b else 0 for _, b in rows],
                "ttft_ms": [ratio(b, "ttft_sum", "ttft_n", 1e3) for _, b in rows],
                "itl_ms": [ratio(b, "itl_sum", "itl_n", 1e3) for _, b in rows],
                "prefix_hit_rate": [ratio(b, "prefix_hits", "prefix_queries") for _, b in rows]}


def expert_imbalance(counts: list[int]) -> float:
    """max / mean tokens per expert of one MoE layer (1 = perfectly balanced; 0 before any token is routed)."""
    total = sum(counts)
    return max(counts) * len(counts) / total if total else 0.0


class _MoECollector:
    """frontierlm:moe_expert_tokens_total{layer, expert} and frontierlm:moe_expert_imbalance{layer}, built at
    scrape time from ServerMetrics.expert_snapshot (nothing for dense models). `layer` is the model's own layer
    number (LLMEngine.expert_layers(): dense layers and DeepSeek-V3's MTP modules have no series)."""

    def __init__(self, metrics: "ServerMetrics"):
        self.metrics = metrics

    def describe(self):
        return []  # the series come and go with the model; nothing to reserve in the registry

    def collect(self):
        # one read of a replaced-whole tuple
        (layers, load), name = self.metrics.expert_snapshot, self.metrics.model_name
        if not load:
            return
        tokens = CounterMetricFamily("frontierlm:moe_expert_tokens", "Tokens routed to each expert of each MoE "
                                     "layer (top-k: a token counts once per chosen expert).",
                                     labels=["model_name", "layer", "expert"])
        imbalance = GaugeMetricFamily("frontierlm:moe_expert_imbalance", "Max / mean tokens per expert of each "
                                      "MoE layer (1 = balanced, 0 before any token).",
                                      labels=["model_name", "layer"])
        for layer, counts in zip(layers, load):
            for expert, n in enumerate(counts):
                tokens.add_metric([name, str(layer), str(expert)], n)
            imbalance.add_metric([name, str(layer)], expert_imbalance(counts))
        yield tokens
        yield imbalance
        ranks = self.metrics.expert_parallel_ranks
        if ranks > 1:  # expert parallelism: rank r holds the r-th contiguous share of each layer's experts
            from frontierlm.distributed.moe import load_per_rank

            per_rank = CounterMetricFamily("frontierlm:moe_rank_tokens", "Tokens routed to the experts each "
                                           "expert-parallel rank holds, per MoE layer.",
                                           labels=["model_name", "layer", "rank"])
            for layer, row in zip(layers, load_per_rank(load, ranks)):
                for rank, n in enumerate(row):
                    per_rank.add_metric([name, str(layer), str(rank)], n)
            yield per_rank


class ServerMetrics(StatsSink):
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        p, lab, r = "frontierlm:", ["model_name"], self.registry

        def hist(name, doc, buckets):
            return Histogram(p + name, doc, lab, buckets=buckets, registry=r).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Time from arrival to the first token.", LATENCY_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Gap between successive steps that produced tokens.",
                        ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Time from arrival to the last token.", LATENCY_BUCKETS)
        self.tpot = hist("time_per_output_token_seconds", "(last token - first token) / (tokens - 1) of each "
                         "finished request (all samples counted).", ITL_BUCKETS)
        self.queue_time = hist("request_queue_time_seconds", "Time from arrival to first scheduling.",
                               LATENCY_BUCKETS)
        self.running = Gauge(p + "num_requests_running", "Sequences running.", lab, registry=r).labels(model_name)
        self.waiting = Gauge(p + "num_requests_waiting", "Sequences waiting.", lab, registry=r).labels(model_name)
        self.kv_usage = Gauge(p + "kv_cache_usage_perc", "Share of KV blocks in use (1 = full).", lab,
                              registry=r).labels(model_name)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of requests that produced a first token.", lab,
                                     registry=r).labels(model_name)
        self.gen_tokens = Counter(p + "generation_tokens", "Tokens generated (all samples).", lab,
                                  registry=r).labels(model_name)
        self.prefix_queries = Counter(p + "prefix_cache_queries", "Tokens looked up in the prefix cache.", lab,
                                      registry=r).labels(model_name)
        self.prefix_hits = Counter(p + "prefix_cache_hits", "Tokens found in the prefix cache.", lab,
                                   registry=r).labels(model_name)
        self.preemptions = Counter(p + "num_preemptions", "Preemptions (by recompute).", lab,
                                   registry=r).labels(model_name)
        self._success = Counter(p + "request_success", "Finished sequences by finish reason.",
                                lab + ["finished_reason"], registry=r)
        self._failure = Counter(p + "request_failure", "Requests that failed, by reason.", lab + ["reason"],
                                registry=r)
        self._structured = Counter(p + "structured_output_requests", "Structured-output requests by the backend "
                                   "that served them (auto picks guidance where xgrammar cannot enforce).",
                                   lab + ["backend"], registry=r)
        self.model_name = model_name
        for backend in ("xgrammar", "guidance"):
            self._structured.labels(model_name, backend)
        for reason in ("stop", "length"):  # export zeros so dashboards and tests see every series
            self._success.labels(model_name, reason)
        for reason in FAILURE_REASONS:
            self._failure.labels(model_name, reason)
        self._last = {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "num_preemptions": 0}
        self.series = _Series()
        # MoE expert load: the last (expert_layers(), expert_load()) of the engine, exported by _MoECollector.
        self.expert_snapshot: tuple[list[int], list[list[int]]] = ([], [])  # (layer numbers, rows)
        self.expert_parallel_ranks = 0  # set with the snapshot: the EP ranks the experts are split over
        self._dense = False  # set once a snapshot comes back empty: dense models skip the engine round trip
        self.registry.register(_MoECollector(self))
        self.spec_stats: dict | None = None  # the engine's speculative-decoding counters (frontierlm/spec)
        self.registry.register(SpecDecodeCollector(self))
        self.kv_transfer_stats: dict | None = None  # frontierlm/kv_transfer counters, for KVTransferCollector
        self.registry.register(KVTransferCollector(self))

    # ---- StatsSink (engine thread) ---------------------------------------------------------------------
    def on_step(self, stats: dict) -> None:
        self.running.set(stats["num_running"])
        self.waiting.set(stats["num_waiting"])
        self.kv_usage.set(stats["kv_cache_usage"])
        self.spec_stats = stats.get("spec_decode")
        self.kv_transfer_stats = stats.get("kv_transfer")
        # the engine keeps cumulative counts; counters advance by the difference
        for key, counter in (("prefix_cache_queries", self.prefix_queries), ("prefix_cache_hits", self.prefix_hits),
                             ("num_preemptions", self.preemptions)):
            delta = stats[key] - self._last[key]
            if delta > 0:
                counter.inc(delta)
                if key != "num_preemptions":
                    self.series.add(**{key.replace("cache_", ""): delta})
            self._last[key] = stats[key]
        for backend, count in stats.get("structured_output_requests", {}).items():
            last = self._last.get(("structured", backend), 0)
            if count > last:
                self._structured.labels(self.model_name, backend).inc(count - last)
                self._last[("structured", backend)] = count

    def on_scheduled(self, queue_time: float) -> None:
        self.queue_time.observe(queue_time)

    def on_first_token(self, ttft: float, num_prompt_tokens: int) -> None:
        self.ttft.observe(ttft)
        self.prompt_tokens.inc(num_prompt_tokens)
        self.series.add(ttft_sum=ttft, ttft_n=1)

    def on_new_tokens(self, count: int) -> None:
        self.gen_tokens.inc(count)
        self.series.add(tokens=count)

    def on_inter_token(self, itl: float) -> None:
        self.itl.observe(itl)
        self.series.add(itl_sum=itl, itl_n=1)

    def on_time_per_output_token(self, tpot: float) -> None:
        self.tpot.observe(tpot)

    def on_finished(self, reasons: list[str], e2e: float) -> None:
        self.e2e.observe(e2e)
        for reason in reasons:
            self._success.labels(self.model_name, reason).inc()

    def on_failure(self, reason: str) -> None:
        self._failure.labels(self.model_name, reason).inc()

    def recent_series(self, seconds: int = 60) -> dict:
        return self.series.snapshot(seconds)

    async def refresh_expert_load(self, async_engine, timeout: float = 2.0) -> None:
        """Take a fresh expert-load snapshot before a scrape (the HTTP side; a no-op for dense models).

        Safety: the engine is not thread-safe and expert_load() copies counters off the device, so it runs on
        the engine thread between steps (AsyncEngine.call, as the dashboard's snapshot does), once per scrape
        and never per step. The result replaces self.expert_snapshot whole, so the collector, which only reads that
        attribute, never sees a half-written value. The call is shielded: cancelling the scrape (timeout, client
        gone) must not cancel the engine command. A busy, loading or dead engine leaves the last snapshot."""
        if not async_engine.is_ready or async_engine.dead is not None:
            return
        if self._dense:
            return
        try:
            fut = asyncio.ensure_future(async_engine.call(
                lambda engine: (engine.expert_layers(), engine.expert_load())))
            snapshot = await asyncio.wait_for(asyncio.shield(fut), timeout)
            config = async_engine.engine.config
            self.expert_parallel_ranks = config.tensor_parallel_size if config.enable_expert_parallel else 0
        except Exception:  # noqa: BLE001 - a scrape must answer; the next one retries
            return
        self._dense = not snapshot[1]
        self.expert_snapshot = snapshot

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
