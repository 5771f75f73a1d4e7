"""Built-in load scorers. Each maps lower load to a higher score in [0, 1].

"Min-max" below means ``(max − x) / (max − min)`` over the candidate endpoints, and 1.0
for every endpoint when all are equal (so a scorer with nothing to say does not tip the
balance).

* ``queue``: min-max of waiting requests (scraped ``vllm:num_requests_waiting``; the
  router's in-flight count for endpoints not scraped yet).
* ``kv-usage``: ``1 − vllm:kv_cache_usage_perc`` (1.0 until scraped).
* ``in-flight``: min-max of what this router has outstanding per endpoint, counted in
  requests or in prompt tokens (``by``).
* ``prefill-cost``: one continuous cost per endpoint (Dynamo-style), in prompt tokens of
  prefill work standing between the request and its first token:
  ``prefill_scale × (uncached_prompt_tokens + pending_prefill_tokens) + load_scale ×
  (decode_tokens × in_flight + waiting_tokens × waiting)``. Uncached tokens are the prompt
  minus its tier-weighted cached prefix on that endpoint (from the KV index, speculative
  entries included); pending prefill is what this router sent there that has not produced
  a first token yet; the decode term charges each in-flight request ``decode_tokens``
  (its share of every step's time), and ``waiting_tokens`` charges the pod's scraped
  queue. The score is the min-max of the cost: a cached prefix wins until its pod's queue
  costs more than recomputing elsewhere. This is the recommended default blend on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from kvaware_scorer.hookspecs import hookimpl

if TYPE_CHECKING:
    from kvaware_scorer.load import LoadTracker
    from kvaware_scorer.pipeline import Pipeline
    from kvaware_scorer.registry import ComponentRegistry, Params
    from kvaware_scorer.types import Endpoint, RoutingRequest


def min_max_low_is_good(values: Mapping[str, float]) -> dict[str, float]:
    """Map lower values to higher scores in [0, 1]; all equal -> 1.0."""
    if not values:
        return {}
    low, high = min(values.values()), max(values.values())
    if high <= low:
        return dict.fromkeys(values, 1.0)
    span = high - low
    return {k: (high - v) / span for k, v in values.items()}


class QueueScorer:
    def __init__(self, load: LoadTracker) -> None:
        self._load = load

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[str, float]:
        values = {}
        for e in endpoints:
            load = self._load.get(e.id)
            values[e.id] = load.waiting if load.waiting is not None else float(load.in_flight)
        return min_max_low_is_good(values)


class KVUsageScorer:
    def __init__(self, load: LoadTracker) -> None:
        self._load = load

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[str, float]:
        out = {}
        for e in endpoints:
            usage = self._load.get(e.id).kv_usage
            out[e.id] = 1.0 if usage is None else 1.0 - min(1.0, max(0.0, usage))
        return out


class InFlightScorer:
    def __init__(self, load: LoadTracker, by_tokens: bool) -> None:
        self._load = load
        self._by_tokens = by_tokens

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[str, float]:
        loads = {e.id: self._load.get(e.id) for e in endpoints}
        if self._by_tokens:
            return min_max_low_is_good({k: float(v.in_flight_tokens) for k, v in loads.items()})
        return min_max_low_is_good({k: float(v.in_flight) for k, v in loads.items()})


class PrefillCostScorer:
    def __init__(
        self,
        pipeline: Pipeline,
        prefill_scale: float,
        load_scale: float,
        decode_tokens: int,
        waiting_tokens: int,
    ) -> None:
        self._pipeline = pipeline
        self._prefill_scale = prefill_scale
        self._load_scale = load_scale
        self._decode_tokens = decode_tokens
        self._waiting_tokens = waiting_tokens

    def costs(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> dict[str, float]:
        prompt = len(request.token_ids or ())
        matches = self._pipeline.kv_match(request, endpoints) if request.block_keys else {}
        load = self._pipeline.load
        out = {}
        for e in endpoints:
            match = matches.get(e.id)
            cached = match.weighted_blocks * match.block_size if match is not None else 0.0
            uncached = max(0.0, prompt - cached)
            figures = load.get(e.id)
            prefill = uncached + figures.pending_prefill_tokens
            busy = self._decode_tokens * figures.in_flight + self._waiting_tokens * (
                figures.waiting or 0.0
            )
            out[e.id] = self._prefill_scale * prefill + self._load_scale * busy
        return out

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[str, float]:
        return min_max_low_is_good(self.costs(request, endpoints))


def _prefill_cost(pipeline: Pipeline, params: Params) -> PrefillCostScorer:
    return PrefillCostScorer(
        pipeline,
        params.number("prefill_scale", 1.0, minimum=0.0),
        params.number("load_scale", 1.0, minimum=0.0),
        params.integer("decode_tokens", 16, minimum=0),
        params.integer("waiting_tokens", 0, minimum=0),
    )


@hookimpl
def kvaware_register(registry: ComponentRegistry) -> None:
    registry.add_scorer(
        "queue",
        lambda pipeline, params: QueueScorer(pipeline.load),
        doc="fewer waiting requests scores higher (min-max)",
    )
    registry.add_scorer(
        "kv-usage",
        lambda pipeline, params: KVUsageScorer(pipeline.load),
        doc="1 - KV-cache utilisation",
    )
    registry.add_scorer(
        "in-flight",
        lambda pipeline, params: InFlightScorer(
            pipeline.load,
            params.string("by", "requests", choices=("requests", "tokens")) == "tokens",
        ),
        doc="fewer requests (or tokens) outstanding from this router scores higher",
    )
    registry.add_scorer(
        "prefill-cost", _prefill_cost, doc="uncached prefill tokens plus queued load, as one cost"
    )
