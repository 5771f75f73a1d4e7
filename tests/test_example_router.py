"""End to end: the example router (examples/vllm_router) in front of real-time simulated
vLLM engines running as separate processes, publishing real KV events.

The router runs in-process on a thread with its own event loop (ephemeral ports), or as a
subprocess through its command line. Nothing sleeps to synchronise: every wait polls a
condition against a deadline, and no assertion is about wall-clock durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_for as _wait_for

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.hookspecs import hookimpl
from kvaware_scorer.sim.procs import EngineProcess, engine_fleet
from kvaware_scorer.tokenization import TINY_CHAT_DIR, TINY_CHAT_MODEL
from kvaware_scorer.types import Endpoint, RoutingRequest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the example is not an installed package
    sys.path.insert(0, str(ROOT))

from examples.vllm_router import Router, Settings, load_settings, parse_settings  # noqa: E402
from examples.vllm_router.sse import SSEFilter, ask_for_usage  # noqa: E402

MODEL = TINY_CHAT_MODEL
DEADLINE_S = 20.0
# About 1,000 tiny-chat tokens: long next to a question, short of the scaled engines'
# 2,048-token context.
RULES = " ".join(f"Rule {i}: answer politely and cite handbook section {i}." for i in range(40))


# ---------------------------------------------------------------------------- helpers


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = DEADLINE_S) -> Any:
    """``waiting.wait_for`` with this module's longer deadline."""
    return _wait_for(condition, what, timeout_s)


def http_json(
    url: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    method: str | None = None,
) -> tuple[int, Any]:
    """One HTTP request; returns (status, parsed JSON body or None)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(
        url,
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        method=method or ("POST" if data is not None else "GET"),
    )
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
        exc.close()
    try:
        return status, json.loads(payload) if payload else None
    except ValueError:
        return status, payload.decode("utf-8", "replace")


def http_text(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=DEADLINE_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def stream_events(url: str, body: Mapping[str, Any]) -> tuple[int, list[str]]:
    """POST a streaming request; returns the status and the SSE data payloads in order."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=DEADLINE_S)
    try:
        connection.request(
            "POST", parts.path, json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        events: list[str] = []
        for line in response:
            text = line.decode().rstrip("\r\n")
            if text.startswith("data:"):
                events.append(text[5:].strip())
        return response.status, events
    finally:
        connection.close()


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus page by (sample name, labels)."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric(
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def chat(system: str, question: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 4,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        **extra,
    }


def router_settings(engines: list[EngineProcess], **router: Any) -> Settings:
    kvaware = router.pop("kvaware", {})
    return parse_settings(
        {
            "router": {
                "port": 0,
                "admin": {"port": 0},
                "health_check_interval_s": 0.2,
                "health_check_timeout_s": 1.0,
                "connect_timeout_s": 2.0,
                "request_timeout_s": 30.0,
                "shutdown_timeout_s": 2.0,
                "backends": [
                    {
                        "id": e.pod,
                        "url": e.url,
                        "models": [e.model],
                        "kv_events": {"endpoint": e.kv_events, "replay_endpoint": e.replay},
                    }
                    for e in engines
                ],
                **router,
            },
            "kvaware": {
                "plugins": {"allow": ["session-affinity"]},
                "tokenizers": [{"model": MODEL, "source": str(TINY_CHAT_DIR)}],
                "scorers": [
                    {"type": "kv-prefix", "weight": 2.0},
                    {"type": "queue", "weight": 1.0},
                    {"type": "session-affinity", "weight": 1.0},
                ],
                "load": {"scrape_interval_s": 0.2},
                **kvaware,
            },
        }
    )


class RouterThread:
    """A :class:`Router` served by an event loop on a thread of its own."""

    def __init__(self, settings: Settings) -> None:
        self.router = Router(settings)
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="router")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.router.start()
        except BaseException as exc:
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        await self._stop.wait()
        await self.router.stop()

    def start(self) -> RouterThread:
        self._thread.start()
        assert self.ready.wait(DEADLINE_S), "the router did not start"
        if self.error is not None:
            raise self.error
        return self

    def stop(self, timeout_s: float = DEADLINE_S) -> None:
        """Stop the router; fails when it does not stop within ``timeout_s``."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the router did not stop within its bound"

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the router's event loop and wait for it."""
        assert self._loop is not None
        done = threading.Event()

        def run() -> None:
            try:
                fn(*args)
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        assert done.wait(DEADLINE_S)

    @property
    def url(self) -> str:
        return self.router.url

    @property
    def admin(self) -> str:
        return self.router.admin_url

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        status, text = http_text(self.admin + "/metrics")
        assert status == 200
        return metric_samples(text)

    def served_by(self) -> dict[str, float]:
        samples = self.metrics()
        return {
            e.id: metric(samples, "kvaware_router_requests_total", backend=e.id)
            for e in self.router.health.endpoints
        }


