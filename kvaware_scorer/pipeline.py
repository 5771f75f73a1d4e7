"""Pipeline: filter → score → pick, with the services components share.

How one route composes (``Pipeline.route``):

1. The request is prepared once: its model is resolved (a LoRA adapter name selects the
   adapter's key namespace and its base model's tokenizer), its prompt tokenized with the
   model's tokenizer (cached), and its block keys computed. A request that cannot be
   tokenized still routes, by the scorers that need no tokens; it is counted.
2. Filters run in configured order; each keeps a subset. When nothing is left the route
   fails with :class:`NoEndpointError`, or, with ``fallback: unfiltered``, all endpoints
   are used.
3. Every scorer returns scores in [0, 1] (clamped; missing endpoints count 0). A scorer
   that raises contributes 0 for this request, is logged (rate-limited) and counted; the
   route still succeeds. An endpoint's total is the sum of weight × score.
4. Exactly one picker chooses among the endpoints ranked by total. If it raises, the best
   ranked endpoint is used and the failure counted.

The decision records every scorer's score per endpoint, so it can be explained in logs,
metrics and the router's debug endpoint. After the router sends the request it calls
:meth:`Pipeline.routed`, and :meth:`Pipeline.finished` when the response is complete.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from kvaware_scorer.config import PipelineConfig, load_config
from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.index import PrefixIndex, PrefixMatch
from kvaware_scorer.listener import KVEventListener, PodSource
from kvaware_scorer.load import LoadTracker, MetricsScraper
from kvaware_scorer.manager import get_plugin_manager
from kvaware_scorer.metrics import PipelineMetrics
from kvaware_scorer.ratelimit import RateLimitedLogger
from kvaware_scorer.registry import ComponentRegistry, Filter, Picker, Scorer
from kvaware_scorer.types import Decision, Endpoint, RoutingRequest, ScoredEndpoint

logger = logging.getLogger(__name__)


class NoEndpointError(KVAwareError):
    """No endpoint is left for a request after the filters."""


class Pipeline:
    """Routes requests over endpoints; see the module docstring.

    Construction validates the configuration and builds every component, but binds
    nothing and starts no thread; :meth:`start` and :meth:`stop` do that (idempotent).
    """

    def __init__(
        self,
        config: PipelineConfig | Mapping[str, Any] | None = None,
        *,
        load_entry_points: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(config, PipelineConfig):
            config = load_config(config)
        self.config = config
        self.pm = get_plugin_manager(
            allow=config.plugins.allow,
            block=config.plugins.block,
            load_entry_points=load_entry_points,
        )
        self.registry = ComponentRegistry()
        for impl in reversed(self.pm.hook.kvaware_register.get_hookimpls()):
            self.registry.current_plugin = impl.plugin_name
            impl.function(registry=self.registry)
        self.registry.current_plugin = ""

        ic = config.index
        self.index = PrefixIndex(
            block_size=ic.block_size,
            hash_seed=ic.hash_seed,
            tier_weights=ic.tier_weights,
            other_tier_weight=ic.other_tier_weight,
            pod_capacity=ic.pod_capacity,
            max_entries=ic.max_entries,
            speculative_ttl_s=ic.speculative_ttl_s,
            max_orphan_blocks=ic.max_orphan_blocks,
            clock=clock,
        )
        self.listener: KVEventListener | None = None
        if config.listener.enabled:
            self.listener = self._build_listener()
        self.load = LoadTracker()
        self.scraper: MetricsScraper | None = None
        if config.load.scrape:
            self.scraper = MetricsScraper(
                self.load,
                self._endpoint_values,
                interval_s=config.load.scrape_interval_s,
                timeout_s=config.load.scrape_timeout_s,
            )
        self.tokenizers: dict[str, Any] = {}
        self._adapter_base: dict[str, str] = {}
        for tc in config.tokenizers:
            for adapter in tc.adapters:
                self._adapter_base[adapter] = tc.model
        self._endpoints: dict[str, Endpoint] = {}
        self.extensions: dict[str, Any] = {}  # per-plugin state, keyed by plugin or type name
        self._kv_sources: dict[str, PodSource] = {}
        for ec in config.endpoints:
            endpoint = Endpoint(
                ec.id, ec.url, frozenset(ec.models), frozenset(ec.adapters), dict(ec.labels)
            )
            self._endpoints[ec.id] = endpoint
            for adapter in ec.adapters:
                self._adapter_base.setdefault(adapter, next(iter(ec.models), ""))
            if ec.kv_events is not None:
                kv = ec.kv_events
                self._kv_sources[ec.id] = PodSource(
                    ec.id,
                    kv.endpoint,
                    replay_endpoint=kv.replay_endpoint,
                    model=sorted(ec.models)[0] if ec.models else None,
                    dp_size=kv.dp_size,
                    topic=kv.topic,
                )

        self.filters: list[tuple[str, Filter]] = []
        for i, fc in enumerate(config.filters):
            f = self.registry.build("filter", fc.type, self, fc.params, f"filters[{i}]")
            self.filters.append((_unique(fc.type, [n for n, _ in self.filters]), f))
        self.scorers: list[tuple[str, float, Scorer]] = []
        for i, sc in enumerate(config.scorers):
            s = self.registry.build("scorer", sc.type, self, sc.params, f"scorers[{i}]")
            self.scorers.append((_unique(sc.type, [n for n, _, _ in self.scorers]), sc.weight, s))
        self.picker: Picker = self.registry.build(
            "picker", config.picker.type, self, config.picker.params, "picker"
        )
        self.counters: dict[str, int] = {}
        self._warn = RateLimitedLogger(logger, 10.0)
        self._lock = threading.Lock()
        self._started = False
        self.metrics = PipelineMetrics(self)

    def _build_listener(self) -> KVEventListener:
        lc = self.config.listener
        hash_check = None
        if lc.hash_check is not None:
            from kvaware_scorer.hash_check import HashCheck
            from kvaware_scorer.vllm_hash import VllmHashSettings

            hc = lc.hash_check
            hash_check = HashCheck(
                VllmHashSettings(
                    hash_algo=hc.hash_algo,
                    pythonhashseed=hc.pythonhashseed,
                    block_size=hc.block_size,
                )
            )
        return KVEventListener(
            self.index,
            bind=lc.bind,
            topic_filter=lc.topic_filter,
            bind_replay_port=lc.bind_replay_port,
            replay=lc.replay,
            replay_timeout_s=lc.replay_timeout_s,
            max_message_bytes=lc.max_message_bytes,
            max_queued_messages=lc.max_queued_messages,
            known_pods=self._endpoint_ids if self._reject_unknown_pods() else None,
            hash_check=hash_check,
        )

    def _reject_unknown_pods(self) -> bool:
        mode = self.config.listener.unknown_pods
        return mode == "reject" or (mode == "auto" and bool(self.config.endpoints))

    def _endpoint_ids(self) -> Collection[str]:
        return self._endpoints.keys()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load tokenizers, start the listener and scraper, run every plugin's startup."""
        with self._lock:
            if self._started:
                return
            self._load_tokenizers()
            try:
                self.pm.hook.kvaware_startup(pipeline=self)
            except BaseException:
                # Undo what the hooks that did run started; shutdown hooks are idempotent.
                try:
                    self.pm.hook.kvaware_shutdown(pipeline=self)
                except Exception:
                    logger.exception("shutdown after a failed start-up also failed")
                raise
            if self.scraper is not None:
                self.scraper.start()
            self._started = True
            if self._endpoints:
                self.pm.hook.kvaware_endpoints_changed(
                    pipeline=self, added=list(self._endpoints.values()), removed=[]
                )

    def stop(self) -> None:
        """Stop everything :meth:`start` started. Idempotent, bounded."""
        with self._lock:
            if not self._started:
                return
            self._started = False
            if self.scraper is not None:
                self.scraper.stop()
            self.pm.hook.kvaware_shutdown(pipeline=self)

    def __enter__(self) -> Pipeline:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _load_tokenizers(self) -> None:
        if not self.config.tokenizers:
            return
        from kvaware_scorer.tokenization import (  # type: ignore[import-not-found,unused-ignore]
            TokenizerSpec,
            load_tokenizer,
        )

        for tc in self.config.tokenizers:
            spec = TokenizerSpec(model=tc.model, source=tc.source, chat_template=tc.chat_template)
            self.tokenizers[tc.model] = load_tokenizer(spec)

    # ------------------------------------------------------------------ endpoints

    def _endpoint_values(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    @property
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def kv_source(self, endpoint_id: str) -> PodSource | None:
        return self._kv_sources.get(endpoint_id)

    def set_endpoints(
        self, endpoints: Iterable[Endpoint], kv_sources: Mapping[str, PodSource] | None = None
    ) -> None:
        """Replace the endpoint set; plugins hear what was added and removed."""
        new = {e.id: e for e in endpoints}
        removed = [e for i, e in self._endpoints.items() if i not in new]
        added = [e for i, e in new.items() if self._endpoints.get(i) != e]
        if kv_sources is not None:
            self._kv_sources.update(kv_sources)
        self._endpoints = new
        for endpoint in new.values():
            for adapter in endpoint.adapters:
                self._adapter_base.setdefault(adapter, next(iter(endpoint.models), ""))
        for endpoint in removed:
            self._kv_sources.pop(endpoint.id, None)
            self.load.forget(endpoint.id)
        if self._started and (added or removed):
            self.pm.hook.kvaware_endpoints_changed(pipeline=self, added=added, removed=removed)

    # ------------------------------------------------------------------ routing

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def prepare(self, request: RoutingRequest) -> None:
        """Resolve the adapter, tokenize (once) and compute the block keys (once)."""
        if request.block_keys is not None:
            return
        model = request.model
        if request.lora_name is None and model in self._adapter_base:
            request.lora_name = model
        if request.token_ids is None:
            if isinstance(request.prompt, list):
                request.token_ids = [t for t in request.prompt if isinstance(t, int)]
            else:
                tokenizer = self.tokenizers.get(self._adapter_base.get(model, model))
                if tokenizer is None:
                    self._count("untokenized")
                    self._warn.warning(
                        f"notok:{model}",
                        "no tokenizer for model %r; prefix scores are 0 for its requests",
                        model,
                    )
                    return
                started = time.perf_counter()
                try:
                    if request.messages is not None:
                        request.token_ids = tokenizer.chat(
                            request.messages,
                            tools=request.tools,
                            add_generation_prompt=request.add_generation_prompt,
                            continue_final_message=request.continue_final_message,
                            chat_template_kwargs=request.chat_template_kwargs,
                        )
                    elif request.prompt is not None:
                        request.token_ids = tokenizer.completion(request.prompt)
                    else:
                        return
                except (KVAwareError, ValueError, TypeError) as exc:
                    self._count("tokenize_errors")
                    self._warn.warning(
                        f"tokerr:{model}", "cannot tokenize a request for %r: %s", model, exc
                    )
                    return
                finally:
                    request.cache["tokenize_ms"] = (time.perf_counter() - started) * 1e3
        try:
            request.block_keys = self.index.keys(
                request.token_ids,
                model,
                lora_name=request.lora_name,
                cache_salt=request.cache_salt,
                mm_items=request.mm_items,
            )
        except KVAwareError as exc:
            self._count("bad_token_ids")
            self._warn.warning(f"badtok:{model}", "request token ids refused: %s", exc)

    def kv_match(
        self, request: RoutingRequest, endpoints: Sequence[Endpoint]
    ) -> dict[str, PrefixMatch]:
        """The index's prefix match for the request, computed once per request."""
        cached: dict[str, PrefixMatch] | None = request.cache.get("kv_match")
        if cached is not None and all(e.id in cached for e in endpoints):
            return cached
        keys = request.block_keys or []
        result = self.index.match(keys, [e.id for e in endpoints])
        request.cache["kv_match"] = result
        return result

    def route(
        self, request: RoutingRequest, endpoints: Sequence[Endpoint] | None = None
    ) -> Decision:
        """Choose an endpoint for ``request`` among ``endpoints`` (default: all known)."""
        t0 = time.perf_counter()
        all_endpoints = list(self._endpoints.values()) if endpoints is None else list(endpoints)
        self.prepare(request)
        t1 = time.perf_counter()
        candidates: Sequence[Endpoint] = all_endpoints
        filtered_out: dict[str, list[str]] = {}
        for name, f in self.filters:
            try:
                kept = f.filter(request, candidates)
            except Exception as exc:  # a broken filter is skipped, never fails the route
                self._count(f"filter_errors:{name}")
                self._warn.warning(f"filter:{name}", "filter %s failed (skipped): %r", name, exc)
                continue
            if len(kept) != len(candidates):
                kept_ids = {e.id for e in kept}
                filtered_out[name] = [e.id for e in candidates if e.id not in kept_ids]
            candidates = kept
        if not candidates:
            if self.config.fallback == "unfiltered" and all_endpoints:
                self._count("fallback_unfiltered")
                candidates = all_endpoints
            else:
                self._count("no_endpoint")
                raise NoEndpointError(
                    f"no endpoint can serve model {request.model!r}: "
                    + (
                        "; ".join(f"{k} removed {', '.join(v)}" for k, v in filtered_out.items())
                        or "no endpoints are known"
                    )
                )
        totals = dict.fromkeys((e.id for e in candidates), 0.0)
        per_scorer: dict[str, Mapping[str, float]] = {}
        failed: list[str] = []
        weights: dict[str, float] = {}
        for name, weight, scorer in self.scorers:
            weights[name] = weight
            try:
                scores = scorer.score(request, candidates)
            except Exception as exc:
                failed.append(name)
                self._count(f"scorer_errors:{name}")
                self._warn.warning(
                    f"scorer:{name}", "scorer %s failed (scores 0 for this request): %r", name, exc
                )
                scores = {}
            clean: dict[str, float] = {}
            for eid in totals:
                value = scores.get(eid, 0.0)
                value = 0.0 if value != value else min(1.0, max(0.0, float(value)))  # noqa: PLR0124 (NaN)
                clean[eid] = value
                totals[eid] += weight * value
            per_scorer[name] = clean
        by_id = {e.id: e for e in candidates}
        ranked = sorted(
            (
                ScoredEndpoint(by_id[eid], total, {n: s[eid] for n, s in per_scorer.items()})
                for eid, total in totals.items()
            ),
            key=lambda s: -s.total,
        )
        try:
            chosen = self.picker.pick(request, ranked)
        except Exception as exc:
            self._count("picker_errors")
            self._warn.warning("picker", "picker failed, using the best total: %r", exc)
            chosen = ranked[0].endpoint
        t2 = time.perf_counter()
        match = request.cache.get("kv_match") or {}
        chosen_match = match.get(chosen.id)
        decision = Decision(
            endpoint=chosen,
            ranked=ranked,
            weights=weights,
            filtered_out=filtered_out,
            failed_scorers=failed,
            predicted_cached_tokens=chosen_match.matched_tokens if chosen_match else 0,
            prompt_tokens=len(request.token_ids or ()),
            timings_ms={
                "prepare": (t1 - t0) * 1e3,
                "tokenize": request.cache.get("tokenize_ms", 0.0),
                "score": (t2 - t1) * 1e3,
                "total": (t2 - t0) * 1e3,
            },
        )
        self.metrics.observe_decision(request, decision)
        return decision

    def routed(
        self, request: RoutingRequest, endpoint: Endpoint, decision: Decision | None = None
    ) -> None:
        """Tell the pipeline the request was sent to ``endpoint``."""
        prompt = len(request.token_ids or ())
        match = (request.cache.get("kv_match") or {}).get(endpoint.id)
        uncached = prompt - (match.matched_tokens if match is not None else 0)
        request.cache["pending_prefill"] = (endpoint.id, uncached)
        self.load.started(endpoint.id, prompt, uncached)
        self.pm.hook.kvaware_request_routed(
            pipeline=self, request=request, endpoint=endpoint, decision=decision
        )

    def first_token(self, request: RoutingRequest, endpoint: Endpoint) -> None:
        """Tell the pipeline the request's first token arrived (its prefill is done)."""
        pending = request.cache.pop("pending_prefill", None)
        if pending is not None and pending[0] == endpoint.id:
            self.load.prefilled(endpoint.id, pending[1])

    def finished(
        self,
        request: RoutingRequest,
        endpoint: Endpoint,
        *,
        prompt_tokens: int | None = None,
        cached_tokens: int | None = None,
        error: str | None = None,
    ) -> None:
        """Tell the pipeline the request completed (with the response's usage when known)."""
        pending = request.cache.pop("pending_prefill", None)
        left = pending[1] if pending is not None and pending[0] == endpoint.id else 0
        self.load.finished(endpoint.id, len(request.token_ids or ()), left)
        self.metrics.observe_finished(request, endpoint, cached_tokens)
        self.pm.hook.kvaware_request_finished(
            pipeline=self,
            request=request,
            endpoint=endpoint,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            error=error,
        )


def _unique(name: str, taken: list[str]) -> str:
    if name not in taken:
        return name
    n = 2
    while f"{name}#{n}" in taken:
        n += 1
    return f"{name}#{n}"
