"""The ``session-affinity`` scorer: a session stays on the endpoint that served it last.

A request carrying the session header (``x-session-id`` unless ``params.header`` says
otherwise) scores 1.0 on the endpoint its session was last routed to and 0 elsewhere;
requests without the header, or whose session is unknown or expired, score 0 everywhere
(so the other scorers decide). The table is filled from the ``kvaware_request_routed``
hook, entries lapse ``ttl_s`` seconds after the session's last routed request, and at most
``max_sessions`` sessions are kept (least recently routed dropped first).

Parameters (read through :class:`kvaware_scorer.registry.Params`, so a misspelt key fails
at start-up): ``header`` (default ``x-session-id``), ``ttl_s`` (default 300),
``max_sessions`` (default 100000).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.hookspecs import hookimpl

if TYPE_CHECKING:
    from kvaware_scorer.pipeline import Pipeline
    from kvaware_scorer.registry import ComponentRegistry, Params
    from kvaware_scorer.types import Endpoint, RoutingRequest

TYPE_NAME = "session-affinity"
DEFAULT_HEADER = "x-session-id"
DEFAULT_TTL_S = 300.0
DEFAULT_MAX_SESSIONS = 100_000


class SessionTable:
    """Session id -> (endpoint id, expiry), bounded, least recently routed dropped first.

    Every entry lives ``ttl_s`` from its last :meth:`record`, so record order is also
    expiry order: expired entries are purged from the front on every write. Writes and
    reads take one short lock (no I/O, no waiting), so the table is safe to share between
    router threads.
    """

    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.clock = clock
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, session: str, endpoint_id: str) -> None:
        """``session`` was just routed to ``endpoint_id``."""
        now = self.clock()
        entries = self._entries
        with self._lock:
            entries[session] = (endpoint_id, now + self.ttl_s)
            entries.move_to_end(session)
            while entries and next(iter(entries.values()))[1] <= now:
                entries.popitem(last=False)
            while len(entries) > self.max_sessions:
                entries.popitem(last=False)

    def lookup(self, session: str) -> str | None:
        """The endpoint ``session`` was last routed to, or None (unknown or expired)."""
        now = self.clock()
        with self._lock:
            entry = self._entries.get(session)
            if entry is None:
                return None
            if entry[1] <= now:
                del self._entries[session]
                return None
            return entry[0]

    def forget_endpoint(self, endpoint_id: str) -> None:
        """Drop every session pinned to an endpoint that left the fleet."""
        with self._lock:
            for session in [s for s, (e, _) in self._entries.items() if e == endpoint_id]:
                del self._entries[session]

    def __len__(self) -> int:
        return len(self._entries)


class SessionAffinityScorer:
    """Implements :class:`kvaware_scorer.registry.Scorer`."""

    def __init__(self, header: str = DEFAULT_HEADER, table: SessionTable | None = None) -> None:
        self.header = header.lower()
        self.table = table if table is not None else SessionTable()

    def session_of(self, request: RoutingRequest) -> str | None:
        """The request's session id (header names compare case-insensitively)."""
        headers = request.headers
        value = headers.get(self.header)
        if value is None:
            for name, found in headers.items():
                if name.lower() == self.header:
                    value = found
                    break
        return value or None

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[str, float]:
        session = self.session_of(request)
        if session is None:
            return {}
        endpoint_id = self.table.lookup(session)
        if endpoint_id is None:
            return {}
        return {e.id: 1.0 for e in endpoints if e.id == endpoint_id}

    def observe(self, request: RoutingRequest, endpoint_id: str) -> None:
        session = self.session_of(request)
        if session is not None:
            self.table.record(session, endpoint_id)


def build_scorer(pipeline: Pipeline, params: Params) -> SessionAffinityScorer:
    """The factory registered for ``session-affinity``."""
    header = params.string("header", DEFAULT_HEADER)
    if not header.strip():
        raise ConfigError(f"{params.path}.header: must be a header name, got {header!r}")
    table = SessionTable(
        params.number("ttl_s", DEFAULT_TTL_S, minimum=0.001),
        params.integer("max_sessions", DEFAULT_MAX_SESSIONS, minimum=1),
    )
    scorer = SessionAffinityScorer(header, table)
    # Per-pipeline state: the routed hook below finds this pipeline's scorers here.
    pipeline.extensions.setdefault(TYPE_NAME, []).append(scorer)
    return scorer


def _scorers(pipeline: Pipeline) -> Sequence[SessionAffinityScorer]:
    found: Sequence[SessionAffinityScorer] = pipeline.extensions.get(TYPE_NAME, ())
    return found


@hookimpl
def kvaware_register(registry: ComponentRegistry) -> None:
    registry.add_scorer(
        TYPE_NAME, build_scorer, doc="1.0 on the endpoint that served the request's session last"
    )


@hookimpl
def kvaware_request_routed(pipeline: Pipeline, request: RoutingRequest, endpoint: Endpoint) -> None:
    for scorer in _scorers(pipeline):
        scorer.observe(request, endpoint.id)


@hookimpl
def kvaware_endpoints_changed(pipeline: Pipeline, removed: Sequence[Endpoint]) -> None:
    for scorer in _scorers(pipeline):
        for endpoint in removed:
            scorer.table.forget_endpoint(endpoint.id)
