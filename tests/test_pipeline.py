"""Pipeline: filter → score → pick with every built-in component, failures, fallbacks,
explanations, LoRA namespaces, speculation, lifecycle and endpoint changes.

KV-prefix figures come from real events: ``pipeline.index.apply`` with ``BlockStored``
events built from tokens, or a real listener fed by an :class:`EventPublisher` over
127.0.0.1. Custom components (a raising scorer, out-of-range scores, a raising picker, a
recording plugin) come from the test kit in ``test_manager.py``, installed through a
test-only entry point.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from builders import stored
from test_manager import calls, install_plugins, quiet_config
from waiting import wait_for

from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.events import EventBatch
from kvaware_scorer.pipeline import NoEndpointError, Pipeline
from kvaware_scorer.publisher import EventPublisher
from kvaware_scorer.types import Decision, Endpoint, RoutingRequest

M = "m"
BLOCK = 16
DEADLINE_S = 10.0


# ---------------------------------------------------------------------------- helpers


class Chain:
    """A deterministic prompt of ``blocks`` 16-token blocks, with fake engine hashes."""

    def __init__(self, blocks: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.tokens = [rng.randrange(150_000) for _ in range(blocks * BLOCK)]
        self.hashes = [rng.getrandbits(64) for _ in range(blocks)]

    def event(self, lo: int, hi: int, **extra: Any) -> Any:
        return stored(
            self.hashes[lo:hi],
            self.tokens[lo * BLOCK : hi * BLOCK],
            parent=self.hashes[lo - 1] if lo else None,
            **extra,
        )

    def batch(self, lo: int, hi: int, **extra: Any) -> EventBatch:
        return EventBatch(ts=time.time(), events=[self.event(lo, hi, **extra)])

    def request(self, blocks: int | None = None, model: str = M, **kw: Any) -> RoutingRequest:
        n = len(self.hashes) if blocks is None else blocks
        return RoutingRequest(model=model, token_ids=self.tokens[: n * BLOCK], **kw)


def endpoints(*ids: str, models: tuple[str, ...] = (M,), **extra: Any) -> list[dict[str, Any]]:
    return [{"id": i, "models": list(models), **extra} for i in ids]


def store(pipeline: Pipeline, pod: str, chain: Chain, blocks: int, **extra: Any) -> None:
    """``pod`` publishes that it cached the first ``blocks`` blocks of ``chain``."""
    pipeline.index.apply(pod, [chain.event(0, blocks, **extra)])


def live_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.is_alive()}


@pytest.fixture
def make() -> Iterator[Callable[..., Pipeline]]:
    """Build (and by default start) pipelines; stops them all and checks no thread leaks."""
    before = live_threads()
    made: list[Pipeline] = []

    def build(config: Any = None, *, start: bool = True, **kw: Any) -> Pipeline:
        pipeline = Pipeline(config, **kw)
        made.append(pipeline)
        if start:
            pipeline.start()
        return pipeline

    yield build
    for pipeline in made:
        pipeline.stop()
    wait_for(lambda: not (live_threads() - before), "pipeline threads to end")


@pytest.fixture
def kit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Install the test kit plugin (``testkit``) through a test-only entry point."""
    install_plugins(tmp_path, monkeypatch, testkit="test_manager:KIT")


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVAWARE_PLUGINS", raising=False)
    monkeypatch.delenv("KVAWARE_DISABLE_PLUGINS", raising=False)


def scores_of(decision: Decision, scorer: str) -> dict[str, float]:
    return {s.endpoint.id: s.scores[scorer] for s in decision.ranked}


def totals_of(decision: Decision) -> dict[str, float]:
    return {s.endpoint.id: s.total for s in decision.ranked}


# ---------------------------------------------------------------------------- filters


def test_model_match_filter(make: Callable[..., Pipeline]) -> None:
    p = make(
        quiet_config(
            endpoints=[
                {"id": "a", "models": [M]},
                {"id": "b", "models": ["other"]},
                {"id": "c"},  # lists no models: serves any
                {"id": "d", "models": ["base"], "adapters": [M]},
            ],
            filters=[{"type": "model-match"}],
            scorers=[],
        )
    )
    decision = p.route(RoutingRequest(model=M, token_ids=[1, 2, 3]))
    assert sorted(totals_of(decision)) == ["a", "c", "d"]
    assert decision.filtered_out == {"model-match": ["b"]}


def test_health_filter_drops_unhealthy_and_failing_endpoints(
    make: Callable[..., Pipeline],
) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b", "c"),
            filters=[{"type": "health", "params": {"unhealthy_after": 2}}],
            scorers=[],
        )
    )
    request = RoutingRequest(model=M, token_ids=[1])
    assert sorted(totals_of(p.route(request))) == ["a", "b", "c"]
    p.set_endpoints([*p.endpoints[:2], Endpoint("c", models=frozenset({M}), healthy=False)])
    p.load.scraped("b", None)
    assert sorted(totals_of(p.route(request))) == ["a", "b"]  # one failure is not enough
    p.load.scraped("b", None)
    decision = p.route(request)
    assert sorted(totals_of(decision)) == ["a"]
    assert decision.filtered_out == {"health": ["b", "c"]}
    p.load.scraped("b", {"waiting": 0.0})  # a good scrape resets the count
    assert sorted(totals_of(p.route(request))) == ["a", "b"]


