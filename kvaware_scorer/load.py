"""Live load per endpoint: what the router has in flight, and what each pod's /metrics says.

:class:`LoadTracker` is updated by the router (``started``/``finished``) and by
:class:`MetricsScraper`, a thread that scrapes every endpoint's ``/metrics`` on an interval
(vLLM's ``vllm:num_requests_waiting``, ``vllm:num_requests_running`` and
``vllm:kv_cache_usage_perc``), off the request path. Scorers only read snapshots.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from kvaware_scorer.ratelimit import RateLimitedLogger
from kvaware_scorer.types import Endpoint

logger = logging.getLogger(__name__)

_METRICS = {
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_requests_running": "running",
    "vllm:kv_cache_usage_perc": "kv_usage",
    "vllm:gpu_cache_usage_perc": "kv_usage",  # name before vLLM 0.10
}


@dataclass(frozen=True, slots=True)
class EndpointLoad:
    """One endpoint's load figures. Scraped ones are None until the first scrape."""

    in_flight: int = 0
    in_flight_tokens: int = 0
    pending_prefill_tokens: int = 0  # predicted uncached prompt tokens not yet prefilled
    waiting: float | None = None
    running: float | None = None
    kv_usage: float | None = None
    scraped_at: float | None = None
    scrape_failures: int = 0


class LoadTracker:
    """Per-endpoint load; writes are locked, reads are lock-free snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loads: dict[str, EndpointLoad] = {}

    def get(self, endpoint_id: str) -> EndpointLoad:
        return self._loads.get(endpoint_id) or EndpointLoad()

    def snapshot(self) -> dict[str, EndpointLoad]:
        return dict(self._loads)

    def started(self, endpoint_id: str, prompt_tokens: int, uncached_tokens: int = 0) -> None:
        """A request was sent: it is in flight, and its uncached prompt awaits prefill."""
        with self._lock:
            load = self.get(endpoint_id)
            self._loads[endpoint_id] = replace(
                load,
                in_flight=load.in_flight + 1,
                in_flight_tokens=load.in_flight_tokens + prompt_tokens,
                pending_prefill_tokens=load.pending_prefill_tokens + uncached_tokens,
            )

    def prefilled(self, endpoint_id: str, uncached_tokens: int) -> None:
        """The request's first token arrived: its prefill is done."""
        with self._lock:
            load = self.get(endpoint_id)
            self._loads[endpoint_id] = replace(
                load,
                pending_prefill_tokens=max(0, load.pending_prefill_tokens - uncached_tokens),
            )

    def finished(self, endpoint_id: str, prompt_tokens: int, pending_tokens: int = 0) -> None:
        """The request completed; ``pending_tokens`` is what it still had awaiting prefill."""
        with self._lock:
            load = self.get(endpoint_id)
            self._loads[endpoint_id] = replace(
                load,
                in_flight=max(0, load.in_flight - 1),
                in_flight_tokens=max(0, load.in_flight_tokens - prompt_tokens),
                pending_prefill_tokens=max(0, load.pending_prefill_tokens - pending_tokens),
            )

    def scraped(self, endpoint_id: str, figures: dict[str, float] | None) -> None:
        with self._lock:
            load = self.get(endpoint_id)
            if figures is None:
                self._loads[endpoint_id] = replace(load, scrape_failures=load.scrape_failures + 1)
            else:
                self._loads[endpoint_id] = replace(
                    load,
                    waiting=figures.get("waiting", load.waiting),
                    running=figures.get("running", load.running),
                    kv_usage=figures.get("kv_usage", load.kv_usage),
                    scraped_at=time.monotonic(),
                    scrape_failures=0,
                )

    def forget(self, endpoint_id: str) -> None:
        with self._lock:
            self._loads.pop(endpoint_id, None)


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """The load figures in a Prometheus text page: queue lengths summed over label sets
    (data-parallel engines), KV usage averaged."""
    out: dict[str, float] = {}
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        key = _METRICS.get(line[:name_end])
        if key is None:
            continue
        try:
            value = float(
                line.rsplit(" ", 1)[-1] if "}" not in line else line.rsplit("}", 1)[1].split()[0]
            )
        except (ValueError, IndexError):
            continue
        out[key] = out.get(key, 0.0) + value
        counts[key] = counts.get(key, 0) + 1
    if "kv_usage" in out:  # a fraction per engine: average it over data-parallel engines
        out["kv_usage"] /= counts["kv_usage"]
    return out


class MetricsScraper:
    """A thread that scrapes ``<url>/metrics`` of every endpoint every ``interval_s``."""

    def __init__(
        self,
        tracker: LoadTracker,
        endpoints: Callable[[], Iterable[Endpoint]],
        *,
        interval_s: float = 1.0,
        timeout_s: float = 0.5,
    ) -> None:
        self._tracker = tracker
        self._endpoints = endpoints
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warn = RateLimitedLogger(logger, 30.0)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="kvaware-scraper", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 1.0) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout_s)
        self._thread = None

    def scrape_once(self) -> None:
        for endpoint in list(self._endpoints()):
            if self._stop.is_set():
                return
            if not endpoint.url:
                continue
            self._tracker.scraped(endpoint.id, self._scrape(endpoint))

    def _scrape(self, endpoint: Endpoint) -> dict[str, float] | None:
        url = endpoint.url.rstrip("/") + "/metrics"
        try:
            with urllib.request.urlopen(url, timeout=self._timeout_s) as response:
                body = response.read(4 << 20).decode("utf-8", "replace")
        except (OSError, urllib.error.URLError, ValueError) as exc:
            self._warn.warning(endpoint.id, "cannot scrape %s: %s", url, exc)
            return None
        return parse_vllm_metrics(body)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.scrape_once()
            except Exception:  # pragma: no cover - a bug; keep scraping
                logger.exception("metrics scrape failed")
            self._stop.wait(max(0.0, self._interval_s - (time.monotonic() - started)))
