"""Built-in pickers.

* ``max-score``: the highest total; ties (within 1e-9) broken by a seeded RNG, so equal
  endpoints share load instead of the first one taking everything.
* ``weighted-random``: samples an endpoint with probability ∝ exp(total / temperature);
  a low temperature approaches max-score, a high one uniform.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvaware_scorer.hookspecs import hookimpl

if TYPE_CHECKING:
    from kvaware_scorer.pipeline import Pipeline
    from kvaware_scorer.registry import ComponentRegistry, Params
    from kvaware_scorer.types import Endpoint, RoutingRequest, ScoredEndpoint

_TIE = 1e-9


class MaxScorePicker:
    def __init__(self, seed: int | None) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def pick(self, request: RoutingRequest, ranked: Sequence[ScoredEndpoint]) -> Endpoint:
        best = ranked[0].total
        tied = [s for s in ranked if best - s.total <= _TIE]
        if len(tied) == 1:
            return tied[0].endpoint
        with self._lock:
            return self._rng.choice(tied).endpoint


class WeightedRandomPicker:
    def __init__(self, temperature: float, seed: int | None) -> None:
        self._temperature = temperature
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def pick(self, request: RoutingRequest, ranked: Sequence[ScoredEndpoint]) -> Endpoint:
        top = ranked[0].total
        weights = [math.exp((s.total - top) / self._temperature) for s in ranked]
        with self._lock:
            return self._rng.choices(ranked, weights=weights)[0].endpoint


def _max_score(pipeline: Pipeline, params: Params) -> MaxScorePicker:
    return MaxScorePicker(params.optional_integer("seed"))


def _weighted_random(pipeline: Pipeline, params: Params) -> WeightedRandomPicker:
    return WeightedRandomPicker(
        params.number("temperature", 0.1, minimum=1e-6), params.optional_integer("seed")
    )


@hookimpl
def kvaware_register(registry: ComponentRegistry) -> None:
    registry.add_picker("max-score", _max_score, doc="highest total; seeded random tie-break")
    registry.add_picker(
        "weighted-random", _weighted_random, doc="softmax over totals with a temperature"
    )
