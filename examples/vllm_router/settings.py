"""The router's YAML file: a ``router:`` section (this module) and a ``kvaware:`` section.

The file has exactly two top-level keys. ``router`` is validated here with the same
machinery as ``kvaware_scorer.config`` (dataclasses walked by ``_convert``: unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` naming the YAML path, e.g.
``router.backends[1].kv_events.dp_size``). ``kvaware`` is handed to
:func:`kvaware_scorer.config.load_config` unchanged, except that the pipeline's endpoints
come from ``router.backends`` (``kvaware.endpoints`` is refused to avoid two sources).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kvaware_scorer.config import PipelineConfig, _convert, _f, load_config, read_yaml
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.listener import PodSource
from kvaware_scorer.types import Endpoint

TOP_LEVEL_KEYS = ("router", "kvaware")


@dataclass(frozen=True)
class KVEventsConfig:
    """Where the router dials a pod's KV-event publisher (the pod binds, we connect)."""

    endpoint: str = _f(doc="the pod's publisher address for rank 0, tcp://host:5557")
    replay_endpoint: str | None = _f(None, doc="the pod's replay address for rank 0")
    dp_size: int = _f(1, doc="data-parallel ranks (rank r at port + r)", minimum=1)


@dataclass(frozen=True)
class BackendConfig:
    """One vLLM pod."""

    id: str = _f(doc="backend id: the endpoint id in the index, metrics and decisions")
    url: str = _f(doc="the pod's OpenAI base URL, http://host:8000")
    models: list[str] = _f(factory=list, doc="served model names (empty: any model)")
    adapters: list[str] = _f(factory=list, doc="served LoRA adapter names")
    labels: dict[str, str] = _f(factory=dict, doc="labels for the label-selector filter")
    kv_events: KVEventsConfig | None = _f(None, doc="the pod's KV-event publisher")


@dataclass(frozen=True)
class AdminConfig:
    """The admin listener: ``/metrics`` and ``/debug/route``."""

    host: str = _f("127.0.0.1", doc="bind address of the admin listener (loopback)")
    port: int = _f(8081, doc="admin port (0: any free port)", minimum=0, maximum=65535)
    debug_route: bool = _f(True, doc="serve POST /debug/route")


@dataclass(frozen=True)
class RouterConfig:
    """The ``router:`` section."""

    host: str = _f("127.0.0.1", doc="bind address of the OpenAI listener")
    port: int = _f(8080, doc="OpenAI port (0: any free port)", minimum=0, maximum=65535)
    backends: list[BackendConfig] = _f(factory=list, doc="the vLLM pods")
    admin: AdminConfig = _f(factory=AdminConfig, doc="metrics and debug listener")
    health_check_interval_s: float = _f(5.0, doc="seconds between GET /health rounds", minimum=0.05)
    health_check_timeout_s: float = _f(2.0, doc="timeout of one health check", minimum=0.01)
    connect_timeout_s: float = _f(5.0, doc="timeout of connecting to a backend", minimum=0.01)
    request_timeout_s: float = _f(600.0, doc="total timeout of one upstream request", minimum=0.1)
    max_retries: int = _f(2, doc="other backends tried after a connection failure", minimum=0)
    max_body_bytes: int = _f(32 << 20, doc="largest request body accepted", minimum=1024)
    route_workers: int = _f(4, doc="threads running Pipeline.route", minimum=1)
    shutdown_timeout_s: float = _f(10.0, doc="grace period for in-flight requests", minimum=0.0)


@dataclass(frozen=True)
class Settings:
    """The whole validated file."""

    router: RouterConfig
    kvaware: PipelineConfig

    def endpoints(self) -> list[Endpoint]:
        """The backends as pipeline endpoints (all healthy)."""
        return [
            Endpoint(b.id, b.url, frozenset(b.models), frozenset(b.adapters), dict(b.labels))
            for b in self.router.backends
        ]

    def kv_sources(self) -> dict[str, PodSource]:
        """The KV-event sources of the backends that publish them, by backend id."""
        out: dict[str, PodSource] = {}
        for b in self.router.backends:
            if b.kv_events is not None:
                out[b.id] = PodSource(
                    b.id,
                    b.kv_events.endpoint,
                    replay_endpoint=b.kv_events.replay_endpoint,
                    model=b.models[0] if b.models else None,
                    dp_size=b.kv_events.dp_size,
                )
        return out


def parse_settings(data: Any) -> Settings:
    """Validate a parsed YAML document; raises :class:`ConfigError` naming the path."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"(top level): must be a mapping, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in TOP_LEVEL_KEYS)
    if unknown:
        raise ConfigError(
            f"(top level): unknown key(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(TOP_LEVEL_KEYS)}"
        )
    router: RouterConfig = _convert(RouterConfig, data.get("router") or {}, "router")
    _check_router(router)
    kvaware_section = data.get("kvaware") or {}
    if isinstance(kvaware_section, Mapping) and kvaware_section.get("endpoints"):
        raise ConfigError(
            "kvaware.endpoints: list the pods under router.backends instead (the router "
            "builds the pipeline's endpoints from them)"
        )
    kvaware = load_config({"kvaware": kvaware_section})
    return Settings(router, kvaware)


def load_settings(path: str | Path) -> Settings:
    """Read and validate the router's YAML file."""
    return parse_settings(read_yaml(Path(path)))


def _check_router(router: RouterConfig) -> None:
    for f in dataclasses.fields(router):
        value = getattr(router, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"router.{f.name}: must be a finite number, got {value!r}")
    if not router.backends:
        raise ConfigError("router.backends: required; list at least one vLLM pod")
    seen: set[str] = set()
    for i, backend in enumerate(router.backends):
        where = f"router.backends[{i}]"
        if not backend.id.strip():
            raise ConfigError(f"{where}.id: must not be empty")
        if backend.id in seen:
            raise ConfigError(f"{where}.id: duplicate backend id {backend.id!r}")
        seen.add(backend.id)
        parts = urlsplit(backend.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"{where}.url: must be an http:// or https:// base URL, got {backend.url!r}"
            )
        if parts.path.strip("/") or parts.query:
            raise ConfigError(
                f"{where}.url: give the pod's base URL without a path (the router adds "
                f"/v1/...), got {backend.url!r}"
            )
        kv = backend.kv_events
        if kv is not None:
            for key, value in (("endpoint", kv.endpoint), ("replay_endpoint", kv.replay_endpoint)):
                if value is not None and not value.startswith(("tcp://", "ipc://")):
                    raise ConfigError(
                        f"{where}.kv_events.{key}: must be a tcp:// or ipc:// address, "
                        f"got {value!r}"
                    )
            try:
                PodSource(
                    backend.id, kv.endpoint, replay_endpoint=kv.replay_endpoint, dp_size=kv.dp_size
                )
            except ConfigError as exc:
                raise ConfigError(f"{where}.kv_events: {exc}") from None
    if router.admin.port and router.admin.port == router.port and router.admin.host == router.host:
        raise ConfigError("router.admin.port: must differ from router.port on the same host")
