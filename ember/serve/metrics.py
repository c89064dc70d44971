"""Prometheus metrics: engine state read at scrape time, latencies observed per request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    """Reads the engine's counters and gauges when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str):
        self.stats = stats
        self.labels = {"model_name": model_name}

    def _gauge(self, name, doc, value):
        family = GaugeMetricFamily(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def _counter(self, name, doc, value):
        family = CounterMetricFamily(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def collect(self):
        s = self.stats()
        yield self._gauge("ember_num_requests_running", "Requests in the running batch.", s["num_running"])
        yield self._gauge("ember_num_requests_waiting", "Requests waiting for admission.", s["num_waiting"])
        yield self._gauge("ember_kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", s["kv_cache_usage"])
        yield self._counter("ember_prompt_tokens", "Prompt tokens of requests that started.", s["prompt_tokens"])
        yield self._counter("ember_generation_tokens", "Generated tokens.", s["generation_tokens"])
        yield self._counter("ember_num_preemptions", "Requests preempted (recomputed later).", s["num_preemptions"])
        yield self._counter("ember_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s["prefix_cache_queries"])
        yield self._counter("ember_prefix_cache_hits", "Prompt tokens found in the prefix cache.", s["prefix_cache_hits"])
        yield self._gauge("ember_prefix_cache_hit_rate", "Prefix cache hits / queries.", s["prefix_cache_hit_rate"])
        for key in ("spec_num_drafts", "spec_num_accepted", "spec_num_verifications"):
            if key in s:  # speculative decoding is on
                yield self._counter(f"ember_{key}", f"Speculative decoding: {key[5:].replace('_', ' ')}.", s[key])
        for key in ("spec_acceptance_rate", "spec_mean_accepted_length"):
            if key in s:
                yield self._gauge(f"ember_{key}", f"Speculative decoding: {key[5:].replace('_', ' ')}.", s[key])


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]], model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, model_name))
        labels = ["model_name"]
        self.ttft = Histogram("ember_time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.itl = Histogram("ember_inter_token_latency_seconds", "Time between streamed outputs.", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("ember_e2e_request_latency_seconds", "Request latency, arrival to finish.", labels,
                             buckets=_LATENCY_BUCKETS, registry=self.registry).labels(model_name)
