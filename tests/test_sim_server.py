"""The real-time simulated engine as real processes: vLLM's HTTP API, metrics, KV events
end to end into a listener and index, fault injection, shutdown and argument errors.

No mocks: every engine is a ``kvaware-scorer sim-engine`` process on 127.0.0.1 (ephemeral
ports), reached over real HTTP and ZeroMQ. Synchronisation is by polling with deadlines.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.client import HTTPConnection
from typing import Any
from urllib.parse import urlsplit

import pytest
from waiting import wait_for as _wait_for

from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.index import PrefixIndex
from kvaware_scorer.listener import KVEventListener, PodSource
from kvaware_scorer.load import parse_vllm_metrics
from kvaware_scorer.sim.procs import (
    EngineProcess,
    engine_fleet,
    engine_stderr,
    spawn_engines,
    stop_engines,
)
from kvaware_scorer.tokenization import (
    TINY_CHAT_MODEL,
    RequestTokenizer,
    load_tokenizer,
    tiny_chat_spec,
)

DEADLINE_S = 15.0
BLOCK = 16
LORA = "sql-adapter"


# ----------------------------------------------------------------------------- helpers


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = DEADLINE_S) -> Any:
    """``waiting.wait_for`` with this module's longer deadline."""
    return _wait_for(condition, what, timeout_s)


def http(
    method: str, url: str, body: Any = None, *, timeout_s: float = DEADLINE_S
) -> tuple[int, Any]:
    """``(status, parsed JSON body or text)`` of one request; errors are returned too."""
    data: bytes | None
    if body is None:
        data = None
    elif isinstance(body, bytes):
        data = body
    else:
        data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, raw, ctype = response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as error:
        with error:
            status, raw, ctype = error.code, error.read(), error.headers["Content-Type"]
    if ctype and ctype.startswith("application/json"):
        return status, json.loads(raw)
    return status, raw.decode()


def post(url: str, body: Any) -> dict[str, Any]:
    status, out = http("POST", url, body)
    assert status == 200, out
    assert isinstance(out, dict)
    return out