@contextlib.contextmanager
def running_router(settings: Settings) -> Iterator[RouterThread]:
    thread = RouterThread(settings).start()
    try:
        yield thread
    finally:
        thread.stop()


def send_and_locate(router: RouterThread, body: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Send a non-streaming request; returns (backend that answered, response JSON)."""
    before = router.served_by()
    status, response = http_json(router.url + "/v1/chat/completions", body)
    assert status == 200, response
    after = router.served_by()
    (backend,) = [b for b in after if after[b] != before.get(b, 0.0)]
    return backend, response


def cached_tokens(response: Mapping[str, Any]) -> int:
    return int(response["usage"]["prompt_tokens_details"]["cached_tokens"])


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fleet() -> Iterator[list[EngineProcess]]:
    with engine_fleet(3, prefix="rt", timeout_s=60.0) as engines:
        yield engines


@pytest.fixture(scope="module")
def router(fleet: list[EngineProcess]) -> Iterator[RouterThread]:
    with running_router(router_settings(fleet)) as thread:
        yield thread


# ---------------------------------------------------------------------------- routing


def test_shared_prefix_requests_land_on_the_pod_holding_it(router: RouterThread) -> None:
    system = "Prefix test. " + RULES
    served: list[str] = []
    cached: list[int] = []
    explained: list[dict[str, Any]] = []
    for i in range(6):
        body = chat(system, f"Question {i}: which rule covers refunds?")
        status, debug = http_json(router.admin + "/debug/route", body)
        assert status == 200, debug
        explained.append(debug["decision"])
        backend, response = send_and_locate(router, body)
        served.append(backend)
        cached.append(cached_tokens(response))

    assert served[1:] == [served[0]] * 5, served
    assert cached[0] == 0
    prompt = explained[1]["prompt_tokens"]
    assert prompt > 500
    for c in cached[1:]:
        assert c > cached[0] and c >= prompt // 2, cached
    for decision in explained[1:]:
        assert decision["endpoint"] == served[0]
        best, *others = decision["ranked"]
        assert best["endpoint"] == served[0]
        assert best["scores"]["kv-prefix"] > 0.5
        # kv-prefix is the reason: the only scorer separating the winner from the rest
        assert all(o["scores"]["kv-prefix"] == 0.0 for o in others)
        assert decision["predicted_cached_tokens"] >= prompt // 2
        assert set(decision["weights"]) == {"kv-prefix", "queue", "session-affinity"}


def test_streaming_passes_events_through(router: RouterThread) -> None:
    system = "Streaming test. " + RULES
    samples = router.metrics()
    actual_before = metric(samples, "kvaware_cached_tokens_actual_total")

    status, events = stream_events(
        router.url + "/v1/chat/completions", chat(system, "Stream a reply.", stream=True)
    )
    assert status == 200
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 3
    assert all(c["object"] == "chat.completion.chunk" and c["choices"] for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    # The router asked for usage on the client's behalf and kept it from the client.
    assert all("usage" not in c or c["usage"] is None for c in chunks)

    # The client asks for usage itself: it sees the usage chunk, and the prefix is cached.
    status, events = stream_events(
        router.url + "/v1/chat/completions",
        chat(system, "Again.", stream=True, stream_options={"include_usage": True}),
    )
    assert status == 200 and events[-1] == "[DONE]"
    usage = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
    assert len(usage) == 1 and usage[0]["prompt_tokens_details"]["cached_tokens"] > 0
    # pipeline.finished got the usage parsed from the streams
    samples = router.metrics()
    assert metric(samples, "kvaware_cached_tokens_actual_total") > actual_before

    # Completions stream too.
    status, events = stream_events(
        router.url + "/v1/completions",
        {"model": MODEL, "prompt": system, "max_tokens": 3, "stream": True},
    )
    assert status == 200 and events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "text_completion" for e in events[:-1])


def test_debug_route_explains_without_forwarding(
    router: RouterThread, fleet: list[EngineProcess]
) -> None:
    def engine_requests() -> dict[str, int]:
        return {e.pod: http_json(e.url + "/admin/stats")[1]["requests_added"] for e in fleet}

    engines_before = engine_requests()
    router_before = router.served_by()
    body = chat("Debug test. " + RULES, "Where would this go?")
    for _ in range(2):
        status, explained = http_json(router.admin + "/debug/route", body)
        assert status == 200, explained
        decision = explained["decision"]
        assert decision["endpoint"] in engines_before
        assert {r["endpoint"] for r in decision["ranked"]} == set(engines_before)
        assert decision["prompt_tokens"] > 500 and explained["tokenized"]
        # routed() was not called: no speculative entries, nothing predicted the 2nd time
        assert decision["predicted_cached_tokens"] == 0
    assert engine_requests() == engines_before
    assert router.served_by() == router_before
    assert all(router.router.pipeline.load.get(e.pod).in_flight == 0 for e in fleet)

    # The debug endpoint lives on the admin listener only.
    assert http_json(router.url + "/debug/route", body)[0] == 404
    assert http_text(router.url + "/metrics")[0] == 404


def test_metrics_expose_pipeline_and_router_figures(router: RouterThread) -> None:
    system = "Metrics test. " + RULES
    for i in range(2):
        send_and_locate(router, chat(system, f"Metrics question {i}"))
    samples = router.metrics()
    assert metric(samples, "kvaware_routes_total") >= 2
    assert metric(samples, "kvaware_listener_batches_total") > 0
    assert metric(samples, "kvaware_index_keys") > 0
    assert metric(samples, "kvaware_cached_tokens_predicted_total") > 0
    assert metric(samples, "kvaware_cached_tokens_actual_total") > 0
    assert metric(samples, "kvaware_cached_tokens_prediction_error_tokens_count") >= 2
    assert metric(samples, "kvaware_router_requests_total", status="200") >= 2
    for endpoint in router.router.health.endpoints:
        assert metric(samples, "kvaware_router_backend_healthy", backend=endpoint.id) == 1.0


def test_models_and_health(router: RouterThread, fleet: list[EngineProcess]) -> None:
    status, models = http_json(router.url + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [MODEL]
    status, health = http_json(router.url + "/health")
    assert status == 200 and health["backends"] == dict.fromkeys((e.pod for e in fleet), True)


def test_health_checks_restore_a_backend(router: RouterThread, fleet: list[EngineProcess]) -> None:
    pod = fleet[1].pod
    router.call(router.router.health.mark, pod, False, "test: pretend a connection failed")
    wait_for(lambda: http_json(router.url + "/health")[1]["backends"][pod], f"{pod} restored")


# ---------------------------------------------------------------------------- bad input


def test_bad_requests_get_openai_errors(router: RouterThread) -> None:
    url = router.url + "/v1/chat/completions"
    before = metric(router.metrics(), "kvaware_router_requests_total", backend="none")
    cases: list[tuple[int, dict[str, Any]]] = [
        (400, {"raw": b"{not json"}),
        (400, {"body": ["a", "list"]}),
        (400, {"body": {"messages": [{"role": "user", "content": "hi"}]}}),
        (400, {"body": {"model": MODEL}}),
        (400, {"body": {"model": MODEL, "messages": "hi"}}),
        (404, {"body": chat("x", "y") | {"model": "no-such-model"}}),
    ]
    for expected, kwargs in cases:
        status, error = http_json(url, kwargs.get("body"), raw=kwargs.get("raw"))
        assert status == expected, (kwargs, error)
        assert error["error"]["code"] == expected and error["error"]["message"]
    assert (
        error["error"]["type"] == "NotFoundError" and "no-such-model" in error["error"]["message"]
    )
    status, error = http_json(router.url + "/v1/completions", {"model": MODEL, "prompt": 3})
    assert status == 400 and error["error"]["param"] == "prompt"
    status, error = http_json(router.admin + "/debug/route", raw=b"]")
    assert status == 400 and "invalid JSON" in error["error"]["message"]
    after = metric(router.metrics(), "kvaware_router_requests_total", backend="none")
    assert after == before + len(cases) + 1


# ---------------------------------------------------------------------------- failures


class FinishedRecorder:
    """A plugin object recording every ``kvaware_request_finished`` call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    @hookimpl
    def kvaware_request_finished(
        self, request: RoutingRequest, endpoint: Endpoint, error: str | None
    ) -> None:
        self.calls.append((endpoint.id, error))


def test_killed_backend_is_routed_around() -> None:
    with engine_fleet(3, prefix="kill", timeout_s=60.0) as engines:
        settings = router_settings(
            engines,
            # Only the failed request may mark the pod down: no periodic check within the
            # test, and scrape failures ignored by the health filter.
            health_check_interval_s=600.0,
            max_retries=2,
            kvaware={
                "index": {"speculative_ttl_s": 600.0},
                "filters": [
                    {"type": "model-match"},
                    {"type": "health", "params": {"unhealthy_after": 0}},
                ],
            },
        )
        with running_router(settings) as router:
            recorder = FinishedRecorder()
            router.router.pipeline.pm.register(recorder)
            system = "Failover test. " + RULES
            holder, _ = send_and_locate(router, chat(system, "Warm the cache."))
            victim = next(e for e in engines if e.pod == holder)
            victim.process.terminate()
            victim.process.wait(timeout=DEADLINE_S)

            # The index still says the dead pod holds the prefix: it is chosen, refuses
            # the connection, and the request goes to the next best pod.
            status, explained = http_json(
                router.admin + "/debug/route", chat(system, "After the kill.")
            )
            assert explained["decision"]["endpoint"] == holder
            recorder.calls.clear()
            backend, response = send_and_locate(router, chat(system, "After the kill."))
            assert backend != holder and response["choices"]
            assert [c[0] for c in recorder.calls] == [holder, backend]
            assert recorder.calls[0][1] and "connect" in recorder.calls[0][1]
            assert recorder.calls[1][1] is None
            samples = router.metrics()
            assert metric(samples, "kvaware_router_retries_total", backend=holder) == 1
            assert metric(samples, "kvaware_router_upstream_errors_total", backend=holder) == 1
            assert metric(samples, "kvaware_router_backend_healthy", backend=holder) == 0
            assert router.router.pipeline.load.get(holder).in_flight == 0

            # Now filtered out by the health filter, and the decision says so.
            status, explained = http_json(router.admin + "/debug/route", chat(system, "Next."))
            assert explained["decision"]["filtered_out"] == {"health": [holder]}
            status, health = http_json(router.url + "/health")
            assert status == 200 and health["backends"][holder] is False
            for i in range(3):
                other, _ = send_and_locate(router, chat(system, f"Still served {i}."))
                assert other != holder

            # A stale health view (the pod looks up again) costs one retry, streamed too.
            # Speculative entries (long-lived here) make the dead pod the best for a prompt.
            router.call(router.router.health.mark, holder, True)
            index = router.router.pipeline.index
            index.add_speculative(holder, index.keys([1] * 64, MODEL))
            status, events = stream_events(
                router.url + "/v1/completions",
                {"model": MODEL, "prompt": [1] * 64, "max_tokens": 3, "stream": True},
            )
            assert status == 200 and events[-1] == "[DONE]"
            samples = router.metrics()
            assert metric(samples, "kvaware_router_retries_total", backend=holder) == 2


def test_shutdown_is_clean_with_a_stream_in_flight(fleet: list[EngineProcess]) -> None:
    baseline = {t.ident for t in threading.enumerate()}
    router = RouterThread(router_settings(fleet, shutdown_timeout_s=0.5)).start()
    try:
        parts = urlsplit(router.url)
        connection = http.client.HTTPConnection(parts.netloc, timeout=DEADLINE_S)
        body = {"model": MODEL, "prompt": "A long story:", "max_tokens": 1000, "stream": True}
        connection.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data:")  # streaming has begun
        pipeline = router.router.pipeline
        assert sum(pipeline.load.get(e.pod).in_flight for e in fleet) == 1
    finally:
        router.stop()  # bounded: fails if the router outlives shutdown_timeout_s + margin
    with contextlib.suppress(OSError, http.client.HTTPException):
        response.read()
    connection.close()
    # finished() was called for the cut stream; no thread of the router is left
    assert sum(pipeline.load.get(e.pod).in_flight for e in fleet) == 0
    leftover = [t.name for t in threading.enumerate() if t.ident not in baseline and t.is_alive()]
    assert leftover == []


# ---------------------------------------------------------------------------- command line


def _write_config(path: Path, engines: list[EngineProcess]) -> Path:
    settings = {
        "router": {
            "port": 0,
            "admin": {"port": 0},
            "health_check_interval_s": 1.0,
            "shutdown_timeout_s": 1.0,
            "backends": [
                {
                    "id": e.pod,
                    "url": e.url,
                    "models": [e.model],
                    "kv_events": {"endpoint": e.kv_events, "replay_endpoint": e.replay},
                }
                for e in engines
            ],
        },
        "kvaware": {
            "plugins": {"allow": ["session-affinity"]},
            "tokenizers": [{"model": MODEL, "source": str(TINY_CHAT_DIR)}],
            "scorers": [{"type": "kv-prefix", "weight": 2.0}, {"type": "session-affinity"}],
        },
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def _run_router(config: Path, stderr: IO[bytes]) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "examples.vllm_router", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,  # a file: a full pipe must never stall the router
        text=True,
    )


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=DEADLINE_S)
    if process.stdout is not None:
        process.stdout.close()


