"""Built-in prefix scorers.

* ``kv-prefix`` (precise): the index built from the pods' KV events. Score = tier-weighted
  consecutive cached blocks / request blocks, optionally blended with an absolute-length
  term: ``w·min(1, matched_tokens/scale)² + (1 − w)·ratio`` (``length_weight`` w,
  ``length_scale_tokens`` scale; as llm-d's prefix-cache-scorer).
* ``approx-prefix``: router-side history. Each routed request's block keys are recorded
  for the endpoint it went to, in a per-endpoint LRU of ``capacity_per_endpoint`` blocks;
  the score is the consecutive prefix found there / request blocks. It needs no events:
  the fallback for pods that publish none, and a baseline.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from kvaware_scorer.hookspecs import hookimpl

if TYPE_CHECKING:
    from kvaware_scorer.pipeline import Pipeline
    from kvaware_scorer.registry import ComponentRegistry, Params
    from kvaware_scorer.types import Endpoint, RoutingRequest


class KVPrefixScorer:
    def __init__(self, pipeline: Pipeline, length_weight: float, length_scale_tokens: int) -> None:
        self._pipeline = pipeline
        self._w = length_weight
        self._scale = length_scale_tokens

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[str, float]:
        if not request.block_keys:
            return {}
        matches = self._pipeline.kv_match(request, endpoints)
        w = self._w
        if not w:
            return {eid: m.score for eid, m in matches.items()}
        return {
            eid: w * min(1.0, m.matched_tokens / self._scale) ** 2 + (1 - w) * m.score
            for eid, m in matches.items()
        }


class ApproxHistory:
    """Which endpoint was sent which block keys, with a per-endpoint LRU bound."""

    def __init__(self, capacity_per_endpoint: int, max_prefix_blocks: int) -> None:
        self.capacity = capacity_per_endpoint
        self.max_prefix_blocks = max_prefix_blocks
        self._masks: dict[int, int] = {}
        self._bits: dict[str, int] = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._lock = threading.Lock()

    def record(self, endpoint_id: str, keys: Sequence[int]) -> None:
        with self._lock:
            bit = self._bits.get(endpoint_id)
            if bit is None:
                bit = 1 << len(self._bits)
                self._bits[endpoint_id] = bit
                self._lru[endpoint_id] = OrderedDict()
            lru = self._lru[endpoint_id]
            masks = self._masks
            for key in keys[: self.max_prefix_blocks]:
                masks[key] = masks.get(key, 0) | bit
                lru[key] = None
                lru.move_to_end(key)
            while len(lru) > self.capacity:
                old, _ = lru.popitem(last=False)
                left = masks.get(old, 0) & ~bit
                if left:
                    masks[old] = left
                else:
                    masks.pop(old, None)

    def forget(self, endpoint_id: str) -> None:
        with self._lock:
            bit = self._bits.get(endpoint_id)
            if bit is None:
                return
            for key in self._lru.pop(endpoint_id):
                left = self._masks.get(key, 0) & ~bit
                if left:
                    self._masks[key] = left
                else:
                    self._masks.pop(key, None)
            self._lru[endpoint_id] = OrderedDict()

    def matched_blocks(self, keys: Sequence[int], endpoint_ids: Sequence[str]) -> dict[str, int]:
        bits = {eid: self._bits.get(eid, 0) for eid in endpoint_ids}
        alive = 0
        for bit in bits.values():
            alive |= bit
        depth_of: dict[int, int] = {}
        get = self._masks.get
        depth = 0
        for key in keys[: self.max_prefix_blocks]:
            if not alive:
                break
            kept = alive & get(key, 0)
            if kept != alive:
                depth_of[alive ^ kept] = depth
                alive = kept
            depth += 1
        result = dict.fromkeys(endpoint_ids, 0)
        for eid, bit in bits.items():
            if not bit:
                continue
            if alive & bit:
                result[eid] = depth
                continue
            for dropped, at in depth_of.items():
                if dropped & bit:
                    result[eid] = at
                    break
        return result


class ApproxPrefixScorer:
    def __init__(self, history: ApproxHistory) -> None:
        self.history = history

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[str, float]:
        keys = request.block_keys
        if not keys:
            return {}
        total = min(len(keys), self.history.max_prefix_blocks)
        matched = self.history.matched_blocks(keys, [e.id for e in endpoints])
        return {eid: n / total for eid, n in matched.items()}


def _kv_prefix(pipeline: Pipeline, params: Params) -> KVPrefixScorer:
    return KVPrefixScorer(
        pipeline,
        params.number("length_weight", 0.0, minimum=0.0, maximum=1.0),
        params.integer("length_scale_tokens", 8192, minimum=1),
    )


def _approx_prefix(pipeline: Pipeline, params: Params) -> ApproxPrefixScorer:
    history = ApproxHistory(
        params.integer("capacity_per_endpoint", 31_250, minimum=1),
        params.integer("max_prefix_blocks", 2048, minimum=1),
    )
    pipeline.extensions.setdefault("approx-prefix", []).append(history)
    return ApproxPrefixScorer(history)


@hookimpl
def kvaware_register(registry: ComponentRegistry) -> None:
    registry.add_scorer("kv-prefix", _kv_prefix, doc="cached prefix from the pods' KV events")
    registry.add_scorer("approx-prefix", _approx_prefix, doc="prefix from the router's own history")


@hookimpl
def kvaware_request_routed(pipeline: Pipeline, request: RoutingRequest, endpoint: Endpoint) -> None:
    if request.block_keys:
        for history in pipeline.extensions.get("approx-prefix", ()):
            history.record(endpoint.id, request.block_keys)


@hookimpl
def kvaware_endpoints_changed(pipeline: Pipeline, removed: Sequence[Endpoint]) -> None:
    for endpoint in removed:
        for history in pipeline.extensions.get("approx-prefix", ()):
            history.forget(endpoint.id)
