"""The router's own Prometheus series (`frontierlm:router_*`): end-to-end TTFT / TPOT / ITL as the client sees
them, the prefill leg of disaggregated requests, and counters that make retries, migrations and fallbacks
visible."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from frontierlm.server.metrics import ITL_BUCKETS, LATENCY_BUCKETS

FAILURES = ("no_instance", "upstream_error", "upstream_gone", "bad_request")


class RouterMetrics:
    def __init__(self, instances):
        r = self.registry = CollectorRegistry()
        p = "frontierlm:router_"

        def hist(name, doc, buckets=LATENCY_BUCKETS, labels=()):
            return Histogram(p + name, doc, list(labels), buckets=buckets, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Arrival at the router to the first token sent on.")
        self.tpot = hist("time_per_output_token_seconds", "(last token - first token) / (tokens - 1) per stream.",
                         ITL_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Gap between successive token events sent on.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival at the router to the end of the response.")
        self.prefill = hist("prefill_seconds", "Disaggregated requests: the prefill instance's leg (compute and "
                            "answer; the KV transfer happens on the decode side).")
        self.requests = Counter(p + "requests", "Requests sent to each instance (retries included).",
                                ["instance", "role"], registry=r)
        self.retries = Counter(p + "retries", "Requests retried on another instance before their first token.",
                               registry=r)
        self.migrations = Counter(p + "migrations", "Streams resumed on another instance after theirs died.",
                                  registry=r)
        self.fallbacks = Counter(p + "local_prefill_fallbacks", "Disaggregated requests whose prefill leg failed "
                                 "and that were prefilled on the decode instance instead.", registry=r)
        self.failures = Counter(p + "request_failures", "Requests that ended in an error, by reason.", ["reason"],
                                registry=r)
        self.healthy = Gauge(p + "instance_healthy", "1 if the instance answers its health check and is not "
                             "draining.", ["instance", "role"], registry=r)
        self.instances = instances
        for reason in FAILURES:
            self.failures.labels(reason)

    def render(self) -> tuple[bytes, str]:
        for inst in self.instances:
            self.healthy.labels(inst.url, inst.role).set(1.0 if inst.available else 0.0)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
