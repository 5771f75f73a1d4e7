"""Routing policies compared by the simulator, all fed the same arrivals.

* ``random``, ``round-robin``, ``least-load`` (fewest requests in flight): cache-blind.
* ``approximate``: the pipeline with approx-prefix 1 + kv-usage 1 + queue 1 (llm-d's
  "estimated" configuration in its published comparison).
* ``precise``: the pipeline with kv-prefix alone, fed by the engines' KV events.
* ``precise+load``: kv-prefix 3 + kv-usage 2 + queue 2 (llm-d's published precise config).
* ``prefill-cost``: the pipeline with the prefill-cost scorer alone.
* a user's own pipeline configuration (``kvaware-scorer bench --config``).

Pipeline policies run the real :class:`~kvaware_scorer.pipeline.Pipeline` (listener and
scraper off: the fleet delivers events and scrapes in virtual time).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from typing import Any

from kvaware_scorer.config import PipelineConfig, load_config
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.pipeline import Pipeline
from kvaware_scorer.sim.engine import SimRequest
from kvaware_scorer.sim.fleet import Policy, VirtualFleet
from kvaware_scorer.types import Endpoint, RoutingRequest

BUILTIN_POLICIES = (
    "random",
    "round-robin",
    "least-load",
    "approximate",
    "precise",
    "precise+load",
    "prefill-cost",
)
_SCORERS: dict[str, list[dict[str, Any]]] = {
    "approximate": [
        {"type": "approx-prefix", "weight": 1},
        {"type": "kv-usage", "weight": 1},
        {"type": "queue", "weight": 1},
    ],
    "precise": [{"type": "kv-prefix", "weight": 1}],
    "precise+load": [
        {"type": "kv-prefix", "weight": 3},
        {"type": "kv-usage", "weight": 2},
        {"type": "queue", "weight": 2},
    ],
    "prefill-cost": [{"type": "prefill-cost", "weight": 1}],
}


class _Blind(Policy):
    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self._rng = random.Random(seed)
        self._next = 0
        self._in_flight: dict[str, int] = {}
        self._names: list[str] = []

    def bind(self, fleet: VirtualFleet) -> None:
        self._names = list(fleet.engines)
        self._in_flight = dict.fromkeys(self._names, 0)

    def choose(self, request: SimRequest, now_s: float) -> str:
        if self.name == "random":
            return self._rng.choice(self._names)
        if self.name == "round-robin":
            self._next = (self._next + 1) % len(self._names)
            return self._names[self._next]
        low = min(self._in_flight.values())
        return self._rng.choice([n for n, v in self._in_flight.items() if v == low])

    def routed(self, request: SimRequest, engine: str) -> None:
        self._in_flight[engine] += 1

    def finished(self, request: SimRequest, engine: str) -> None:
        self._in_flight[engine] -= 1


class PipelinePolicy(Policy):
    """Routes with a real Pipeline built from a configuration."""

    def __init__(self, name: str, config: PipelineConfig | Mapping[str, Any], model: str) -> None:
        self.name = name
        self._config = config
        self._model = model
        self.pipeline: Pipeline | None = None
        self._endpoints: dict[str, Endpoint] = {}
        self._requests: dict[str, RoutingRequest] = {}

    def bind(self, fleet: VirtualFleet) -> None:
        pipeline = Pipeline(self._config, clock=fleet.clock)
        if pipeline.listener is not None or pipeline.scraper is not None:
            raise ConfigError(
                f"policy {self.name}: the simulator delivers events and load itself; "
                "set listener.enabled: false and load.scrape: false"
            )
        self._endpoints = {
            name: Endpoint(name, models=frozenset({self._model})) for name in fleet.engines
        }
        pipeline.set_endpoints(self._endpoints.values())
        pipeline.start()
        self.pipeline = pipeline
        self.index = pipeline.index

    def choose(self, request: SimRequest, now_s: float) -> str:
        assert self.pipeline is not None
        routing = RoutingRequest(
            model=self._model, prompt=request.token_ids, request_id=request.request_id
        )
        decision = self.pipeline.route(routing)
        routing.cache["decision"] = decision
        self._requests[request.request_id] = routing
        return decision.endpoint.id

    def routed(self, request: SimRequest, engine: str) -> None:
        assert self.pipeline is not None
        routing = self._requests[request.request_id]
        self.pipeline.routed(routing, self._endpoints[engine], routing.cache.get("decision"))

    def first_token(self, request: SimRequest, engine: str) -> None:
        assert self.pipeline is not None
        self.pipeline.first_token(self._requests[request.request_id], self._endpoints[engine])

    def finished(self, request: SimRequest, engine: str) -> None:
        assert self.pipeline is not None
        routing = self._requests.pop(request.request_id)
        self.pipeline.finished(
            routing,
            self._endpoints[engine],
            prompt_tokens=len(request.token_ids),
            cached_tokens=request.cached_tokens,
        )

    def scraped(self, engine: str, waiting: int, running: int, kv_usage: float) -> None:
        assert self.pipeline is not None
        self.pipeline.load.scraped(
            engine, {"waiting": waiting, "running": running, "kv_usage": kv_usage}
        )


def sim_pipeline_config(scorers: list[dict[str, Any]], *, block_size: int = 16) -> dict[str, Any]:
    return {
        "listener": {"enabled": False},
        "load": {"scrape": False},
        "index": {"block_size": block_size},
        "filters": [],
        "scorers": scorers,
        "picker": {"type": "max-score", "params": {"seed": 0}},
    }


def make_policy(
    name: str, *, seed: int = 0, model: str = "sim-model", block_size: int = 16
) -> Policy:
    """A built-in policy by name."""
    if name in ("random", "round-robin", "least-load"):
        return _Blind(name, seed)
    scorers = _SCORERS.get(name)
    if scorers is None:
        raise ConfigError(f"unknown policy {name!r}; allowed values: {', '.join(BUILTIN_POLICIES)}")
    return PipelinePolicy(name, sim_pipeline_config(scorers, block_size=block_size), model)


def user_policy(name: str, path: str, *, model: str = "sim-model") -> Policy:
    """A user's pipeline YAML as a policy (its listener, scraping and static endpoints are
    replaced by the simulated fleet's)."""
    config = load_config(path)
    config = dataclasses.replace(
        config,
        listener=dataclasses.replace(config.listener, enabled=False),
        load=dataclasses.replace(config.load, scrape=False),
        endpoints=[],
    )
    return PipelinePolicy(name, config, model)
