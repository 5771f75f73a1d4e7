"""Load tracking: vLLM /metrics parsing, LoadTracker, and MetricsScraper against a real HTTP
server on 127.0.0.1 (ephemeral port), through to the health filter."""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from test_pipeline import live_threads, wait_for

from kvaware_scorer.load import EndpointLoad, LoadTracker, MetricsScraper, parse_vllm_metrics
from kvaware_scorer.pipeline import Pipeline
from kvaware_scorer.types import Endpoint, RoutingRequest

MODEL = "meta-llama/Llama-3.1-8B-Instruct"

# What vLLM (V1 engine, 0.10.x) serves on /metrics, trimmed: HELP/TYPE lines, labels,
# histograms and counters we must skip, process metrics, exponent notation.
VLLM_PAGE = f"""\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{{generation="0"}} 12345.0
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.2345678e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="{MODEL}"}} 4.275e-01
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",model_name="{MODEL}"}} 98304.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.001",model_name="{MODEL}"}} 0.0
vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="{MODEL}"}} 17.0
vllm:time_to_first_token_seconds_count{{engine="0",model_name="{MODEL}"}} 17.0
vllm:time_to_first_token_seconds_sum{{engine="0",model_name="{MODEL}"}} 1.9
# HELP vllm:num_requests_waiting_by_lora Made-up metric sharing our prefix.
vllm:num_requests_waiting_by_lora{{lora="x"}} 99.0
"""

# vLLM before 0.10 (V0 engine): the KV usage was called gpu_cache_usage_perc.
OLD_VLLM_PAGE = f"""\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{model_name="{MODEL}"}} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{model_name="{MODEL}"}} 0.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{{model_name="{MODEL}"}} 0.125
# HELP vllm:cpu_cache_usage_perc CPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:cpu_cache_usage_perc gauge
vllm:cpu_cache_usage_perc{{model_name="{MODEL}"}} 0.5
"""


def test_parse_a_vllm_metrics_page() -> None:
    assert parse_vllm_metrics(VLLM_PAGE) == {"running": 3.0, "waiting": 2.0, "kv_usage": 0.4275}


def test_parse_the_old_kv_usage_name() -> None:
    assert parse_vllm_metrics(OLD_VLLM_PAGE) == {"running": 1.0, "waiting": 0.0, "kv_usage": 0.125}


def test_parse_sums_queues_over_engines() -> None:
    page = "\n".join(
        [
            f'vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 2',
            f'vllm:num_requests_waiting{{engine="1",model_name="{MODEL}"}} 3',
            f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 4',
            f'vllm:num_requests_running{{engine="1",model_name="{MODEL}"}} 1',
        ]
    )
    assert parse_vllm_metrics(page) == {"waiting": 5.0, "running": 5.0}


def test_parse_unlabelled_tricky_and_bad_lines() -> None:
    page = "\n".join(
        [
            "",
            "vllm:num_requests_waiting 7",
            'vllm:num_requests_running{model_name="a b}c"} 2.5',  # a space and } in a label
            "vllm:kv_cache_usage_perc not-a-number",
            "vllm:num_requests_waiting",  # no value
            "# vllm:num_requests_waiting 100",
        ]
    )
    assert parse_vllm_metrics(page) == {"waiting": 7.0, "running": 2.5}
    assert parse_vllm_metrics("") == {}


def test_parse_a_page_with_both_kv_usage_names() -> None:
    # vLLM 0.10 with --show-hidden-metrics-for-version serves the old and the new name.
    page = OLD_VLLM_PAGE + f'vllm:kv_cache_usage_perc{{model_name="{MODEL}"}} 0.125\n'
    assert parse_vllm_metrics(page)["kv_usage"] == 0.125


def test_parse_averages_kv_usage_over_engines() -> None:
    # Two data-parallel engines at 50% and 70% are 60% used, not 120%.
    page = "\n".join(
        [
            f'vllm:kv_cache_usage_perc{{engine="0",model_name="{MODEL}"}} 0.5',
            f'vllm:kv_cache_usage_perc{{engine="1",model_name="{MODEL}"}} 0.7',
        ]
    )
    assert parse_vllm_metrics(page)["kv_usage"] == pytest.approx(0.6)


