"""Built-in filters.

* ``model-match``: endpoints that serve the request's model or LoRA adapter (an endpoint
  listing no models serves any);
* ``health``: endpoints marked healthy, and whose last ``unhealthy_after`` scrapes did not
  all fail;
* ``label-selector``: endpoints whose labels include every ``match_labels`` pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvaware_scorer.hookspecs import hookimpl

if TYPE_CHECKING:
    from kvaware_scorer.pipeline import Pipeline
    from kvaware_scorer.registry import ComponentRegistry, Params
    from kvaware_scorer.types import Endpoint, RoutingRequest


class ModelMatchFilter:
    def filter(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        return [e for e in endpoints if e.serves(request.model)]


class HealthFilter:
    def __init__(self, pipeline: Pipeline, unhealthy_after: int) -> None:
        self._load = pipeline.load
        self._after = unhealthy_after

    def filter(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        after = self._after
        return [
            e
            for e in endpoints
            if e.healthy and (after == 0 or self._load.get(e.id).scrape_failures < after)
        ]


class LabelSelectorFilter:
    def __init__(self, match_labels: dict[str, str]) -> None:
        self._items = tuple(match_labels.items())

    def filter(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        return [e for e in endpoints if all(e.labels.get(k) == v for k, v in self._items)]


def _health(pipeline: Pipeline, params: Params) -> HealthFilter:
    return HealthFilter(pipeline, params.integer("unhealthy_after", 3, minimum=0))


def _labels(pipeline: Pipeline, params: Params) -> LabelSelectorFilter:
    return LabelSelectorFilter(params.string_map("match_labels"))


@hookimpl
def kvaware_register(registry: ComponentRegistry) -> None:
    registry.add_filter(
        "model-match",
        lambda pipeline, params: ModelMatchFilter(),
        doc="endpoints serving the request's model or adapter",
    )
    registry.add_filter(
        "health", _health, doc="healthy endpoints; unhealthy_after failed scrapes in a row drop one"
    )
    registry.add_filter("label-selector", _labels, doc="endpoints carrying all match_labels")
