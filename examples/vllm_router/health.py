"""Backend health: a router-side map fed by connection failures and periodic GET /health.

A backend is marked down at once when a request cannot reach it, and by a failed health
check; a successful health check marks it up again. The router hands the pipeline its
endpoints with ``Endpoint.healthy`` set from this map, so the built-in ``health`` filter
removes backends that are down and the decision says so (``filtered_out``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import aiohttp

from kvaware_scorer.types import Endpoint

logger = logging.getLogger(__name__)


class BackendHealth:
    """Health per backend id, and the endpoint list carrying it (rebuilt on change only)."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        on_change: Callable[[str, bool], None] | None = None,
    ) -> None:
        self._base = {e.id: e for e in endpoints}
        self._healthy = dict.fromkeys(self._base, True)
        self._on_change = on_change
        self._endpoints = list(self._base.values())

    @property
    def endpoints(self) -> list[Endpoint]:
        """Every backend as an Endpoint whose ``healthy`` is the current state."""
        return self._endpoints

    def is_healthy(self, backend_id: str) -> bool:
        return self._healthy.get(backend_id, False)

    def snapshot(self) -> dict[str, bool]:
        return dict(self._healthy)

    def mark(self, backend_id: str, healthy: bool, why: str = "") -> None:
        """Set a backend's state; logs and rebuilds the endpoint list when it changes."""
        if backend_id not in self._healthy or self._healthy[backend_id] == healthy:
            return
        self._healthy[backend_id] = healthy
        self._endpoints = [replace(e, healthy=self._healthy[i]) for i, e in self._base.items()]
        if healthy:
            logger.info("backend %s is healthy again", backend_id)
        else:
            logger.warning("backend %s marked unhealthy: %s", backend_id, why)
        if self._on_change is not None:
            self._on_change(backend_id, healthy)


class HealthChecker:
    """An asyncio task that GETs every backend's ``/health`` every ``interval_s``."""

    def __init__(
        self,
        health: BackendHealth,
        session: aiohttp.ClientSession,
        *,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self._health = health
        self._session = session
        self._interval_s = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    def start(self) -> None:
        if self._task is None:
            self._stop.clear()
            self._task = asyncio.create_task(self._run(), name="kvaware-router-health")

    async def stop(self) -> None:
        """Stop the task (bounded: one check's timeout at most, then it is cancelled)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(task, self._timeout.total or 1.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def check_all(self) -> None:
        """One round: every backend checked concurrently."""
        endpoints = self._health.endpoints
        results = await asyncio.gather(*(self._check(e) for e in endpoints))
        for endpoint, (ok, why) in zip(endpoints, results, strict=True):
            self._health.mark(endpoint.id, ok, why)
        self.rounds += 1

    async def _check(self, endpoint: Endpoint) -> tuple[bool, str]:
        url = endpoint.url.rstrip("/") + "/health"
        try:
            async with self._session.get(url, timeout=self._timeout) as response:
                await response.read()
                if response.status == 200:
                    return True, ""
                return False, f"GET {url} returned {response.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return False, f"GET {url} failed: {type(exc).__name__}: {exc}"

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.check_all()
            except Exception:  # pragma: no cover - a bug; keep checking
                logger.exception("health check round failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval_s)
