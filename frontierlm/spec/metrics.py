"""Prometheus series for speculative decoding, with vLLM's names under the `frontierlm:` prefix, built at scrape
time from the engine's cumulative SpecStats (the server's on_step snapshot): exact counts, nothing for an
engine that does not speculate."""
from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class SpecDecodeCollector:
    def __init__(self, metrics):
        self.metrics = metrics  # reads .spec_stats (a dict replaced whole by the engine thread) and .model_name

    def describe(self):
        return []

    def collect(self):
        st, name = self.metrics.spec_stats, self.metrics.model_name
        if not st:
            return
        p = "frontierlm:spec_decode_"
        for key, doc in (("num_drafts", "Verification rounds (a request with proposals in a step)."),
                         ("num_draft_tokens", "Proposed tokens scored by the target."),
                         ("num_accepted_tokens", "Proposed tokens accepted."),
                         ("num_mirostat_skipped", "Decode steps of Mirostat requests, which do not speculate.")):
            c = CounterMetricFamily(p + key, doc, labels=["model_name"])
            c.add_metric([name], st[key])
            yield c
        per_pos = CounterMetricFamily(p + "num_accepted_tokens_per_pos", "Rounds whose proposal at each "
                                      "position (0 = first) was accepted.", labels=["model_name", "position"])
        for pos, n in enumerate(st["accepted_per_pos"]):
            per_pos.add_metric([name, str(pos)], n)
        yield per_pos
        rate = GaugeMetricFamily(p + "acceptance_rate", "Accepted / proposed tokens since start.",
                                 labels=["model_name"])
        rate.add_metric([name], st["acceptance_rate"])
        yield rate
