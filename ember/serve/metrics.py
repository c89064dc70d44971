"""Prometheus metrics: engine state read at scrape time, latencies observed per request.

Every figure is exported twice: under ember's names and under vLLM's (`vllm:...`, same labels
and histogram buckets), so vLLM's Grafana dashboard and load- or prefix-aware routers that read
vLLM's metrics work against ember unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's bucket bounds (vllm/v1/metrics/buckets.py), used for both names
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)

# (stats key, ember name, vLLM name or None, kind, help)
_ENGINE_FIGURES = (
    ("num_running", "ember_num_requests_running", "vllm:num_requests_running", "gauge", "Requests in the running batch."),
    ("num_waiting", "ember_num_requests_waiting", "vllm:num_requests_waiting", "gauge", "Requests waiting for admission."),
    ("kv_cache_usage", "ember_kv_cache_usage_perc", "vllm:kv_cache_usage_perc", "gauge", "Fraction of KV blocks in use (0-1)."),
    ("prompt_tokens", "ember_prompt_tokens", "vllm:prompt_tokens", "counter", "Prompt tokens of requests that started."),
    ("generation_tokens", "ember_generation_tokens", "vllm:generation_tokens", "counter", "Generated tokens."),
    ("num_preemptions", "ember_num_preemptions", "vllm:num_preemptions", "counter", "Requests preempted (recomputed later)."),
    ("prefix_cache_queries", "ember_prefix_cache_queries", "vllm:prefix_cache_queries", "counter",
     "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "ember_prefix_cache_hits", "vllm:prefix_cache_hits", "counter",
     "Prompt tokens found in the prefix cache."),
    ("prefix_cache_hit_rate", "ember_prefix_cache_hit_rate", None, "gauge", "Prefix cache hits / queries."),
)


class _EngineCollector:
    """Reads the engine's counters and gauges when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str):
        self.stats = stats
        self.model_name = model_name

    def _family(self, kind: str, name: str, doc: str, value: float, vllm: bool):
        labels = {"model_name": self.model_name, **({"engine": "0"} if vllm else {})}
        family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value)
        return family

    def collect(self):
        s = self.stats()
        for key, name, vllm_name, kind, doc in _ENGINE_FIGURES:
            yield self._family(kind, name, doc, s[key], vllm=False)
            if vllm_name is not None:
                yield self._family(kind, vllm_name, doc, s[key], vllm=True)
        for key in ("spec_num_drafts", "spec_num_accepted", "spec_num_verifications"):
            if key in s:  # speculative decoding is on
                yield self._family("counter", f"ember_{key}", f"Speculative decoding: {key[5:].replace('_', ' ')}.",
                                   s[key], vllm=False)
        for key in ("spec_acceptance_rate", "spec_mean_accepted_length"):
            if key in s:
                yield self._family("gauge", f"ember_{key}", f"Speculative decoding: {key[5:].replace('_', ' ')}.",
                                   s[key], vllm=False)


class _Both:
    """One observation recorded under ember's name and vLLM's."""

    def __init__(self, *children):
        self.children = children

    def observe(self, value: float) -> None:
        for child in self.children:
            child.observe(value)


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))

        def histogram(ember_name: str, vllm_name: str, doc: str, buckets) -> _Both:
            ours = Histogram(ember_name, doc, ["model_name"], buckets=buckets, registry=self.registry)
            theirs = Histogram(vllm_name, doc, ["model_name", "engine"], buckets=buckets, registry=self.registry)
            return _Both(ours.labels(model_name), theirs.labels(model_name, "0"))

        self.ttft = histogram("ember_time_to_first_token_seconds", "vllm:time_to_first_token_seconds",
                              "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("ember_inter_token_latency_seconds", "vllm:inter_token_latency_seconds",
                             "Time between streamed outputs.", ITL_BUCKETS)
        self.e2e = histogram("ember_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds",
                             "Request latency, arrival to finish.", E2E_BUCKETS)
        self._success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                                ["model_name", "engine", "finished_reason"], registry=self.registry)
        self.model_name = model_name

    def finished(self, reasons: list[str | None]) -> None:
        for reason in reasons:
            if reason is not None:
                self._success.labels(self.model_name, "0", reason).inc()
