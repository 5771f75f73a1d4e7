"""Forwarding one routed request to its backend, with failover and the pipeline's callbacks.

Per attempt: ``Pipeline.routed`` when the request is sent, ``Pipeline.first_token`` on the
first streamed chunk (on the whole response when not streaming), ``Pipeline.finished``
at the end with the response's usage, or with ``error=`` when the attempt failed. A
backend that cannot be reached (refused, reset, connect timeout, or a response cut off
before the router sent anything to the client) is marked unhealthy and the request goes
to the next-best backend of the decision's ranking, up to ``max_retries`` times. Read
timeouts are not retried (the backend is slow, not gone): the client gets 504.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from kvaware_scorer.pipeline import Pipeline
from kvaware_scorer.types import Decision, Endpoint, RoutingRequest

from .health import BackendHealth
from .metrics import NO_BACKEND, RouterMetrics
from .openai_api import error_body
from .sse import SSEFilter, ask_for_usage, usage_numbers

logger = logging.getLogger(__name__)

# Not forwarded upstream: hop-by-hop headers, and those the router recomputes.
_DROP_REQUEST_HEADERS = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "host", "content-length", "content-type",
        "accept-encoding",
    }
)  # fmt: skip


class Unreachable(Exception):
    """The attempt failed before anything was sent to the client: try another backend."""


@dataclass
class _Outcome:
    """What an attempt tells ``Pipeline.finished``."""

    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    error: str | None = "cancelled"


class Forwarder:
    """Sends routed requests upstream; one instance per router."""

    def __init__(
        self,
        pipeline: Pipeline,
        health: BackendHealth,
        metrics: RouterMetrics,
        session: aiohttp.ClientSession,
        *,
        max_retries: int,
        request_timeout_s: float,
        connect_timeout_s: float,
    ) -> None:
        self.pipeline = pipeline
        self.health = health
        self.metrics = metrics
        self.session = session
        self.max_retries = max_retries
        self.timeout = aiohttp.ClientTimeout(
            total=request_timeout_s, sock_connect=connect_timeout_s
        )

    async def forward(
        self,
        http_request: web.Request,
        body: dict[str, Any],
        raw: bytes,
        routing: RoutingRequest,
        decision: Decision,
    ) -> web.StreamResponse:
        """Send the request to the decision's endpoint (or the next best ones on failure)."""
        injected = ask_for_usage(body)
        payload = json.dumps(body).encode() if injected else raw
        headers = upstream_headers(http_request.headers)
        stream = body.get("stream") is True
        candidates = [decision.endpoint] + [
            s.endpoint for s in decision.ranked if s.endpoint.id != decision.endpoint.id
        ]
        last_error = "no backend tried"
        failed: Endpoint | None = None
        tried = 0
        for endpoint in candidates:
            if tried > self.max_retries:
                break
            if failed is not None:
                if not self.health.is_healthy(endpoint.id):
                    continue
                self.metrics.retries.labels(failed.id).inc()
                logger.info("retrying on %s after %s failed", endpoint.id, failed.id)
            tried += 1
            try:
                return await self._attempt(
                    http_request, endpoint, routing, decision, payload, headers, stream, injected
                )
            except Unreachable as exc:
                last_error = str(exc)
                failed = endpoint
        status = 502
        self.metrics.requests.labels(NO_BACKEND, str(status)).inc()
        return web.json_response(
            error_body(status, f"no backend could be reached ({last_error})"), status=status
        )

    async def _attempt(
        self,
        http_request: web.Request,
        endpoint: Endpoint,
        routing: RoutingRequest,
        decision: Decision,
        payload: bytes,
        headers: Mapping[str, str],
        stream: bool,
        injected: bool,
    ) -> web.StreamResponse:
        url = endpoint.url.rstrip("/") + http_request.path
        outcome = _Outcome()
        self._call("routed", self.pipeline.routed, routing, endpoint, decision)
        try:
            try:
                upstream = await self.session.post(
                    url, data=payload, headers=headers, timeout=self.timeout
                )
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                if _is_timeout(exc):
                    return self._timeout(endpoint, outcome, exc)
                raise self._unreachable(endpoint, outcome, "connect", exc) from None
            async with upstream:
                event_stream = upstream.headers.get("Content-Type", "").startswith(
                    "text/event-stream"
                )
                if stream and upstream.status == 200 and event_stream:
                    return await self._relay_stream(
                        http_request, upstream, endpoint, routing, outcome, injected
                    )
                return await self._relay_whole(upstream, endpoint, routing, outcome)
        finally:
            self._call(
                "finished",
                self.pipeline.finished,
                routing,
                endpoint,
                prompt_tokens=outcome.prompt_tokens,
                cached_tokens=outcome.cached_tokens,
                error=outcome.error,
            )

    async def _relay_whole(
        self,
        upstream: aiohttp.ClientResponse,
        endpoint: Endpoint,
        routing: RoutingRequest,
        outcome: _Outcome,
    ) -> web.StreamResponse:
        try:
            data = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if _is_timeout(exc):
                return self._timeout(endpoint, outcome, exc)
            raise self._unreachable(endpoint, outcome, "read", exc) from None
        self._call("first_token", self.pipeline.first_token, routing, endpoint)
        content_type = upstream.headers.get("Content-Type", "application/json")
        if upstream.status < 400 and content_type.startswith("application/json"):
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = None
            if isinstance(parsed, Mapping):
                outcome.prompt_tokens, outcome.cached_tokens = usage_numbers(parsed.get("usage"))
        outcome.error = None if upstream.status < 400 else f"HTTP {upstream.status}"
        if upstream.status >= 500:
            self.metrics.upstream_errors.labels(endpoint.id, "http_5xx").inc()
        self.metrics.requests.labels(endpoint.id, str(upstream.status)).inc()
        return web.Response(
            status=upstream.status, body=data, headers={"Content-Type": content_type}
        )

    async def _relay_stream(
        self,
        http_request: web.Request,
        upstream: aiohttp.ClientResponse,
        endpoint: Endpoint,
        routing: RoutingRequest,
        outcome: _Outcome,
        injected: bool,
    ) -> web.StreamResponse:
        sse = SSEFilter(strip_usage_chunk=injected)
        response: web.StreamResponse | None = None
        failure: BaseException | None = None
        while True:
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failure = exc
                break
            if not chunk:
                break
            if response is None:
                self._call("first_token", self.pipeline.first_token, routing, endpoint)
                response = web.StreamResponse(
                    status=200,
                    headers={
                        "Content-Type": upstream.headers.get("Content-Type", "text/event-stream"),
                        "Cache-Control": "no-cache",
                    },
                )
                try:
                    await response.prepare(http_request)
                except (ConnectionError, aiohttp.ClientConnectionResetError):
                    outcome.error = "client disconnected"
                    self.metrics.requests.labels(endpoint.id, "499").inc()
                    return response
            out = sse.feed(chunk)
            if out and not await _write(response, out):
                outcome.error = "client disconnected"
                self.metrics.requests.labels(endpoint.id, "499").inc()
                return response
        if response is None:
            if failure is not None and _is_timeout(failure):
                return self._timeout(endpoint, outcome, failure)
            raise self._unreachable(
                endpoint, outcome, "stream", failure or ConnectionError("empty stream")
            )
        rest = sse.flush()
        if failure is not None:
            kind = "timeout" if _is_timeout(failure) else "stream"
            self.metrics.upstream_errors.labels(endpoint.id, kind).inc()
            logger.warning("stream from %s broke off: %r", endpoint.id, failure)
            message = f"upstream {endpoint.id} stream broke off: {failure!r}"
            rest += b"data: " + json.dumps(error_body(502, message)).encode() + b"\n\n"
            outcome.error = message
        else:
            outcome.error = sse.error
        outcome.prompt_tokens, outcome.cached_tokens = sse.prompt_tokens, sse.cached_tokens
        if rest:
            await _write(response, rest)
        try:
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            outcome.error = outcome.error or "client disconnected"
        self.metrics.requests.labels(endpoint.id, "200").inc()
        return response

    def _unreachable(
        self, endpoint: Endpoint, outcome: _Outcome, stage: str, exc: BaseException
    ) -> Unreachable:
        message = f"{endpoint.id} ({endpoint.url}): {stage} failed: {type(exc).__name__}: {exc}"
        outcome.error = message
        self.metrics.upstream_errors.labels(endpoint.id, stage).inc()
        self.health.mark(endpoint.id, False, message)
        logger.info("backend %s unreachable; trying the next best: %s", endpoint.id, message)
        return Unreachable(message)

    def _timeout(
        self, endpoint: Endpoint, outcome: _Outcome, exc: BaseException
    ) -> web.StreamResponse:
        outcome.error = f"timeout: {exc!r}"
        self.metrics.upstream_errors.labels(endpoint.id, "timeout").inc()
        self.metrics.requests.labels(endpoint.id, "504").inc()
        return web.json_response(error_body(504, f"backend {endpoint.id} timed out"), status=504)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        """Run a pipeline callback; a plugin bug must not fail the client's request."""
        try:
            fn(*args, **kwargs)
        except Exception:
            logger.exception("Pipeline.%s raised (plugin bug); the request continues", what)


def upstream_headers(headers: CIMultiDictProxy[str] | Mapping[str, str]) -> CIMultiDict[str]:
    """The client's headers minus hop-by-hop ones; the body is always JSON."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in _DROP_REQUEST_HEADERS:
            out.add(name, value)
    out["Content-Type"] = "application/json"
    return out


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.TimeoutError) and not isinstance(
        exc, aiohttp.ConnectionTimeoutError
    )


async def _write(response: web.StreamResponse, data: bytes) -> bool:
    """Write to the client; False when the client has gone."""
    try:
        await response.write(data)
    except (ConnectionError, aiohttp.ClientConnectionResetError):
        return False
    return True