def _read_line(process: subprocess.Popen[str], timeout_s: float) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if selector.select(0.2):
                return process.stdout.readline()
            if process.poll() is not None:
                break
    return ""


def test_command_line_serves_and_stops_on_sigterm(
    fleet: list[EngineProcess], tmp_path: Path
) -> None:
    with tempfile.TemporaryFile() as stderr:
        process = _run_router(_write_config(tmp_path / "router.yaml", fleet), stderr)
        try:
            line = _read_line(process, 60.0)
            assert "listening on http://127.0.0.1:" in line, line
            url = line.split("listening on ", 1)[1].split()[0]
            status, response = http_json(url + "/v1/chat/completions", chat("CLI.", "Hello?"))
            assert status == 200 and response["usage"]["prompt_tokens"] > 0
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=DEADLINE_S) == 0
        finally:
            _stop(process)
        stderr.seek(0)
        log = stderr.read().decode()
    assert "Traceback" not in log and "router stopped" in log


def test_bad_yaml_is_refused_at_start_up_naming_the_path(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        "router:\n  backends:\n    - id: a\n      url: http://127.0.0.1:1\n"
        "      kv_events: {endpoint: 'tcp://127.0.0.1:2', dp_sise: 2}\n"
    )
    with tempfile.TemporaryFile() as err:
        process = _run_router(config, err)
        try:
            assert process.wait(timeout=60.0) == 2
        finally:
            _stop(process)
        err.seek(0)
        stderr = err.read().decode()
    assert "router.backends[0].kv_events: unknown key(s) dp_sise" in stderr
    assert "Traceback" not in stderr