def test_health_filter_with_unhealthy_after_zero_ignores_scrapes(
    make: Callable[..., Pipeline],
) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a"),
            filters=[{"type": "health", "params": {"unhealthy_after": 0}}],
            scorers=[],
        )
    )
    for _ in range(5):
        p.load.scraped("a", None)
    assert p.route(RoutingRequest(model=M, token_ids=[1])).endpoint.id == "a"


def test_label_selector_filter(make: Callable[..., Pipeline]) -> None:
    p = make(
        quiet_config(
            endpoints=[
                {"id": "a", "labels": {"zone": "x", "pool": "gpu"}},
                {"id": "b", "labels": {"zone": "y", "pool": "gpu"}},
                {"id": "c", "labels": {"zone": "x"}},
            ],
            filters=[
                {"type": "label-selector", "params": {"match_labels": {"zone": "x", "pool": "gpu"}}}
            ],
            scorers=[],
        )
    )
    decision = p.route(RoutingRequest(model=M, token_ids=[1]))
    assert decision.endpoint.id == "a"
    assert decision.filtered_out == {"label-selector": ["b", "c"]}


def test_filters_apply_in_order_and_record_what_each_removed(
    make: Callable[..., Pipeline],
) -> None:
    p = make(
        quiet_config(
            endpoints=[
                {"id": "a", "models": [M], "labels": {"zone": "x"}},
                {"id": "b", "models": ["other"], "labels": {"zone": "x"}},
                {"id": "c", "models": [M], "labels": {"zone": "y"}},
            ],
            filters=[
                {"type": "model-match"},
                {"type": "label-selector", "params": {"match_labels": {"zone": "x"}}},
            ],
            scorers=[],
        )
    )
    decision = p.route(RoutingRequest(model=M, token_ids=[1]))
    assert decision.endpoint.id == "a"
    assert decision.filtered_out == {"model-match": ["b"], "label-selector": ["c"]}


# ---------------------------------------------------------------------------- prefix scorers


def test_kv_prefix_scores_cached_prefix_from_index_events(make: Callable[..., Pipeline]) -> None:
    p = make(quiet_config(endpoints=endpoints("a", "b", "c"), scorers=[{"type": "kv-prefix"}]))
    chain = Chain(4)
    store(p, "a", chain, 4)
    store(p, "b", chain, 2)
    decision = p.route(chain.request())
    assert decision.endpoint.id == "a"
    assert scores_of(decision, "kv-prefix") == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert decision.predicted_cached_tokens == 64
    assert decision.prompt_tokens == 64
    assert [s.endpoint.id for s in decision.ranked] == ["a", "b", "c"]


def test_kv_prefix_weights_tiers(make: Callable[..., Pipeline]) -> None:
    p = make(
        quiet_config(
            index={"tier_weights": {"gpu": 1.0, "cpu": 0.5}},
            endpoints=endpoints("a", "b"),
            scorers=[{"type": "kv-prefix"}],
        )
    )
    chain = Chain(4)
    store(p, "b", chain, 3)
    store(p, "a", chain, 4, medium="CPU")
    decision = p.route(chain.request())
    assert scores_of(decision, "kv-prefix") == {"a": 0.5, "b": 0.75}
    assert decision.endpoint.id == "b"


def test_kv_prefix_length_term(make: Callable[..., Pipeline]) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b"),
            scorers=[
                {"type": "kv-prefix", "params": {"length_weight": 0.5, "length_scale_tokens": 64}}
            ],
        )
    )
    chain = Chain(4)
    store(p, "a", chain, 2)  # 32 of 64 tokens: ratio 0.5, length term (32/64)^2 = 0.25
    store(p, "b", chain, 4)  # everything: 1.0
    scores = scores_of(p.route(chain.request()), "kv-prefix")
    assert scores["a"] == pytest.approx(0.5 * 0.25 + 0.5 * 0.5)
    assert scores["b"] == pytest.approx(1.0)


def test_kv_prefix_uses_the_lora_adapter_namespace(make: Callable[..., Pipeline]) -> None:
    p = make(
        quiet_config(
            endpoints=[
                {"id": "a", "models": ["base"], "adapters": ["sql-lora"]},
                {"id": "b", "models": ["base"], "adapters": ["sql-lora"]},
            ],
            scorers=[{"type": "kv-prefix"}],
        )
    )
    chain = Chain(3)
    store(p, "a", chain, 3, lora_name="sql-lora")  # the adapter's blocks
    store(p, "b", chain, 3)  # the same tokens under the base model
    adapter_request = chain.request(model="sql-lora")
    decision = p.route(adapter_request)
    assert adapter_request.lora_name == "sql-lora"
    assert scores_of(decision, "kv-prefix") == {"a": 1.0, "b": 0.0}
    assert decision.endpoint.id == "a"
    base_request = chain.request(model="base")
    decision = p.route(base_request)
    assert base_request.lora_name is None
    assert scores_of(decision, "kv-prefix") == {"a": 0.0, "b": 1.0}