def stream(url: str, body: dict[str, Any]) -> list[tuple[float, str]]:
    """The ``data:`` payloads of an SSE response, each with its arrival time."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    out: list[tuple[float, str]] = []
    with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data: "):
                out.append((time.monotonic(), line[len("data: ") :]))
            else:
                assert line == "", line
    return out


def unique_text(words: int = 60) -> str:
    """A prompt whose first block is unique to this call (a fresh cache miss)."""
    marker = uuid.uuid4().hex[:12]
    return f"{marker} " + " ".join(f"item{i} is number {i}" for i in range(words))


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": TINY_CHAT_MODEL, "messages": [{"role": "user", "content": text}], **extra}


def counters(metrics_text: str) -> dict[str, float]:
    """Every ``vllm:*_total`` sample of a Prometheus page, summed over label sets."""
    out: dict[str, float] = {}
    for match in re.finditer(r"^(vllm:[a-z_]+_total)\{[^}]*\} (\S+)$", metrics_text, re.M):
        out[match.group(1)] = out.get(match.group(1), 0.0) + float(match.group(2))
    return out


def metrics(engine: EngineProcess) -> str:
    status, text = http("GET", engine.url + "/metrics")
    assert status == 200
    assert isinstance(text, str)
    return text


def truth(engine: EngineProcess) -> set[int]:
    status, out = http("GET", engine.url + "/admin/truth")
    assert status == 200
    return set(out["hashes"])


def matched_blocks(index: PrefixIndex, pod: str, keys: list[int]) -> int:
    return index.match(keys, [pod])[pod].matched_blocks


@contextmanager
def listening(engine: EngineProcess) -> Iterator[tuple[KVEventListener, PrefixIndex]]:
    """A listener dialling ``engine`` (connect mode, with replay), attached and in sync.

    The engine must be idle: until the listener has applied a batch, the engine's prefix
    cache is reset (one ``AllBlocksCleared`` batch each time), so the first batch that
    reaches the listener makes it replay the pod's history from sequence 0.
    """
    assert engine.kv_events is not None
    index = PrefixIndex(block_size=BLOCK, default_model=engine.model)
    listener = KVEventListener(index)
    listener.start()
    try:
        listener.add_pod(
            PodSource(
                engine.pod, engine.kv_events, replay_endpoint=engine.replay, model=engine.model
            )
        )
        deadline = time.monotonic() + DEADLINE_S
        while listener.stats()["batches"] == 0:
            assert time.monotonic() < deadline, "the listener never received a batch"
            assert post(engine.url + "/admin/reset_prefix_cache", {})["reset"] is True
            poll_until = time.monotonic() + 0.3
            while listener.stats()["batches"] == 0 and time.monotonic() < poll_until:
                time.sleep(0.01)
        wait_for(lambda: not listener.stats()["index"]["pod_blocks"].get(engine.pod), "a clear")
        yield listener, index
    finally:
        listener.stop()


def assert_index_equals_truth(engine: EngineProcess, index: PrefixIndex) -> None:
    def same() -> bool:
        hashes = truth(engine)
        held = index.stats()["pod_blocks"].get(engine.pod, 0)
        return held == len(hashes) and all(index.holds(engine.pod, h) for h in hashes)

    wait_for(same, "the index to hold exactly the engine's cached hashes")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fleet() -> Iterator[list[EngineProcess]]:
    with engine_fleet(2, prefix="srv", extra_args=["--lora", LORA]) as engines:
        yield engines


@pytest.fixture(scope="module")
def tokenizer() -> RequestTokenizer:
    return load_tokenizer(tiny_chat_spec())


# ---------------------------------------------------------------------------- HTTP API


def test_ready_line_models_and_health(fleet: list[EngineProcess]) -> None:
    for i, engine in enumerate(fleet):
        assert engine.pod == f"srv-{i}"
        assert engine.model == TINY_CHAT_MODEL
        assert engine.topic == f"kv@srv-{i}@{TINY_CHAT_MODEL}"
        assert engine.url.startswith("http://127.0.0.1:")
        assert engine.kv_events is not None and engine.kv_events.startswith("tcp://127.0.0.1:")
        assert engine.replay is not None and engine.replay.startswith("tcp://127.0.0.1:")
        assert engine.process.poll() is None
        assert http("GET", engine.url + "/health")[0] == 200
    status, models = http("GET", fleet[0].url + "/v1/models")
    assert status == 200
    assert models["object"] == "list"
    cards = {card["id"]: card for card in models["data"]}
    assert set(cards) == {TINY_CHAT_MODEL, LORA}
    assert cards[TINY_CHAT_MODEL]["parent"] is None
    assert cards[LORA]["parent"] == TINY_CHAT_MODEL
    assert cards[TINY_CHAT_MODEL]["max_model_len"] > 0


def test_completion_and_chat_use_the_routers_token_ids(
    fleet: list[EngineProcess], tokenizer: RequestTokenizer
) -> None:
    url = fleet[0].url
    prompt = unique_text(10)
    body = {"model": TINY_CHAT_MODEL, "prompt": prompt, "max_tokens": 7}
    out = post(url + "/v1/completions", body)
    assert out["object"] == "text_completion"
    assert out["model"] == TINY_CHAT_MODEL
    [choice] = out["choices"]
    assert choice["finish_reason"] == "length"
    assert len(choice["text"].split()) == 7
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.completion(prompt))
    assert usage["completion_tokens"] == 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0

    ids = tokenizer.completion(unique_text(5))
    out = post(url + "/v1/completions", {"prompt": ids})  # no model: the served one
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert out["usage"]["completion_tokens"] == 16  # the default max_tokens

    text = unique_text(10)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    body = chat_body(text, max_completion_tokens=5, tools=tools, cache_salt="tenant-a")
    out = post(url + "/v1/chat/completions", body)
    assert out["object"] == "chat.completion"
    [choice] = out["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 5
    assert choice["finish_reason"] == "length"
    expected = tokenizer.chat([{"role": "user", "content": text}], tools=tools)
    assert out["usage"]["prompt_tokens"] == len(expected)
    assert out["usage"]["completion_tokens"] == 5

    continued = chat_body(
        text, add_generation_prompt=False, continue_final_message=True, max_tokens=2
    )
    continued["messages"].append({"role": "assistant", "content": "Sure, the answer"})
    out = post(url + "/v1/chat/completions", continued)
    expected = tokenizer.chat(
        continued["messages"], add_generation_prompt=False, continue_final_message=True
    )
    assert out["usage"]["prompt_tokens"] == len(expected)

    out = post(url + "/v1/completions", {"model": LORA, "prompt": prompt, "max_tokens": 1})
    assert out["model"] == LORA
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # another namespace


def test_streaming_chunks_done_and_usage(fleet: list[EngineProcess]) -> None:
    url = fleet[0].url
    body = chat_body(
        unique_text(5), max_tokens=64, stream=True, stream_options={"include_usage": True}
    )
    events = stream(url + "/v1/chat/completions", body)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(payload) for _, payload in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 64
    assert usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    content = [c for c in chunks[:-1] if c["choices"][0]["delta"].get("content")]
    assert len(content) >= 2
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1])
    assert len(text.split()) == 64
    # The first token is streamed when it is produced, well before the 63 decode steps end.
    first_at = next(t for t, p in events if '"content":" ' in p)
    assert events[-2][0] - first_at > 0.1

    body = {"prompt": unique_text(5), "max_tokens": 3, "stream": True}
    events = stream(url + "/v1/completions", body)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(payload) for _, payload in events[:-1]]
    assert len(chunks) >= 2
    assert all("usage" not in c for c in chunks)  # not asked for
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks).split() == ["the", "quick", "brown"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    events = stream(url + "/v1/completions", {**body, "max_tokens": 1})
    assert events[-1][1] == "[DONE]"
    assert json.loads(events[-2][1])["choices"][0]["finish_reason"] == "length"


def test_the_same_long_prompt_hits_the_prefix_cache_the_second_time(
    fleet: list[EngineProcess], tokenizer: RequestTokenizer
) -> None:
    body = chat_body(unique_text(60), max_tokens=4)
    prompt_tokens = len(tokenizer.chat(body["messages"]))
    assert prompt_tokens > 20 * BLOCK
    first = post(fleet[0].url + "/v1/chat/completions", body)
    second = post(fleet[0].url + "/v1/chat/completions", body)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (prompt_tokens - 1) // BLOCK * BLOCK  # whole blocks; last token recomputed
    # Another pod has not seen it.
    other = post(fleet[1].url + "/v1/chat/completions", body)
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_metrics_parse_and_counters_move(fleet: list[EngineProcess]) -> None:
    engine = fleet[0]
    before_text = metrics(engine)
    figures = parse_vllm_metrics(before_text)
    assert set(figures) == {"waiting", "running", "kv_usage"}
    assert 0.0 <= figures["kv_usage"] <= 1.0
    assert f'model_name="{TINY_CHAT_MODEL}"' in before_text
    assert 'engine="0"' in before_text
    before = counters(before_text)
    body = chat_body(unique_text(30), max_tokens=8)
    usage = post(engine.url + "/v1/chat/completions", body)["usage"]
    post(engine.url + "/v1/chat/completions", body)
    after = counters(metrics(engine))
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == (
        2 * usage["prompt_tokens"]
    )
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == 16
    assert after["vllm:prefix_cache_queries_total"] > before["vllm:prefix_cache_queries_total"]
    assert after["vllm:prefix_cache_hits_total"] > before["vllm:prefix_cache_hits_total"]
    assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == 2


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v1/chat/completions", chat_body("x") | {"model": "nope"}, 404, "does not exist"),
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "does not exist"),
        ("/v1/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "9"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "'n'"),
        ("/v1/completions", {"prompt": "x", "stream_options": {}}, 400, "stream"),
        ("/v1/completions", {"prompt": [1, 10**9]}, 400, "token"),
        ("/v1/completions", {"prompt": []}, 400, "empty"),
        ("/v1/completions", {"prompt": "x", "cache_salt": ""}, 400, "cache_salt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400, "maximum context"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "role"),
        ("/v1/chat/completions", chat_body("x") | {"tools": "no"}, 400, "tools"),
        ("/v1/chat/completions", chat_body("x") | {"chat_template_kwargs": 3}, 400, "kwargs"),
        (
            "/v1/chat/completions",
            chat_body("x") | {"add_generation_prompt": True, "continue_final_message": True},
            400,
            "continue_final_message",
        ),
        ("/v1/nothing", {}, 404, "Not Found"),
    ],
)
def test_bad_requests_get_openai_style_errors(
    fleet: list[EngineProcess], path: str, body: Any, status: int, fragment: str
) -> None:
    got, out = http("POST", fleet[0].url + path, body)
    assert got == status, out
    assert isinstance(out, dict), out
    error = out["error"]
    assert error["code"] == status
    assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    assert fragment.lower() in error["message"].lower()
    assert "Traceback" not in error["message"]


def test_wrong_method_is_a_json_405(fleet: list[EngineProcess]) -> None:
    status, out = http("GET", fleet[0].url + "/v1/completions")
    assert status == 405
    assert out["error"]["code"] == 405


# ---------------------------------------------------------------------------- KV events


def test_events_reach_the_index_under_the_routers_keys(
    fleet: list[EngineProcess], tokenizer: RequestTokenizer
) -> None:
    engine = fleet[1]
    with listening(engine) as (_listener, index):
        body = chat_body(unique_text(40), max_tokens=3)
        usage = post(engine.url + "/v1/chat/completions", body)["usage"]
        ids = tokenizer.chat(body["messages"])
        assert usage["prompt_tokens"] == len(ids)
        keys = index.keys(ids, engine.model)
        assert len(keys) == len(ids) // BLOCK > 10
        wait_for(lambda: matched_blocks(index, engine.pod, keys) == len(keys), "a full match")
        # A cache salt and a LoRA adapter each put the same tokens in another namespace.
        salted = post(engine.url + "/v1/chat/completions", body | {"cache_salt": "s1"})
        assert salted["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        salted_keys = index.keys(ids, engine.model, cache_salt="s1")
        wait_for(
            lambda: matched_blocks(index, engine.pod, salted_keys) == len(keys), "salted match"
        )
        post(engine.url + "/v1/chat/completions", body | {"model": LORA})
        lora_keys = index.keys(ids, engine.model, lora_name=LORA)
        wait_for(lambda: matched_blocks(index, engine.pod, lora_keys) == len(keys), "LoRA match")
        other = index.keys(tokenizer.chat(chat_body(unique_text(40))["messages"]), engine.model)
        assert matched_blocks(index, engine.pod, other) == 0
        assert_index_equals_truth(engine, index)


def test_dropped_batches_are_detected_and_replayed(
    fleet: list[EngineProcess], tokenizer: RequestTokenizer
) -> None:
    engine = fleet[1]
    with listening(engine) as (listener, index):
        gaps = listener.stats()["gaps"]
        assert post(engine.url + "/admin/drop_events", {"batches": 1})["dropping"] == 1
        body = chat_body(unique_text(30), max_tokens=40)  # decode steps store more blocks
        post(engine.url + "/v1/chat/completions", body)
        keys = index.keys(tokenizer.chat(body["messages"]), engine.model)
        wait_for(lambda: listener.stats()["gaps"] > gaps, "the gap to be detected")
        wait_for(lambda: matched_blocks(index, engine.pod, keys) == len(keys), "replay")
        stats = listener.stats()
        assert stats["replays"] >= 1
        assert stats["cleared_on_gap"] == 0
        status, engine_stats = http("GET", engine.url + "/admin/stats")
        assert status == 200
        assert engine_stats["dropped_batches"] >= 1
        assert_index_equals_truth(engine, index)


def test_restart_rewinds_the_sequence_and_clears_the_pod(
    fleet: list[EngineProcess], tokenizer: RequestTokenizer
) -> None:
    engine = fleet[1]
    with listening(engine) as (listener, index):
        before = chat_body(unique_text(20), max_tokens=2)
        post(engine.url + "/v1/chat/completions", before)
        old_keys = index.keys(tokenizer.chat(before["messages"]), engine.model)
        wait_for(lambda: matched_blocks(index, engine.pod, old_keys) == len(old_keys), "match")
        rewinds = listener.stats()["rewinds"]
        assert post(engine.url + "/admin/restart", {})["restarted"] is True
        assert truth(engine) == set()
        assert counters(metrics(engine))["vllm:prompt_tokens_total"] == 0
        after = chat_body(unique_text(20), max_tokens=2)
        post(engine.url + "/v1/chat/completions", after)
        new_keys = index.keys(tokenizer.chat(after["messages"]), engine.model)
        wait_for(lambda: listener.stats()["rewinds"] > rewinds, "the rewind")
        wait_for(lambda: matched_blocks(index, engine.pod, new_keys) == len(new_keys), "match")
        assert matched_blocks(index, engine.pod, old_keys) == 0
        assert listener.stats()["cleared_on_rewind"] >= 1
        # The old prompt is a cache miss on the restarted engine.
        again = post(engine.url + "/v1/chat/completions", before)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert_index_equals_truth(engine, index)


def test_truth_equals_the_index_and_reset_clears_both(fleet: list[EngineProcess]) -> None:
    engine = fleet[1]
    with listening(engine) as (_listener, index):
        shared = unique_text(20)
        for suffix in ("one", "two", "three"):
            body = chat_body(f"{shared} {suffix} " + unique_text(8), max_tokens=20)
            post(engine.url + "/v1/chat/completions", body)
        assert len(truth(engine)) > 10
        assert_index_equals_truth(engine, index)
        assert post(engine.url + "/admin/reset_prefix_cache", {})["reset"] is True
        assert truth(engine) == set()
        assert_index_equals_truth(engine, index)
        status, out = http("POST", engine.url + "/admin/drop_events", {"batches": -1})
        assert status == 400
        assert "batches" in out["error"]["message"]


# ---------------------------------------------------------------------------- process


def test_sigterm_with_a_request_in_flight_exits_0_promptly() -> None:
    [engine] = spawn_engines(1, prefix="term", speed=1.0)
    try:
        parts = urlsplit(engine.url)
        assert parts.hostname is not None and parts.port is not None
        conn = HTTPConnection(parts.hostname, parts.port, timeout=DEADLINE_S)
        try:
            body = chat_body("a long answer please", max_tokens=500, stream=True)
            conn.request("POST", "/v1/chat/completions", json.dumps(body))
            response = conn.getresponse()  # headers come at once; the stream is in flight
            assert response.status == 200
            engine.process.send_signal(signal.SIGTERM)
            assert engine.process.wait(timeout=5.0) == 0, engine_stderr(engine)
            assert "Traceback" not in engine_stderr(engine)
        finally:
            conn.close()
    finally:
        stop_engines([engine])


def test_closing_stdin_stops_the_engine() -> None:
    [engine] = spawn_engines(1, prefix="eof", extra_args=["--no-kv-events"])
    try:
        assert engine.kv_events is None and engine.replay is None
        assert engine.process.stdin is not None
        engine.process.stdin.close()
        assert engine.process.wait(timeout=5.0) == 0
    finally:
        stop_engines([engine])


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--speed", "-1"], "--speed"),
        (["--scale", "0"], "--scale"),
        (["--profile", "nope"], "unknown engine profile"),
        (["--num-gpu-blocks", "1"], "--num-gpu-blocks"),
        (["--port", "70000"], "--port"),
        (["--port", "many"], "--port"),
        (["--hash-algo", "md5"], "--hash-algo"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(args: list[str], fragment: str) -> None:
    command = [sys.executable, "-m", "kvaware_scorer.cli", "sim-engine", "--pod", "x", *args]
    result = subprocess.run(
        command, check=False, capture_output=True, timeout=30, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == b""
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "error" in lines[0]
    assert fragment in lines[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [([], "--pod"), (["--pod", "x", "--bogus"], "unrecognized arguments: --bogus")],
)
def test_missing_or_unknown_arguments_exit_2(args: list[str], fragment: str) -> None:
    command = [sys.executable, "-m", "kvaware_scorer.cli", "sim-engine", *args]
    result = subprocess.run(
        command, check=False, capture_output=True, timeout=30, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 2
    assert result.stdout == b""
    assert fragment in result.stderr.decode().strip().splitlines()[-1]


def test_a_port_in_use_exits_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = [
            *(sys.executable, "-m", "kvaware_scorer.cli", "sim-engine"),
            *("--pod", "x", "--port", str(port)),
        ]
        result = subprocess.run(
            command, check=False, capture_output=True, timeout=30, stdin=subprocess.DEVNULL
        )
    assert result.returncode == 1
    assert result.stdout == b""
    [line] = result.stderr.decode().strip().splitlines()
    assert "cannot start" in line


def test_spawn_failure_raises_with_the_engines_stderr() -> None:
    with pytest.raises(KVAwareError, match=r"(?s)did not start.*--speed"):
        spawn_engines(2, prefix="bad", speed=0.0)