# ---------------------------------------------------------------------------- configuration


BACKEND = {"id": "a", "url": "http://127.0.0.1:1"}


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"router": {"backends": [BACKEND]}, "extra": 1}, "(top level): unknown key(s) extra"),
        ({"router": {}}, "router.backends: required"),
        ({"router": {"backends": [BACKEND], "prot": 1}}, "router: unknown key(s) prot"),
        ({"router": {"backends": [BACKEND], "port": 70000}}, "router.port: 70000 is out of range"),
        ({"router": {"backends": [BACKEND, BACKEND]}}, "router.backends[1].id: duplicate"),
        ({"router": {"backends": [{"id": "a", "url": "10.0.0.1:8000"}]}}, "router.backends[0].url"),
        (
            {"router": {"backends": [{"id": "a", "url": "http://h:1/v1"}]}},
            "router.backends[0].url: give the pod's base URL without a path",
        ),
        (
            {"router": {"backends": [BACKEND], "request_timeout_s": float("nan")}},
            "router.request_timeout_s: must be a finite number",
        ),
        (
            {"router": {"backends": [BACKEND], "admin": {"port": "x"}}},
            "router.admin.port: must be a number",
        ),
        (
            {"router": {"backends": [{**BACKEND, "kv_events": {"endpoint": "10.0.0.1:5557"}}]}},
            "router.backends[0].kv_events.endpoint: must be a tcp:// or ipc:// address",
        ),
        (
            {
                "router": {"backends": [BACKEND]},
                "kvaware": {"scorers": [{"type": "kv-prefix", "weight": -1}]},
            },
            "kvaware.scorers[0].weight: -1 is out of range",
        ),
        (
            {"router": {"backends": [BACKEND]}, "kvaware": {"endpoints": [{"id": "b"}]}},
            "kvaware.endpoints: list the pods under router.backends",
        ),
    ],
)
def test_configuration_errors_name_the_yaml_path(document: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(document)
    assert message in str(info.value)


def test_shipped_config_builds_a_router() -> None:
    settings = load_settings(ROOT / "examples" / "vllm_router" / "config.yaml")
    assert settings.router.host == "127.0.0.1" and settings.router.admin.host == "127.0.0.1"
    router = Router(settings)  # validates every component and loads the plugins; binds nothing
    assert [name for name, _, _ in router.pipeline.scorers][:1] == ["kv-prefix"]
    assert "session-affinity" in [name for name, _, _ in router.pipeline.scorers]
    assert set(router.settings.kv_sources()) == {b.id for b in settings.router.backends}


def test_readme_kubernetes_config_is_valid() -> None:
    readme = (ROOT / "examples" / "vllm_router" / "README.md").read_text()
    block = readme.split("  router.yaml: |\n", 1)[1].split("\n---", 1)[0]
    settings = parse_settings(yaml.safe_load(textwrap.dedent(block)))
    assert [b.id for b in settings.router.backends] == ["vllm-0", "vllm-1", "vllm-2"]
    assert settings.kv_sources()["vllm-1"].replay_endpoint == "tcp://vllm-1.vllm:5558"
    Router(settings)  # every component builds


# ---------------------------------------------------------------------------- SSE unit


def test_sse_filter_strips_only_the_injected_usage_chunk() -> None:
    usage = {"prompt_tokens": 40, "prompt_tokens_details": {"cached_tokens": 32}}
    events = [
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
        b'data: {"choices":[],"usage":' + json.dumps(usage).encode() + b"}\n\n",
        b"data: [DONE]\n\n",
    ]
    stream = b"".join(events)
    for strip in (True, False):
        sse = SSEFilter(strip_usage_chunk=strip)
        # fed in awkward pieces: events are forwarded once complete
        out = b"".join(sse.feed(stream[i : i + 7]) for i in range(0, len(stream), 7)) + sse.flush()
        assert out == (events[0] + events[2] if strip else stream)
        assert (sse.prompt_tokens, sse.cached_tokens, sse.done) == (40, 32, True)

    body: dict[str, Any] = {"stream": True}
    assert ask_for_usage(body) and body["stream_options"] == {"include_usage": True}
    body = {"stream": True, "stream_options": {"include_usage": True}}
    assert not ask_for_usage(body)
    body = {"stream": False}
    assert not ask_for_usage(body) and "stream_options" not in body
