"""Prometheus metrics with vLLM-like names (prefix sloserve:)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sloserve.interface import EngineClient, RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, engine: EngineClient, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, {"model_name": model_name}
        gauges = {
            "num_requests_running": ("Requests running", lambda s: s.num_running),
            "num_requests_waiting": ("Requests waiting (not preempted)",
                                     lambda s: s.num_waiting - s.num_preempted),
            "num_requests_preempted": ("Requests preempted, waiting to resume",
                                       lambda s: s.num_preempted),
            "kv_cache_usage_perc": ("Fraction of KV blocks in use", lambda s: s.kv_cache_usage),
        }
        for name, (doc, read) in gauges.items():
            gauge = Gauge(f"sloserve:{name}", doc, list(labels), registry=r)
            gauge.labels(**labels).set_function(lambda read=read: read(engine.stats()))

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"sloserve:{name}", doc, list(labels), buckets=LATENCY_BUCKETS,
                             registry=r).labels(**labels)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token")
        self.tpot = histogram("time_per_output_token_seconds", "Mean time per output token")
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish")
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled")
        self.prompt_tokens = Counter("sloserve:prompt_tokens", "Prompt tokens", list(labels),
                                     registry=r).labels(**labels)
        self.generation_tokens = Counter("sloserve:generation_tokens", "Generated tokens",
                                         list(labels), registry=r).labels(**labels)
        self.success = Counter("sloserve:request_success", "Finished requests",
                               [*labels, "finished_reason"], registry=r)
        self.slo_met = Counter("sloserve:slo_met", "Requests that met every objective",
                               [*labels, "slo_class"], registry=r)
        self.slo_missed = Counter("sloserve:slo_missed", "Requests that missed an objective",
                                  [*labels, "slo_class"], registry=r)
        self.rejected = Counter("sloserve:request_rejected", "Requests admission control "
                                "answered with 503: their objective was out of reach",
                                [*labels, "slo_class"], registry=r)
        self.labels = labels

    def record(self, out: RequestOutput) -> None:
        """Called once per finished request, on the engine thread."""
        if out.finish_reason == "rejected":
            self.rejected.labels(**self.labels, slo_class=out.slo.slo_class).inc()
            return
        t = out.timings
        for hist, value in ((self.ttft, t.ttft), (self.tpot, t.tpot), (self.e2e, t.e2e),
                            (self.queue, t.queueing)):
            if value is not None:
                hist.observe(value)
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(len(out.token_ids))
        self.success.labels(**self.labels, finished_reason=out.finish_reason).inc()
        met = t.attained(out.slo)
        if met is not None:
            counter = self.slo_met if met else self.slo_missed
            counter.labels(**self.labels, slo_class=out.slo.slo_class).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
