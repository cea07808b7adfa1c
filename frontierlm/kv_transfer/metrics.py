"""Prometheus series for KV transfer (`frontierlm:kv_transfer_*`), built at scrape time from the engine's
cumulative counters (the server's on_step snapshot): blocks and bytes each way, pulls, failures, prompts that
fell back to a local prefill, and the time spent pulling."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

COUNTERS = (("blocks_sent", "KV blocks sent to consumers."), ("bytes_sent", "KV bytes sent to consumers."),
            ("blocks_received", "KV blocks pulled from producers."),
            ("bytes_received", "KV bytes pulled from producers."),
            ("blocks_skipped", "Prompt blocks not pulled because this instance's prefix cache had them."),
            ("transfers", "Successful pulls (one per request that needed blocks)."),
            ("failures", "Pulls that failed (peer gone, blocks no longer held, a different prompt)."),
            ("local_prefill_fallbacks", "Requests with transfer parameters that were prefilled here instead."),
            ("holds_expired", "Held prompts no consumer pulled within hold_timeout_s."),
            ("seconds_sum", "Seconds spent in successful pulls (from the request, start to copy-in)."))


class KVTransferCollector:
    def __init__(self, metrics):
        self.metrics = metrics  # reads .kv_transfer_stats (replaced whole by the engine thread) and .model_name

    def describe(self):
        return []

    def collect(self):
        st, name = getattr(self.metrics, "kv_transfer_stats", None), self.metrics.model_name
        if not st:
            return
        for key, doc in COUNTERS:
            c = CounterMetricFamily("frontierlm:kv_transfer_" + key, doc, labels=["model_name"])
            c.add_metric([name], st[key])
            yield c
        for key, doc in (("held", "Finished prompts whose blocks wait for a consumer."),
                         ("loading", "Requests waiting for their blocks to arrive.")):
            g = GaugeMetricFamily("frontierlm:kv_transfer_" + key, doc, labels=["model_name"])
            g.add_metric([name], st[key])
            yield g
