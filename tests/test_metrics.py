"""Prometheus metrics: per-route figures, engine counters read at scrape time, and the
predicted-versus-actual cached tokens."""

from __future__ import annotations

import random

from builders import stored
from prometheus_client.parser import text_string_to_metric_families

from kvaware_scorer.pipeline import Pipeline
from kvaware_scorer.types import Endpoint, RoutingRequest


def _samples(pipeline: Pipeline) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(pipeline.metrics.render().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_route_and_accuracy_metrics() -> None:
    pipeline = Pipeline(
        {"listener": {"enabled": False}, "load": {"scrape": False},
         "scorers": [{"type": "kv-prefix", "weight": 2}, {"type": "queue"}],
         "index": {"speculative_ttl_s": 0}},
        load_entry_points=False,
    )
    pipeline.set_endpoints([Endpoint("a"), Endpoint("b")])
    rng = random.Random(1)
    tokens = [rng.randrange(1000) for _ in range(64)]
    hashes = [rng.getrandbits(64) for _ in range(4)]
    pipeline.index.apply("a", [stored(hashes, tokens)])
    with pipeline:
        request = RoutingRequest(model="", prompt=tokens)
        decision = pipeline.route(request)
        assert decision.endpoint.id == "a" and decision.predicted_cached_tokens == 64
        pipeline.routed(request, decision.endpoint, decision)
        pipeline.finished(request, decision.endpoint, prompt_tokens=64, cached_tokens=48)
        samples = _samples(pipeline)
    assert samples[("kvaware_routes_total", (("endpoint", "a"),))] == 1
    assert samples[("kvaware_route_duration_seconds_count", ())] == 1
    assert samples[("kvaware_cached_tokens_predicted_total", ())] == 64
    assert samples[("kvaware_cached_tokens_actual_total", ())] == 48
    error = "kvaware_cached_tokens_prediction_error_tokens_bucket"
    assert samples[(error, (("le", "0.0"),))] == 0  # predicted 64, reported 48: +16
    assert samples[(error, (("le", "16.0"),))] == 1
    assert samples[("kvaware_winner_score_sum", (("scorer", "kv-prefix"),))] == 1.0
    assert samples[("kvaware_index_keys", ())] == 4
    assert samples[("kvaware_index_pod_blocks", (("pod", "a"),))] == 4


def test_scorer_failures_and_listener_counters() -> None:
    pipeline = Pipeline(
        {"listener": {"bind": ["tcp://127.0.0.1:0"]}, "load": {"scrape": False}},
        load_entry_points=False,
    )

    class Broken:
        def score(self, request: object, endpoints: object) -> dict[str, float]:
            raise RuntimeError("boom")

    pipeline.scorers.append(("broken", 1.0, Broken()))
    pipeline.set_endpoints([Endpoint("a")])
    with pipeline:
        decision = pipeline.route(RoutingRequest(model="m", prompt=[1, 2, 3]))
        assert decision.failed_scorers == ["broken"]
        samples = _samples(pipeline)
    assert samples[("kvaware_scorer_failures_total", (("scorer", "broken"),))] == 1
    assert samples[("kvaware_listener_batches_total", ())] == 0
    assert samples[("kvaware_pipeline_events_total", (("kind", "scorer_errors:broken"),))] == 1
