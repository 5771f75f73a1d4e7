"""The router's own Prometheus counters, rendered after the pipeline's ``kvaware_*`` page."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

NO_BACKEND = "none"  # the backend label of requests refused before routing


class RouterMetrics:
    """Requests by backend and status, retries, upstream errors, backend health."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "kvaware_router_requests",
            "client requests answered, by the backend that answered (none: refused before "
            "routing or no backend reachable) and HTTP status",
            ["backend", "status"],
            registry=r,
        )
        self.retries = Counter(
            "kvaware_router_retries",
            "requests sent to another backend after a connection failure, by failed backend",
            ["backend"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "kvaware_router_upstream_errors",
            "failed upstream attempts, by backend and kind",
            ["backend", "kind"],
            registry=r,
        )
        self.healthy = Gauge(
            "kvaware_router_backend_healthy", "1 when the backend is up", ["backend"], registry=r
        )
        self.in_flight = Gauge(
            "kvaware_router_in_flight_requests", "requests being proxied", registry=r
        )

    def render(self) -> bytes:
        """This registry's Prometheus text page."""
        return generate_latest(self.registry)