def test_adapters_from_set_endpoints_are_resolved(make: Callable[..., Pipeline]) -> None:
    p = make(quiet_config(scorers=[{"type": "kv-prefix"}]))
    p.set_endpoints([Endpoint("a", models=frozenset({"base"}), adapters=frozenset({"x-lora"}))])
    request = Chain(1).request(model="x-lora")
    assert p.route(request).endpoint.id == "a"
    assert request.lora_name == "x-lora"


def test_set_endpoints_accepts_any_iterable(make: Callable[..., Pipeline]) -> None:
    # set_endpoints(endpoints: Iterable[Endpoint]) is documented to take any iterable;
    # a generator is consumed by the first pass, so the adapters must be read from it once.
    p = make(quiet_config(scorers=[]))
    fleet = [Endpoint("a", models=frozenset({"base"}), adapters=frozenset({"y-lora"}))]
    p.set_endpoints(e for e in fleet)
    request = Chain(1).request(model="y-lora")
    assert p.route(request).endpoint.id == "a"
    assert request.lora_name == "y-lora"


def test_speculative_entries_keep_a_new_prefix_together(make: Callable[..., Pipeline]) -> None:
    for seed in range(5):
        p = make(
            quiet_config(
                index={"speculative_ttl_s": 60.0},
                endpoints=endpoints("a", "b", "c"),
                scorers=[{"type": "kv-prefix"}],
                picker={"type": "max-score", "params": {"seed": seed}},
            )
        )
        chain = Chain(4, seed=seed)
        request = chain.request()
        first = p.route(request)
        assert set(totals_of(first).values()) == {0.0}  # nobody holds it yet: a tie
        p.routed(request, first.endpoint, first)  # the router sent it there
        second = p.route(chain.request())
        assert second.endpoint == first.endpoint
        assert scores_of(second, "kv-prefix")[first.endpoint.id] == 1.0
        keys = p.index.keys(chain.tokens, M)
        assert p.index.match(keys)[first.endpoint.id].blocks_by_tier == {"speculative": 4}


def test_approx_prefix_learns_from_routed(make: Callable[..., Pipeline]) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b"),
            scorers=[{"type": "approx-prefix"}],
            picker={"type": "max-score", "params": {"seed": 3}},
        )
    )
    chain = Chain(4)
    request = chain.request()
    first = p.route(request)
    assert set(totals_of(first).values()) == {0.0}
    p.routed(request, first.endpoint, first)
    chosen = first.endpoint.id
    other = "b" if chosen == "a" else "a"
    again = p.route(chain.request())
    assert again.endpoint.id == chosen
    assert scores_of(again, "approx-prefix") == {chosen: 1.0, other: 0.0}
    longer = Chain(8, seed=99)
    longer.tokens[: 2 * BLOCK] = chain.tokens[: 2 * BLOCK]  # shares the first two blocks
    assert scores_of(p.route(longer.request()), "approx-prefix")[chosen] == 2 / 8
    # An endpoint that leaves is forgotten.
    p.set_endpoints([e for e in p.endpoints if e.id != chosen])
    p.set_endpoints([Endpoint(i, models=frozenset({M})) for i in ("a", "b")])
    assert scores_of(p.route(chain.request()), "approx-prefix") == {"a": 0.0, "b": 0.0}


def test_approx_prefix_is_bounded_per_endpoint(make: Callable[..., Pipeline]) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a"),
            scorers=[{"type": "approx-prefix", "params": {"capacity_per_endpoint": 4}}],
        )
    )
    old, new = Chain(4, seed=1), Chain(4, seed=2)
    a = p.endpoints[0]
    old_request, new_request = old.request(), new.request()
    p.route(old_request)
    p.routed(old_request, a)
    assert scores_of(p.route(old.request()), "approx-prefix") == {"a": 1.0}
    p.route(new_request)
    p.routed(new_request, a)  # four new blocks push the old four out
    assert scores_of(p.route(old.request()), "approx-prefix") == {"a": 0.0}
    assert scores_of(p.route(new.request()), "approx-prefix") == {"a": 1.0}


# ---------------------------------------------------------------------------- load scorers