# ---------------------------------------------------------------------------- LoadTracker


def test_load_tracker_in_flight() -> None:
    t = LoadTracker()
    assert t.get("a") == EndpointLoad()
    t.started("a", 100)
    t.started("a", 20)
    assert (t.get("a").in_flight, t.get("a").in_flight_tokens) == (2, 120)
    t.finished("a", 100)
    t.finished("a", 20)
    t.finished("a", 20)  # never below zero
    assert (t.get("a").in_flight, t.get("a").in_flight_tokens) == (0, 0)


def test_load_tracker_scrapes() -> None:
    t = LoadTracker()
    t.scraped("a", None)
    t.scraped("a", None)
    assert t.get("a").scrape_failures == 2 and t.get("a").scraped_at is None
    t.scraped("a", {"waiting": 4.0, "kv_usage": 0.5})
    load = t.get("a")
    assert (load.waiting, load.running, load.kv_usage, load.scrape_failures) == (4.0, None, 0.5, 0)
    assert load.scraped_at is not None
    t.scraped("a", {"running": 1.0})  # a partial page keeps the other figures
    assert (t.get("a").waiting, t.get("a").running) == (4.0, 1.0)
    t.started("b", 1)
    assert set(t.snapshot()) == {"a", "b"}
    t.forget("a")
    assert set(t.snapshot()) == {"b"} and t.get("a") == EndpointLoad()


