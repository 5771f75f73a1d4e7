"""The router: an aiohttp server in front of vLLM pods, driven by a kvaware ``Pipeline``.

Two listeners. The OpenAI one (``router.host:router.port``) proxies ``POST
/v1/completions`` and ``POST /v1/chat/completions`` (streamed or not) and serves ``GET
/v1/models`` and ``GET /health``. The admin one (``router.admin``, loopback by default)
serves ``GET /metrics`` (the pipeline's ``kvaware_*`` metrics and the router's counters)
and ``POST /debug/route`` (the decision for a request body, explained, sent nowhere).

``Pipeline.route`` runs on a thread pool (tokenizing a prompt the cache has not seen costs
milliseconds), so the event loop never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from kvaware_scorer.pipeline import NoEndpointError, Pipeline
from kvaware_scorer.types import Decision, RoutingRequest

from .health import BackendHealth, HealthChecker
from .metrics import NO_BACKEND, RouterMetrics
from .openai_api import (
    Kind,
    RequestError,
    check_model,
    error_body,
    kind_of,
    models_body,
    parse_body,
    routing_request,
)
from .proxy import Forwarder
from .settings import Settings

logger = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "::1", "localhost")


class Router:
    """Owns the pipeline, the HTTP listeners, the upstream client and the health checker.

    Construction validates the configuration and builds the pipeline (plugins included)
    but binds nothing; :meth:`start` and :meth:`stop` run inside an event loop.
    """

    def __init__(self, settings: Settings, *, load_entry_points: bool = True) -> None:
        self.settings = settings
        self.config = settings.router
        self.pipeline = Pipeline(settings.kvaware, load_entry_points=load_entry_points)
        self.pipeline.set_endpoints(settings.endpoints(), settings.kv_sources())
        self.metrics = RouterMetrics()
        self.health = BackendHealth(settings.endpoints(), on_change=self._health_changed)
        for endpoint in self.health.endpoints:
            self.metrics.healthy.labels(endpoint.id).set(1)
        self._health_filter = any(
            name.split("#")[0] == "health" for name, _ in self.pipeline.filters
        )
        self.created = int(time.time())
        self.url = ""
        self.admin_url = ""
        self._executor: ThreadPoolExecutor | None = None
        self._session: aiohttp.ClientSession | None = None
        self._checker: HealthChecker | None = None
        self._forwarder: Forwarder | None = None
        self._runners: list[web.AppRunner] = []
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the pipeline (listener, scraper, tokenizers), the client and the listeners."""
        if self._started:
            return
        self._started = True
        config = self.config
        try:
            self._executor = ThreadPoolExecutor(
                config.route_workers, thread_name_prefix="kvaware-route"
            )
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self.pipeline.start)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            )
            self._forwarder = Forwarder(
                self.pipeline,
                self.health,
                self.metrics,
                self._session,
                max_retries=config.max_retries,
                request_timeout_s=config.request_timeout_s,
                connect_timeout_s=config.connect_timeout_s,
            )
            self._checker = HealthChecker(
                self.health,
                self._session,
                interval_s=config.health_check_interval_s,
                timeout_s=config.health_check_timeout_s,
            )
            self._checker.start()
            self.url = await self._serve(self._public_app(), config.host, config.port)
            self.admin_url = await self._serve(
                self._admin_app(), config.admin.host, config.admin.port
            )
        except BaseException:
            await self.stop()
            raise
        if config.admin.host not in _LOOPBACK:
            logger.warning(
                "the admin listener (/metrics, /debug/route) is bound to %s, not loopback",
                config.admin.host,
            )
        logger.info(
            "routing to %d backend(s) on %s (admin %s)",
            len(self.health.endpoints),
            self.url,
            self.admin_url,
        )

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (``shutdown_timeout_s``), then stop
        the health checker, the upstream client, the pipeline and the route threads."""
        if not self._started:
            return
        self._started = False
        for runner in self._runners:
            try:
                await runner.cleanup()
            except Exception:  # pragma: no cover - keep shutting down
                logger.exception("closing a listener failed")
        self._runners.clear()
        if self._checker is not None:
            await self._checker.stop()
            self._checker = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        executor, self._executor = self._executor, None
        if executor is not None:
            try:
                await asyncio.wait_for(
                    asyncio.get_running_loop().run_in_executor(executor, self.pipeline.stop), 5.0
                )
            except asyncio.TimeoutError:  # pragma: no cover - Pipeline.stop is bounded
                logger.error("pipeline did not stop within 5 s")
            executor.shutdown(wait=True, cancel_futures=True)
        logger.info("router stopped")

    async def _serve(self, app: web.Application, host: str, port: int) -> str:
        runner = web.AppRunner(app, shutdown_timeout=self.config.shutdown_timeout_s)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        return f"http://{shown}:{bound_port}"

    # ------------------------------------------------------------------ apps

    def _public_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post("/v1/completions", self._proxy_handler("completion"))
        app.router.add_post("/v1/chat/completions", self._proxy_handler("chat"))
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        return app

    def _admin_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        if self.config.admin.debug_route:
            app.router.add_post("/debug/route", self._debug_route)
        return app

    # ------------------------------------------------------------------ handlers

    def _proxy_handler(self, kind: Kind) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._proxy(kind, request)

        return handler

    async def _proxy(self, kind: Kind, request: web.Request) -> web.StreamResponse:
        self.metrics.in_flight.inc()
        try:
            raw = await _read(request)
            body = parse_body(raw)
            routing = routing_request(kind, body, request.headers)
            check_model(routing.model, self.health.endpoints)
            decision = await self.route(routing)
            logger.debug(
                "request %s -> %s (predicted %d of %d prompt tokens cached)",
                routing.request_id,
                decision.endpoint.id,
                decision.predicted_cached_tokens,
                decision.prompt_tokens,
            )
            assert self._forwarder is not None
            return await self._forwarder.forward(request, body, raw, routing, decision)
        except RequestError as exc:
            self.metrics.requests.labels(NO_BACKEND, str(exc.status)).inc()
            return web.json_response(exc.body(), status=exc.status)
        except Exception:  # a bug (a filter that raised, ...): answer 500, keep serving
            logger.exception("request failed")
            self.metrics.requests.labels(NO_BACKEND, "500").inc()
            return web.json_response(error_body(500, "internal router error"), status=500)
        finally:
            self.metrics.in_flight.dec()

    async def route(self, routing: RoutingRequest) -> Decision:
        """``Pipeline.route`` on the route threads, over the backends with their health."""
        endpoints = self.health.endpoints
        if not self._health_filter:  # no `health` filter configured: drop dead backends here
            endpoints = [e for e in endpoints if e.healthy]
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, self.pipeline.route, routing, endpoints
            )
        except NoEndpointError as exc:
            raise RequestError(503, str(exc), "model") from None

    async def _debug_route(self, request: web.Request) -> web.StreamResponse:
        try:
            body = parse_body(await _read(request))
            kind = kind_of(body)
            routing = routing_request(kind, body, request.headers)
            check_model(routing.model, self.health.endpoints)
            decision = await self.route(routing)
        except RequestError as exc:
            return web.json_response(exc.body(), status=exc.status)
        return web.json_response(
            {
                "kind": kind,
                "model": routing.model,
                "tokenized": routing.token_ids is not None,
                "decision": decision.explain(),
                "backends_healthy": self.health.snapshot(),
            }
        )

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(models_body(self.health.endpoints, self.created))

    async def _health(self, request: web.Request) -> web.StreamResponse:
        backends = self.health.snapshot()
        ok = any(backends.values())
        return web.json_response(
            {"status": "ok" if ok else "unavailable", "backends": backends},
            status=200 if ok else 503,
        )

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        body = self.pipeline.metrics.render() + self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _health_changed(self, backend_id: str, healthy: bool) -> None:
        self.metrics.healthy.labels(backend_id).set(1 if healthy else 0)


async def _read(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise RequestError(413, f"request body too large: {exc.text}") from None