def test_prefill_cost_prefers_cache_until_its_queue_outweighs_recompute(
    make: Callable[..., Pipeline],
) -> None:
    # cost = uncached prompt + pending prefill + 16 x requests in flight (the defaults)
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b", "c"),
            scorers=[{"type": "prefill-cost"}],
            index={"speculative_ttl_s": 0.0},  # keep other routed requests out of the index
        )
    )
    chain = Chain(8)  # 128 prompt tokens
    store(p, "a", chain, 8)  # a: everything cached, nothing to prefill
    store(p, "c", chain, 4)  # c: half cached, 64 to prefill; b: 128 to prefill
    a, _, c = p.endpoints
    cost = p.scorers[0][2]

    def costs() -> dict[str, float]:
        probe = chain.request()
        p.prepare(probe)
        return dict(cost.costs(probe, p.endpoints))

    def send(endpoint: Endpoint, tokens: int, first_token: bool = True) -> RoutingRequest:
        other = RoutingRequest(model=M, token_ids=list(range(tokens)))  # nothing cached
        p.routed(other, endpoint)
        if first_token:
            p.first_token(other, endpoint)
        return other

    # Idle fleet: the cache wins.
    assert costs() == {"a": 0.0, "b": 128.0, "c": 64.0}
    decision = p.route(chain.request())
    assert decision.endpoint.id == "a"
    assert scores_of(decision, "prefill-cost") == {"a": 1.0, "b": 0.0, "c": 0.5}

    # A 100-token prompt waiting for prefill on a: 100 + 16 > 64 to recompute half on c.
    busy = send(a, 100, first_token=False)
    assert p.load.get("a").pending_prefill_tokens == 100
    assert costs() == {"a": 116.0, "b": 128.0, "c": 64.0}
    assert p.route(chain.request()).endpoint.id == "c"

    # Its first token arrives: only its decode share (16) is left, and a wins again.
    p.first_token(busy, a)
    assert costs()["a"] == 16.0
    assert p.route(chain.request()).endpoint.id == "a"

    # Nine requests decoding on a (144) and five on c (64 + 80): recomputing everything
    # on idle b (128) is now cheaper than either cached copy.
    others = [busy] + [send(a, 10) for _ in range(8)]
    for _ in range(5):
        send(c, 10)
    assert costs() == {"a": 144.0, "b": 128.0, "c": 144.0}
    decision = p.route(chain.request())
    assert decision.endpoint.id == "b"
    assert scores_of(decision, "prefill-cost") == {"a": 0.0, "b": 1.0, "c": 0.0}

    # They finish: the cache wins again.
    for other in others:
        p.finished(other, a)
    assert p.load.get("a") == type(p.load.get("a"))()
    assert p.route(chain.request()).endpoint.id == "a"


def test_prefill_cost_counts_the_uncached_part_of_routed_requests(
    make: Callable[..., Pipeline],
) -> None:
    p = make(quiet_config(endpoints=endpoints("a", "b"), scorers=[{"type": "prefill-cost"}]))
    chain = Chain(8)
    store(p, "a", chain, 6)  # 96 of 128 cached on a
    request = chain.request()
    decision = p.route(request)
    assert decision.endpoint.id == "a"
    p.routed(request, decision.endpoint, decision)
    assert p.load.get("a").pending_prefill_tokens == 32  # only the uncached tail
    p.finished(request, decision.endpoint)  # no first token: finishing ends it too
    assert p.load.get("a").pending_prefill_tokens == 0


def test_prefill_cost_counts_scraped_waiting_requests(make: Callable[..., Pipeline]) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b"),
            scorers=[{"type": "prefill-cost", "params": {"waiting_tokens": 100}}],
        )
    )
    chain = Chain(4)  # 64 tokens
    store(p, "a", chain, 4)
    assert p.route(chain.request()).endpoint.id == "a"
    p.load.scraped("a", {"waiting": 1.0})  # 100 tokens queued: 100 > 64 to recompute on b
    assert p.route(chain.request()).endpoint.id == "b"


def test_prefill_cost_with_only_load(make: Callable[..., Pipeline]) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b"),
            scorers=[{"type": "prefill-cost", "params": {"prefill_scale": 0.0}}],
        )
    )
    chain = Chain(4)
    store(p, "a", chain, 4)
    p.load.started("a", 10)  # one request in flight: 16 decode tokens
    assert scores_of(p.route(chain.request()), "prefill-cost") == {"a": 0.0, "b": 1.0}


def test_queue_scorer_uses_scraped_waiting_then_in_flight(make: Callable[..., Pipeline]) -> None:
    p = make(quiet_config(endpoints=endpoints("a", "b", "c"), scorers=[{"type": "queue"}]))
    request = RoutingRequest(model=M, token_ids=[1])
    assert scores_of(p.route(request), "queue") == {"a": 1.0, "b": 1.0, "c": 1.0}
    p.load.scraped("a", {"waiting": 4.0})
    p.load.scraped("b", {"waiting": 2.0})
    p.load.started("c", 5)  # not scraped: its in-flight count (1) stands in
    assert scores_of(p.route(request), "queue") == {"a": 0.0, "b": 2 / 3, "c": 1.0}


def test_kv_usage_scorer(make: Callable[..., Pipeline]) -> None:
    p = make(quiet_config(endpoints=endpoints("a", "b", "c"), scorers=[{"type": "kv-usage"}]))
    p.load.scraped("a", {"kv_usage": 0.25})
    p.load.scraped("b", {"kv_usage": 1.7})  # clamped
    decision = p.route(RoutingRequest(model=M, token_ids=[1]))
    assert scores_of(decision, "kv-usage") == {"a": 0.75, "b": 0.0, "c": 1.0}
    assert decision.endpoint.id == "c"


@pytest.mark.parametrize(("by", "best"), [("requests", "a"), ("tokens", "b")])
def test_in_flight_scorer(make: Callable[..., Pipeline], by: str, best: str) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b"), scorers=[{"type": "in-flight", "params": {"by": by}}]
        )
    )
    a, b = p.endpoints
    big = RoutingRequest(model=M, token_ids=list(range(100)))
    p.routed(big, a)  # a: 1 request, 100 tokens
    for _ in range(2):
        p.routed(RoutingRequest(model=M, token_ids=list(range(10))), b)  # b: 2, 20 tokens
    decision = p.route(RoutingRequest(model=M, token_ids=[1]))
    assert decision.endpoint.id == best
    assert scores_of(decision, "in-flight")[best] == 1.0
    p.finished(big, a)
    assert p.load.get("a").in_flight == 0
    assert p.route(RoutingRequest(model=M, token_ids=[1])).endpoint.id == "a"