def test_load_tracker_is_thread_safe() -> None:
    t = LoadTracker()

    def work() -> None:
        for _ in range(2000):
            t.started("a", 3)
            t.finished("a", 3)
            t.started("a", 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert (t.get("a").in_flight, t.get("a").in_flight_tokens) == (8000, 8000)


# ---------------------------------------------------------------------------- scraping


class MetricsServer:
    """A real HTTP server on 127.0.0.1 serving one page per path prefix (one per pod)."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[int, str]] = {}
        self.hits: Counter[str] = Counter()
        self.gate: threading.Event | None = None  # when set, requests wait for it
        self.entered = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                pod = self.path.removesuffix("/metrics").strip("/")
                owner.hits[pod] += 1
                owner.entered.set()
                if owner.gate is not None:
                    owner.gate.wait(30)
                status, body = owner.pages.get(pod, (404, "no such pod"))
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-http")
        self.thread.start()

    def url(self, pod: str) -> str:
        return f"http://127.0.0.1:{self.port}/{pod}"

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def http() -> Iterator[MetricsServer]:
    before = live_threads()
    server = MetricsServer()
    yield server
    server.close()
    wait_for(lambda: not (live_threads() - before), "server and scraper threads to end")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_scrape_once_lands_figures_and_counts_failures(http: MetricsServer) -> None:
    http.pages["a"] = (200, VLLM_PAGE)
    http.pages["b"] = (500, "internal error")
    fleet = [
        Endpoint("a", url=http.url("a") + "/"),  # a trailing slash is fine
        Endpoint("b", url=http.url("b")),
        Endpoint("c"),  # no URL: not scraped
        Endpoint("d", url=f"http://127.0.0.1:{closed_port()}"),
    ]
    tracker = LoadTracker()
    scraper = MetricsScraper(tracker, lambda: fleet, timeout_s=5.0)
    scraper.scrape_once()
    a = tracker.get("a")
    assert (a.waiting, a.running, a.kv_usage, a.scrape_failures) == (2.0, 3.0, 0.4275, 0)
    assert tracker.get("b").scrape_failures == 1
    assert tracker.get("d").scrape_failures == 1
    assert "c" not in tracker.snapshot()
    scraper.scrape_once()
    assert tracker.get("b").scrape_failures == 2
    assert http.hits == Counter({"a": 2, "b": 2})


def test_scraper_thread_keeps_figures_fresh(http: MetricsServer) -> None:
    http.pages["a"] = (200, OLD_VLLM_PAGE)
    tracker = LoadTracker()
    scraper = MetricsScraper(
        tracker, lambda: [Endpoint("a", url=http.url("a"))], interval_s=0.05, timeout_s=5.0
    )
    scraper.start()
    scraper.start()  # idempotent
    try:
        wait_for(lambda: tracker.get("a").kv_usage == 0.125, "the first scrape")
        http.pages["a"] = (200, VLLM_PAGE)
        wait_for(lambda: tracker.get("a").kv_usage == 0.4275, "a later scrape")
    finally:
        scraper.stop()
    scraper.stop()  # idempotent
    assert http.hits["a"] >= 2


@pytest.mark.timeout(30)
def test_scraper_stop_is_bounded_while_a_scrape_hangs(http: MetricsServer) -> None:
    # The pod accepts the connection and never answers until released, which happens only
    # after stop() returned: an unbounded stop() would deadlock (and time out) here.
    http.pages["slow"] = (200, VLLM_PAGE)
    http.gate = threading.Event()
    tracker = LoadTracker()
    scraper = MetricsScraper(
        tracker, lambda: [Endpoint("slow", url=http.url("slow"))], interval_s=0.05, timeout_s=60.0
    )
    scraper.start()
    (thread,) = [t for t in threading.enumerate() if t.name == "kvaware-scraper"]
    assert http.entered.wait(10)
    scraper.stop(timeout_s=0.1)
    assert thread.is_alive()  # still blocked in the scrape, but stop() came back
    http.gate.set()
    wait_for(lambda: not thread.is_alive(), "the scraper thread to end")
    assert http.hits["slow"] == 1  # it stopped after the scrape in progress


def test_health_filter_drops_an_endpoint_whose_scrapes_fail(http: MetricsServer) -> None:
    http.pages["a"] = (200, VLLM_PAGE)
    http.pages["b"] = (503, "overloaded")
    pipeline = Pipeline(
        {
            "listener": {"enabled": False},
            "load": {"scrape_interval_s": 0.05, "scrape_timeout_s": 5.0},
            "endpoints": [
                {"id": "a", "url": http.url("a")},
                {"id": "b", "url": http.url("b")},
            ],
            "filters": [{"type": "health", "params": {"unhealthy_after": 3}}],
            "scorers": [{"type": "kv-usage"}],
        }
    )

    def route() -> Any:
        return pipeline.route(RoutingRequest(model="m", token_ids=[1]))

    with pipeline:
        wait_for(lambda: pipeline.load.get("b").scrape_failures >= 3, "three failed scrapes")
        assert pipeline.load.get("a").kv_usage == 0.4275  # figures land in the tracker
        decision = route()
        assert decision.filtered_out == {"health": ["b"]}
        assert decision.endpoint.id == "a"
        http.pages["b"] = (200, OLD_VLLM_PAGE)  # b recovers
        wait_for(lambda: pipeline.load.get("b").scrape_failures == 0, "a good scrape of b")
        decision = route()
        assert decision.filtered_out == {}
        assert decision.endpoint.id == "b"  # kv usage 0.125 beats 0.4275


def test_set_endpoints_forgets_load_and_scrapes_the_new_set(http: MetricsServer) -> None:
    http.pages["a"] = (200, VLLM_PAGE)
    http.pages["b"] = (200, OLD_VLLM_PAGE)
    pipeline = Pipeline(
        {
            "listener": {"enabled": False},
            "load": {"scrape_interval_s": 0.05, "scrape_timeout_s": 5.0},
            "endpoints": [{"id": "a", "url": http.url("a")}],
        }
    )
    with pipeline:
        wait_for(lambda: pipeline.load.get("a").scraped_at is not None, "a scraped")
        pipeline.set_endpoints([Endpoint("b", url=http.url("b"))])
        wait_for(lambda: pipeline.load.get("b").kv_usage == 0.125, "b scraped")
        hits_a, hits_b = http.hits["a"], http.hits["b"]
        wait_for(lambda: http.hits["b"] >= hits_b + 2, "two more rounds")
        assert http.hits["a"] == hits_a  # a is no longer scraped
