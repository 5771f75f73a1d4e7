"""Prometheus metrics for a pipeline (``prometheus_client``, in a registry of its own).

Counters kept by the listener and the index are read at scrape time by a collector, so
the event path pays nothing for them. Per-route figures are observed once per decision.

The accuracy figure: for every finished request whose response reported
``usage.prompt_tokens_details.cached_tokens``, the tokens we predicted the chosen endpoint
had cached and the tokens it actually reused are both counted, and their difference goes
in a histogram: ``kvaware_cached_tokens_{predicted,actual}_total`` and
``kvaware_cached_tokens_prediction_error_tokens``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvaware_scorer.pipeline import Pipeline
    from kvaware_scorer.types import Decision, Endpoint, RoutingRequest

_LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_TOKEN_BUCKETS = (0, 16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 131072)
_ERROR_BUCKETS = (-8192, -2048, -512, -128, -16, 0, 16, 128, 512, 2048, 8192)
_LISTENER_COUNTERS = {
    "batches": "KV-event batches applied",
    "events_applied": "KV events applied to the index",
    "gaps": "sequence gaps seen",
    "replays": "replays requested",
    "replays_incomplete": "replays that could not return all missing batches",
    "replay_timeouts": "replays abandoned for silence",
    "rewinds": "engine restarts detected (sequence went backwards)",
    "cleared_on_gap": "pods cleared after a gap without replay",
    "buffer_drops": "replay buffers that overflowed",
    "hash_mismatches": "sampled events whose hashes differ from the configured vLLM settings",
}


class _EngineCollector(Collector):
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def collect(self) -> Iterator[Any]:
        pipeline = self._pipeline
        listener = pipeline.listener
        if listener is not None:
            stats = listener.stats()
            for name, doc in _LISTENER_COUNTERS.items():
                family = CounterMetricFamily(f"kvaware_listener_{name}", doc)
                family.add_metric([], stats.get(name, 0))
                yield family
            errors = CounterMetricFamily(
                "kvaware_listener_dropped",
                "input dropped, by pod and reason",
                labels=["pod", "reason"],
            )
            for pod, reasons in stats["errors_by_pod"].items():
                for reason, count in reasons.items():
                    errors.add_metric([pod, reason], count)
            yield errors
        index_stats = pipeline.index.stats()
        entries = GaugeMetricFamily("kvaware_index_keys", "request keys in the index")
        entries.add_metric([], index_stats["entries"])
        yield entries
        per_pod = GaugeMetricFamily(
            "kvaware_index_pod_blocks", "blocks held per pod", labels=["pod"]
        )
        for pod, count in index_stats["pod_blocks"].items():
            per_pod.add_metric([pod], count)
        yield per_pod
        spec = GaugeMetricFamily("kvaware_index_speculative_keys", "live speculative entries")
        spec.add_metric([], index_stats["speculative_keys"])
        yield spec
        counters = CounterMetricFamily(
            "kvaware_index_events", "index counters by kind", labels=["kind"]
        )
        for kind, count in index_stats["counters"].items():
            counters.add_metric([kind], count)
        yield counters
        pipeline_counters = CounterMetricFamily(
            "kvaware_pipeline_events", "pipeline counters by kind", labels=["kind"]
        )
        for kind, count in pipeline.counters.items():
            pipeline_counters.add_metric([kind], count)
        yield pipeline_counters


class PipelineMetrics:
    """The pipeline's metrics; ``render()`` gives the Prometheus text page."""

    def __init__(self, pipeline: Pipeline, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.registry.register(_EngineCollector(pipeline))
        r = self.registry
        self.route_seconds = Histogram(
            "kvaware_route_duration_seconds",
            "time in Pipeline.route",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.tokenize_seconds = Histogram(
            "kvaware_tokenize_duration_seconds",
            "time tokenizing a request",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.routes = Counter("kvaware_routes", "routing decisions", ["endpoint"], registry=r)
        self.scorer_failures = Counter(
            "kvaware_scorer_failures", "scorer calls that raised", ["scorer"], registry=r
        )
        self.winner_scores = Histogram(
            "kvaware_winner_score",
            "each scorer's score of the chosen endpoint",
            ["scorer"],
            registry=r,
            buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
        )
        self.predicted = Histogram(
            "kvaware_predicted_cached_tokens",
            "cached prompt tokens predicted for the chosen endpoint",
            registry=r,
            buckets=_TOKEN_BUCKETS,
        )
        self.predicted_total = Counter(
            "kvaware_cached_tokens_predicted",
            "predicted cached tokens of requests whose response reported cached tokens",
            registry=r,
        )
        self.actual_total = Counter(
            "kvaware_cached_tokens_actual", "cached tokens the responses reported", registry=r
        )
        self.prediction_error = Histogram(
            "kvaware_cached_tokens_prediction_error_tokens",
            "predicted minus reported cached tokens",
            registry=r,
            buckets=_ERROR_BUCKETS,
        )

    def observe_decision(self, request: RoutingRequest, decision: Decision) -> None:
        timings = decision.timings_ms
        self.route_seconds.observe(timings["total"] / 1e3)
        if timings.get("tokenize"):
            self.tokenize_seconds.observe(timings["tokenize"] / 1e3)
        self.routes.labels(decision.endpoint.id).inc()
        for name in decision.failed_scorers:
            self.scorer_failures.labels(name).inc()
        for scored in decision.ranked:
            if scored.endpoint.id == decision.endpoint.id:
                for name, value in scored.scores.items():
                    self.winner_scores.labels(name).observe(value)
                break
        self.predicted.observe(decision.predicted_cached_tokens)

    def observe_finished(
        self, request: RoutingRequest, endpoint: Endpoint, cached_tokens: int | None
    ) -> None:
        if cached_tokens is None:
            return
        match = (request.cache.get("kv_match") or {}).get(endpoint.id)
        predicted = match.matched_tokens if match is not None else 0
        self.predicted_total.inc(predicted)
        self.actual_total.inc(cached_tokens)
        self.prediction_error.observe(predicted - cached_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