# ---------------------------------------------------------------------------- pickers


def test_max_score_breaks_ties_at_random_among_equals(make: Callable[..., Pipeline]) -> None:
    def sequence(seed: int) -> list[str]:
        p = make(
            quiet_config(
                endpoints=endpoints("a", "b", "c"),
                scorers=[{"type": "queue"}],
                picker={"type": "max-score", "params": {"seed": seed}},
            )
        )
        p.load.scraped("a", {"waiting": 0.0})
        p.load.scraped("b", {"waiting": 0.0})
        p.load.scraped("c", {"waiting": 3.0})
        return [p.route(RoutingRequest(model=M, token_ids=[1])).endpoint.id for _ in range(200)]

    first = sequence(7)
    counts = Counter(first)
    assert set(counts) == {"a", "b"}  # both tied endpoints get traffic, c never
    assert min(counts.values()) > 50
    assert sequence(7) == first  # same seed, same choices


def test_max_score_without_a_tie_is_deterministic(make: Callable[..., Pipeline]) -> None:
    p = make(quiet_config(endpoints=endpoints("a", "b"), scorers=[{"type": "queue"}]))
    p.load.scraped("a", {"waiting": 1.0})
    p.load.scraped("b", {"waiting": 0.0})
    assert {p.route(RoutingRequest(model=M, token_ids=[1])).endpoint.id for _ in range(50)} == {"b"}


@pytest.mark.parametrize(("temperature", "spread"), [(0.01, False), (100.0, True)])
def test_weighted_random_temperature(
    make: Callable[..., Pipeline], temperature: float, spread: bool
) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b", "c"),
            scorers=[{"type": "queue"}],
            picker={
                "type": "weighted-random",
                "params": {"temperature": temperature, "seed": 11},
            },
        )
    )
    p.load.scraped("a", {"waiting": 0.0})  # queue score a 1.0, b and c 0.0
    p.load.scraped("b", {"waiting": 10.0})
    p.load.scraped("c", {"waiting": 10.0})
    counts = Counter(
        p.route(RoutingRequest(model=M, token_ids=[1])).endpoint.id for _ in range(600)
    )
    if spread:
        assert all(counts[e] > 120 for e in "abc"), counts  # ~ uniform: 200 each
    else:
        assert counts["a"] >= 597, counts


# ---------------------------------------------------------------------------- the blend


def test_totals_are_the_weighted_sum(make: Callable[..., Pipeline], kit: None) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b"),
            scorers=[
                {"type": "fixed", "weight": 2.0, "params": {"scores": {"a": "0.5", "b": "1"}}},
                {"type": "fixed", "weight": 3.0, "params": {"scores": {"a": "1", "b": "0"}}},
                {"type": "fixed", "weight": 0.0, "params": {"scores": {"b": "1"}}},
            ],
        )
    )
    decision = p.route(RoutingRequest(model=M, token_ids=[1]))
    assert decision.weights == {"fixed": 2.0, "fixed#2": 3.0, "fixed#3": 0.0}
    assert totals_of(decision) == {"a": 4.0, "b": 2.0}
    assert decision.endpoint.id == "a"
    for s in decision.ranked:
        assert s.total == pytest.approx(sum(decision.weights[n] * v for n, v in s.scores.items()))


def test_a_raising_scorer_contributes_zero_and_is_counted(
    make: Callable[..., Pipeline], kit: None, caplog: pytest.LogCaptureFixture
) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b"),
            scorers=[
                {"type": "boom", "weight": 10.0},
                {"type": "fixed", "params": {"scores": {"b": "1"}}},
            ],
        )
    )
    with caplog.at_level(logging.WARNING, logger="kvaware_scorer.pipeline"):
        for _ in range(3):
            decision = p.route(RoutingRequest(model=M, token_ids=[1]))
            assert decision.endpoint.id == "b"
            assert decision.failed_scorers == ["boom"]
            assert scores_of(decision, "boom") == {"a": 0.0, "b": 0.0}
    assert p.counters["scorer_errors:boom"] == 3
    assert any(
        "boom" in r.getMessage() and "scorer exploded" in r.getMessage() for r in caplog.records
    )


def test_a_raising_picker_falls_back_to_the_best_total(
    make: Callable[..., Pipeline], kit: None
) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b", "c"),
            scorers=[{"type": "fixed", "params": {"scores": {"a": "0.2", "b": "0.9", "c": "0.5"}}}],
            picker={"type": "boom-picker"},
        )
    )
    decision = p.route(RoutingRequest(model=M, token_ids=[1]))
    assert decision.endpoint.id == "b"
    assert p.counters["picker_errors"] == 1


