"""Virtual-time fleet: simulated engines, a routing policy, and the real KV-event path.

A discrete-event loop, deterministic for a seed: request arrivals, engine steps and KV-event
deliveries are ordered by virtual time. Each engine's events are encoded to vLLM's wire bytes
and, after ``event_lag_s``, decoded by the real decoder and applied to the policy's real
index (when the policy has one), so routing sees what a live router would see, late by the
lag. Load figures reach the policy like a /metrics scrape every ``scrape_interval_s``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvaware_scorer.events import EventBatch
from kvaware_scorer.sim.engine import EngineConfig, SimEngine, SimRequest
from kvaware_scorer.wire import decode_payload, encode_batch

_ARRIVE, _DELIVER, _STEP, _SCRAPE = 0, 1, 2, 3


class Policy:
    """A routing policy under test. Subclasses implement :meth:`choose`."""

    name = "policy"
    index: Any = None  # a PrefixIndex fed with the fleet's KV events, if the policy uses one

    def bind(self, fleet: VirtualFleet) -> None:
        """Called once before the run."""

    def choose(self, request: SimRequest, now_s: float) -> str:
        raise NotImplementedError

    def routed(self, request: SimRequest, engine: str) -> None:
        """The request was sent to ``engine``."""

    def first_token(self, request: SimRequest, engine: str) -> None:
        """The request's first output token was produced on ``engine``."""

    def finished(self, request: SimRequest, engine: str) -> None:
        """The request completed on ``engine``."""

    def scraped(self, engine: str, waiting: int, running: int, kv_usage: float) -> None:
        """A periodic /metrics scrape of ``engine``."""


@dataclass
class FleetResult:
    """Everything measured in one run."""

    policy: str
    requests: list[SimRequest]
    assignment: dict[str, str]
    queue_samples: list[int] = field(default_factory=list)  # per-pod waiting, per scrape
    engine_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    sim_end_s: float = 0.0

    def summary(self, since_s: float = 0.0) -> dict[str, Any]:
        """Figures over the requests that arrived at or after ``since_s`` (after warm-up)."""
        measured = [r for r in self.requests if r.arrival_s >= since_s]
        done = [r for r in measured if r.finished_s is not None]
        ttfts = sorted(
            r.first_token_s - r.arrival_s for r in measured if r.first_token_s is not None
        )
        prompt = sum(len(r.token_ids) for r in done)
        cached = sum(r.cached_tokens for r in done)
        start = min((r.arrival_s for r in measured), default=0.0)
        end = max((r.finished_s or 0.0 for r in done), default=start)
        out_tokens = sum(r.output_tokens for r in done)
        per_engine: dict[str, int] = {}
        for r in measured:
            engine = self.assignment.get(r.request_id)
            if engine is not None:
                per_engine[engine] = per_engine.get(engine, 0) + len(r.token_ids)
        loads = list(per_engine.values()) or [0]
        mean_load = sum(loads) / len(loads)
        return {
            "requests": len(measured),
            "completed": len(done),
            "hit_rate": cached / prompt if prompt else 0.0,
            "ttft_p50_s": _pct(ttfts, 50),
            "ttft_p90_s": _pct(ttfts, 90),
            "ttft_p99_s": _pct(ttfts, 99),
            "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else math.nan,
            "throughput_tok_s": out_tokens / (end - start) if end > start else 0.0,
            "queue_mean": sum(self.queue_samples) / len(self.queue_samples)
            if self.queue_samples
            else 0.0,
            "queue_max": max(self.queue_samples, default=0),
            "load_imbalance": (max(loads) / mean_load) if mean_load else 0.0,
            "preemptions": sum(r.preemptions for r in measured),
        }


def _pct(sorted_values: Sequence[float], pct: float) -> float:
    if not sorted_values:
        return math.nan
    k = (len(sorted_values) - 1) * pct / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


class VirtualFleet:
    """Engines named ``pod-0`` … ``pod-{n-1}`` driven in virtual time."""

    def __init__(
        self,
        config: EngineConfig,
        num_engines: int,
        policy: Policy,
        *,
        event_lag_s: float = 0.005,
        scrape_interval_s: float = 0.5,
        drain_s: float = 600.0,
    ) -> None:
        self.now_s = 0.0
        self.policy = policy
        self.event_lag_s = event_lag_s
        self.scrape_interval_s = scrape_interval_s
        self.drain_s = drain_s
        self._queue: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.engines: dict[str, SimEngine] = {}
        for i in range(num_engines):
            name = f"pod-{i}"
            self.engines[name] = SimEngine(name, config, event_sink=self._sink_for(name))
        self._busy: set[str] = set()
        policy.bind(self)

    def clock(self) -> float:
        """The virtual clock (for indexes and pipelines in the policy)."""
        return self.now_s

    def _push(self, at: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, kind, payload))

    def _sink_for(self, name: str) -> Callable[[EventBatch], None]:
        def sink(batch: EventBatch) -> None:
            if self.policy.index is not None:
                self._push(
                    max(self.now_s, batch.ts) + self.event_lag_s,
                    _DELIVER,
                    (name, encode_batch(batch)),
                )

        return sink

    def run(
        self, requests: list[SimRequest], progress: Callable[[float], None] | None = None
    ) -> FleetResult:
        for each in requests:
            self._push(each.arrival_s, _ARRIVE, each)
        last_arrival = max((r.arrival_s for r in requests), default=0.0)
        deadline = last_arrival + self.drain_s
        self._push(0.0, _SCRAPE, None)
        result = FleetResult(self.policy.name, requests, {})
        finished_count = 0
        total = len(requests)
        while self._queue:
            at, _, kind, payload = heapq.heappop(self._queue)
            if at > deadline:
                break
            self.now_s = at
            if kind == _ARRIVE:
                request: SimRequest = payload
                engine = self.policy.choose(request, at)
                result.assignment[request.request_id] = engine
                self.engines[engine].add_request(request)
                self.policy.routed(request, engine)
                if engine not in self._busy:
                    self._busy.add(engine)
                    self._push(at, _STEP, engine)
            elif kind == _STEP:
                engine_obj = self.engines[payload]
                step = engine_obj.step(at)
                for first in step.first_tokens:
                    self.policy.first_token(first, payload)
                for done in step.finished:
                    self.policy.finished(done, payload)
                    finished_count += 1
                if engine_obj.has_work():
                    self._push(at + max(step.duration_s, 1e-6), _STEP, payload)
                else:
                    self._busy.discard(payload)
            elif kind == _DELIVER:
                name, data = payload
                batch = decode_payload(data)
                self.policy.index.apply(name, batch.events, rank=batch.data_parallel_rank)
            else:
                for name, engine_obj in self.engines.items():
                    self.policy.scraped(
                        name, engine_obj.num_waiting, engine_obj.num_running, engine_obj.kv_usage
                    )
                    result.queue_samples.append(engine_obj.num_waiting)
                if finished_count < total:
                    self._push(at + self.scrape_interval_s, _SCRAPE, None)
                if progress is not None and total:
                    progress(finished_count / total)
        result.sim_end_s = self.now_s
        result.engine_stats = {name: e.stats() for name, e in self.engines.items()}
        return result