def test_nan_and_out_of_range_scores_are_clamped(make: Callable[..., Pipeline], kit: None) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b", "c", "d", "e"),
            scorers=[{"type": "wild"}],
            picker={"type": "max-score", "params": {"seed": 1}},
        )
    )
    decision = p.route(RoutingRequest(model=M, token_ids=[1]))
    # wild: a NaN, b 7, c -3, d inf, e missing, plus an id that is not a candidate.
    assert scores_of(decision, "wild") == {"a": 0.0, "b": 1.0, "c": 0.0, "d": 1.0, "e": 0.0}
    assert decision.endpoint.id in {"b", "d"}
    assert "ghost" not in totals_of(decision)
    json.dumps(decision.explain(), allow_nan=False)  # nothing non-finite leaks out


def test_no_endpoint_left_raises_a_helpful_error(make: Callable[..., Pipeline]) -> None:
    p = make(
        quiet_config(
            endpoints=[
                {"id": "a", "models": ["other"]},
                {"id": "b", "models": [M], "labels": {"zone": "y"}},
            ],
            filters=[
                {"type": "model-match"},
                {"type": "label-selector", "params": {"match_labels": {"zone": "x"}}},
            ],
        )
    )
    with pytest.raises(NoEndpointError) as err:
        p.route(RoutingRequest(model=M, token_ids=[1]))
    assert str(err.value) == (
        "no endpoint can serve model 'm': model-match removed a; label-selector removed b"
    )
    assert isinstance(err.value, KVAwareError)
    assert p.counters["no_endpoint"] == 1
    with pytest.raises(NoEndpointError, match="no endpoints are known"):
        p.route(RoutingRequest(model=M, token_ids=[1]), endpoints=[])


def test_fallback_unfiltered_routes_among_all(make: Callable[..., Pipeline], kit: None) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b"),
            filters=[{"type": "drop-all"}],
            scorers=[{"type": "fixed", "params": {"scores": {"b": "1"}}}],
            fallback="unfiltered",
        )
    )
    decision = p.route(RoutingRequest(model=M, token_ids=[1]))
    assert decision.endpoint.id == "b"
    assert decision.filtered_out == {"drop-all": ["a", "b"]}
    assert p.counters["fallback_unfiltered"] == 1
    with pytest.raises(NoEndpointError, match="no endpoints are known"):
        p.route(RoutingRequest(model=M, token_ids=[1]), endpoints=[])


def test_route_among_given_endpoints(make: Callable[..., Pipeline]) -> None:
    p = make(quiet_config(endpoints=endpoints("a", "b"), scorers=[]))
    only = [Endpoint("z", models=frozenset({M}))]
    assert p.route(RoutingRequest(model=M, token_ids=[1]), endpoints=only).endpoint.id == "z"


def test_decision_explain(make: Callable[..., Pipeline]) -> None:
    p = make(
        quiet_config(
            endpoints=[*endpoints("a", "b"), {"id": "x", "models": ["other"]}],
            scorers=[{"type": "kv-prefix", "weight": 2.0}, {"type": "queue", "weight": 0.5}],
        )
    )
    chain = Chain(4)
    store(p, "a", chain, 3)
    p.load.scraped("a", {"waiting": 2.0})
    p.load.scraped("b", {"waiting": 0.0})
    explained = p.route(chain.request()).explain()
    assert json.loads(json.dumps(explained)) == explained
    assert explained["endpoint"] == "a"  # 2 x 0.75 + 0 beats 0 + 0.5 x 1
    assert explained["prompt_tokens"] == 64
    assert explained["predicted_cached_tokens"] == 48
    assert explained["weights"] == {"kv-prefix": 2.0, "queue": 0.5}
    assert explained["ranked"] == [
        {"endpoint": "a", "total": 1.5, "scores": {"kv-prefix": 0.75, "queue": 0.0}},
        {"endpoint": "b", "total": 0.5, "scores": {"kv-prefix": 0.0, "queue": 1.0}},
    ]
    assert explained["filtered_out"] == {"model-match": ["x"]}
    assert explained["failed_scorers"] == []
    assert set(explained["timings_ms"]) == {"prepare", "tokenize", "score", "total"}
    assert all(v >= 0 for v in explained["timings_ms"].values())


# ---------------------------------------------------------------------------- requests


def test_requests_without_a_tokenizer_still_route(make: Callable[..., Pipeline]) -> None:
    p = make(
        quiet_config(
            endpoints=endpoints("a", "b"), scorers=[{"type": "kv-prefix"}, {"type": "queue"}]
        )
    )
    p.load.scraped("a", {"waiting": 3.0})
    p.load.scraped("b", {"waiting": 0.0})
    text = RoutingRequest(model=M, prompt="hello there")
    decision = p.route(text)
    assert decision.endpoint.id == "b"
    assert text.token_ids is None and text.block_keys is None
    assert decision.prompt_tokens == 0
    assert scores_of(decision, "kv-prefix") == {"a": 0.0, "b": 0.0}
    chat = RoutingRequest(model=M, messages=[{"role": "user", "content": "hi"}])
    p.route(chat)
    assert p.counters["untokenized"] == 2


def test_prompt_token_lists_need_no_tokenizer(make: Callable[..., Pipeline]) -> None:
    p = make(quiet_config(endpoints=endpoints("a"), scorers=[{"type": "kv-prefix"}]))
    chain = Chain(2)
    store(p, "a", chain, 2)
    request = RoutingRequest(model=M, prompt=list(chain.tokens))
    decision = p.route(request)
    assert request.token_ids == chain.tokens
    assert scores_of(decision, "kv-prefix") == {"a": 1.0}
    assert "untokenized" not in p.counters


def test_prepare_computes_keys_once(make: Callable[..., Pipeline]) -> None:
    p = make(quiet_config(endpoints=endpoints("a"), scorers=[{"type": "kv-prefix"}]))
    request = Chain(2).request()
    p.prepare(request)
    keys = request.block_keys
    assert keys is not None and len(keys) == 2
    p.route(request)
    assert request.block_keys is keys


# ---------------------------------------------------------------------------- lifecycle


def test_start_and_stop_are_idempotent_without_leaking_threads(
    make: Callable[..., Pipeline],
) -> None:
    before = live_threads()
    p = make(
        {
            "listener": {"bind": ["tcp://127.0.0.1:0"]},
            "load": {"scrape_interval_s": 0.05},
            "endpoints": endpoints("a"),
        },
        start=False,
    )
    assert live_threads() == before  # construction starts nothing
    assert p.listener is not None and not p.listener.running
    p.start()
    p.start()
    started = live_threads() - before
    assert sorted(t.name for t in started) == ["kvaware-kv-events", "kvaware-scraper"]
    assert p.listener.running and len(p.listener.bound_endpoints) == 1
    p.stop()
    p.stop()
    wait_for(lambda: not (live_threads() - before), "threads to end")
    assert not p.listener.running
    with p:  # restartable, and a context manager
        assert p.listener.running
    assert not p.listener.running


def test_set_endpoints_drops_removed_endpoints_from_the_index(
    make: Callable[..., Pipeline], kit: None
) -> None:
    p = make(quiet_config(endpoints=endpoints("a", "b"), scorers=[{"type": "kv-prefix"}]))
    chain = Chain(2)
    store(p, "a", chain, 2)
    store(p, "b", chain, 2)
    p.load.started("b", 7)
    assert p.index.pods() == ["a", "b"]
    calls(p).clear()
    p.set_endpoints([p.endpoints[0], Endpoint("c", models=frozenset({M}))])
    assert calls(p) == [("endpoints_changed", ["c"], ["b"])]
    assert p.index.pods() == ["a"]
    assert p.load.get("b").in_flight == 0
    assert sorted(e.id for e in p.endpoints) == ["a", "c"]
    assert scores_of(p.route(chain.request()), "kv-prefix") == {"a": 1.0, "c": 0.0}


def test_removed_endpoints_leave_the_index_through_the_running_listener(
    make: Callable[..., Pipeline],
) -> None:
    p = make(
        {
            "listener": {"bind": ["tcp://127.0.0.1:0"]},
            "load": {"scrape": False},
            "endpoints": endpoints("a", "b"),
            "scorers": [{"type": "kv-prefix"}],
        }
    )
    chain = Chain(2)
    store(p, "a", chain, 2)
    store(p, "b", chain, 2)
    p.set_endpoints([p.endpoints[0]])
    wait_for(lambda: p.index.pods() == ["a"], "b to leave the index")


def test_kv_prefix_with_a_real_listener_in_bind_mode(make: Callable[..., Pipeline]) -> None:
    p = make(
        {
            "listener": {"bind": ["tcp://127.0.0.1:0"]},
            "load": {"scrape": False},
            "endpoints": endpoints("10.0.0.5:8000", "10.0.0.6:8000"),
            "scorers": [{"type": "kv-prefix"}],
        }
    )
    assert p.listener is not None
    pub = EventPublisher(p.listener.bound_endpoints[0], topic=f"kv@10.0.0.6:8000@{M}")
    pub.start()
    try:
        assert pub.wait_subscribed()
        chain = Chain(5)
        pub.publish(chain.batch(0, 3))
        pub.publish(chain.batch(3, 5))
        wait_for(lambda: p.listener is not None and p.listener.stats()["batches"] == 2, "events")
        decision = p.route(chain.request())
        assert decision.endpoint.id == "10.0.0.6:8000"
        assert scores_of(decision, "kv-prefix") == {"10.0.0.5:8000": 0.0, "10.0.0.6:8000": 1.0}
        assert decision.predicted_cached_tokens == 80
    finally:
        pub.stop()


@pytest.mark.parametrize(
    ("unknown_pods", "static", "indexed"),
    [
        ("auto", True, False),
        ("auto", False, True),
        ("accept", True, True),
        ("reject", False, False),
    ],
)
def test_bind_mode_events_from_pods_that_are_not_endpoints(
    make: Callable[..., Pipeline], unknown_pods: str, static: bool, indexed: bool
) -> None:
    p = make(
        {
            "listener": {"bind": ["tcp://127.0.0.1:0"], "unknown_pods": unknown_pods},
            "load": {"scrape": False},
            "endpoints": endpoints("known") if static else [],
            "scorers": [{"type": "kv-prefix"}],
        }
    )
    listener = p.listener
    assert listener is not None
    pub = EventPublisher(listener.bound_endpoints[0], topic=f"kv@stranger@{M}")
    pub.start()
    try:
        assert pub.wait_subscribed()
        pub.publish(Chain(2).batch(0, 2))
        if indexed:
            wait_for(lambda: p.index.pods() == ["stranger"], "the stranger's events")
        else:
            wait_for(lambda: listener.stats()["decode_errors"] == 1, "the refusal")
            assert listener.stats()["errors_by_pod"] == {"stranger": {"unknown_pod": 1}}
            assert p.index.pods() == []
    finally:
        pub.stop()


def test_kv_prefix_with_a_real_listener_dialing_configured_pods(
    make: Callable[..., Pipeline],
) -> None:
    pubs = {
        pod: EventPublisher("tcp://127.0.0.1:0", bind=True, replay_endpoint="tcp://127.0.0.1:0")
        for pod in ("pod-a", "pod-b")
    }
    for pub in pubs.values():
        pub.start()
    try:
        p = make(
            {
                "load": {"scrape": False},
                "endpoints": [
                    {
                        "id": pod,
                        "models": [M],
                        "kv_events": {
                            "endpoint": pub.endpoint,
                            "replay_endpoint": pub.replay_endpoint,
                        },
                    }
                    for pod, pub in pubs.items()
                ],
                "scorers": [{"type": "kv-prefix"}],
            }
        )
        assert all(pub.wait_subscribed() for pub in pubs.values())
        chain = Chain(4)
        pubs["pod-a"].publish(chain.batch(0, 1))
        pubs["pod-b"].publish(chain.batch(0, 4))
        assert p.listener is not None
        wait_for(lambda: p.listener is not None and p.listener.stats()["batches"] == 2, "events")
        decision = p.route(chain.request())
        assert scores_of(decision, "kv-prefix") == {"pod-a": 0.25, "pod-b": 1.0}
        assert decision.endpoint.id == "pod-b"
        # pod-b leaves: the listener stops dialing it and its blocks leave the index.
        p.set_endpoints([e for e in p.endpoints if e.id == "pod-a"])
        wait_for(lambda: p.index.pods() == ["pod-a"], "pod-b to leave")
        assert p.listener.pods() == ["pod-a"]
    finally:
        for pub in pubs.values():
            pub.stop()


def test_a_failing_startup_hook_leaves_nothing_running(
    make: Callable[..., Pipeline], kit: None
) -> None:
    # The kv-engine's start-up (registered after the kit) starts the listener before the
    # kit's start-up fails: start() must undo it rather than leave a thread nobody stops.
    before = live_threads()
    p = make({"listener": {"bind": ["tcp://127.0.0.1:0"]}, "load": {"scrape": False}}, start=False)
    p.extensions["testkit.fail_startup"] = "no licence for the GPU cluster"
    try:
        with pytest.raises(KVAwareError, match="no licence"):
            p.start()
        assert p.listener is not None and not p.listener.running
        assert not (live_threads() - before)
        assert [c[0] for c in calls(p)] == ["startup", "shutdown"]
    finally:
        if p.listener is not None:
            p.listener.stop()  # so no thread outlives the test should this regress


@pytest.mark.parametrize("medium", ["GPU", "CPU"])
def test_a_block_offloaded_by_one_pod_can_be_stored_by_another(
    make: Callable[..., Pipeline], medium: str
) -> None:
    p = make(quiet_config(endpoints=endpoints("a", "b"), scorers=[{"type": "kv-prefix"}]))
    chain = Chain(4)
    store(p, "a", chain, 4, medium="CPU")
    store(p, "b", chain, 4, medium=medium)
    # Regression: a key held only on a non-GPU tier used to crash the next store of it.
    scores = scores_of(p.route(chain.request()), "kv-prefix")
    assert scores == {"a": pytest.approx(0.8), "b": pytest.approx(1.0 if medium == "GPU" else 0.8)}


def test_the_listener_survives_a_cpu_only_block_stored_again(
    make: Callable[..., Pipeline],
) -> None:
    p = make(
        {
            "listener": {"bind": ["tcp://127.0.0.1:0"]},
            "load": {"scrape": False},
            "endpoints": endpoints("a", "b"),
            "scorers": [{"type": "kv-prefix"}],
        }
    )
    listener = p.listener
    assert listener is not None
    pubs = [EventPublisher(listener.bound_endpoints[0], topic=f"kv@{pod}@{M}") for pod in "ab"]
    try:
        for pub in pubs:
            pub.start()
            assert pub.wait_subscribed()
        chain = Chain(2)
        pubs[0].publish(chain.batch(0, 2, medium="CPU"))
        wait_for(lambda: listener.stats()["batches"] == 1, "the CPU store")
        pubs[1].publish(chain.batch(0, 2))
        wait_for(lambda: listener.stats()["batches"] == 2 or not listener.running, "the GPU store")
        assert listener.running
        assert listener.stats().get("thread_failures", 0) == 0
        scores = scores_of(p.route(chain.request()), "kv-prefix")
        assert scores == {"a": pytest.approx(0.8), "b": 1.0}
    finally:
        for pub in pubs:
            pub.stop()
