"""The Redis-shared index against a real redis-server (tests/redis_server.py).

* The whole behaviour suite of ``test_index.py`` runs again through a backend-parametrised
  fixture: ``memory`` (PrefixIndex) and ``redis``, where the index is a
  :class:`RedisPrefixIndex` writer whose every read (``match``, ``pods``, ``stats``,
  ``len``) is also answered by a :class:`RedisIndexReader` and compared, and whose Redis
  contents are compared with its memory after every read and at the end.
* Then what only the Redis backend has: the layout, escaping, config checks, Redis down at
  start-up and at run time, resync after Redis lost its data, takeover, Redis-side expiry
  of speculative entries, the reader's own speculation, concurrency, a randomised
  writer/reader agreement run, and the other HA mode (two listeners on the same pods).
"""

from __future__ import annotations

import inspect
import itertools
import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import redis
import test_index as behaviour
from builders import stored
from redis_server import RedisServer, redis_server_fixture  # noqa: F401  (the fixture)
from waiting import wait_for

from kvaware_scorer.errors import ConfigError, KVAwareError
from kvaware_scorer.events import AllBlocksCleared, BlockRemoved, EventBatch
from kvaware_scorer.index import PrefixIndex, PrefixMatch
from kvaware_scorer.listener import KVEventListener, PodSource
from kvaware_scorer.publisher import EventPublisher
from kvaware_scorer.redis_index import (
    RedisIndexReader,
    RedisPrefixIndex,
    redact_url,
    residency_snapshot,
)

_namespaces = itertools.count()
DEADLINE_S = 10.0


def fresh_namespace() -> str:
    return f"test-{next(_namespaces)}"


def removed(hashes: Sequence[int], medium: str | None = None) -> BlockRemoved:
    return BlockRemoved(list[int | bytes](hashes), medium)


def chain(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return [rng.randrange(150_000) for _ in range(n * 16)], [rng.getrandbits(64) for _ in range(n)]


# ---------------------------------------------------------------------------- checked writer

_READER_KWARGS = ("block_size", "hash_seed", "tier_weights", "other_tier_weight")


class CheckedWriter(RedisPrefixIndex):
    """A writer whose every read is answered by a reader too, and must agree."""

    reader: RedisIndexReader
    checked_reads = 0

    @classmethod
    def create(cls, url: str, **kwargs: Any) -> CheckedWriter:
        writer = cls(redis_url=url, namespace=fresh_namespace(), **kwargs)
        reader_kwargs = {k: v for k, v in kwargs.items() if k in _READER_KWARGS}
        writer.reader = RedisIndexReader(
            redis_url=url,
            namespace=writer.namespace,
            speculative_ttl_s=writer.speculative_ttl_s,
            **reader_kwargs,
        )
        return writer

    def check_contents(self) -> None:
        assert self.reader.snapshot() == residency_snapshot(self)

    def match(self, keys: Sequence[int], pods: Any = None) -> dict[str, PrefixMatch]:
        pods = None if pods is None else list(pods)
        mine = super().match(keys, pods)
        assert self.reader.match(keys, pods) == mine
        self.check_contents()
        self.checked_reads += 1
        return mine

    def pods(self) -> list[str]:
        mine = super().pods()
        assert self.reader.pods() == mine
        return mine

    def stats(self) -> dict[str, Any]:
        mine = super().stats()
        theirs = self.reader.stats()
        for name in ("entries", "pod_blocks", "speculative_keys"):
            assert theirs[name] == mine[name], name
        return mine

    def __len__(self) -> int:
        mine = super().__len__()
        assert self.reader.stats()["entries"] == mine
        return mine

    def close(self) -> None:
        super().close()
        self.reader.close()


class Backend:
    """Makes indexes of one kind; ``finish()`` checks and closes what it made."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self.made: list[PrefixIndex] = []

    def make(self, **kwargs: Any) -> PrefixIndex:
        index = (
            PrefixIndex(**kwargs)
            if self.kind == "memory"
            else CheckedWriter.create(self.url, **kwargs)
        )
        self.made.append(index)
        return index

    def finish(self, *, check: bool) -> None:
        try:
            for index in self.made:
                if check and isinstance(index, CheckedWriter):
                    index.check_contents()
        finally:
            for index in self.made:
                if isinstance(index, RedisPrefixIndex):
                    index.close()


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    url = ""
    if request.param == "redis":
        url = request.getfixturevalue("redis_server").url
    made = Backend(request.param, url)
    failed = True
    try:
        yield made
        failed = False
    finally:
        made.finish(check=not failed)


def _behaviour_cases() -> list[Any]:
    cases = []
    for name, func in sorted(vars(behaviour).items()):
        if not name.startswith("test_") or not callable(func):
            continue
        combos: list[dict[str, Any]] = [{}]
        for mark in getattr(func, "pytestmark", []):
            if mark.name != "parametrize":
                continue
            argnames, argvalues = mark.args[0], mark.args[1]
            names = (
                [n.strip() for n in argnames.split(",")]
                if isinstance(argnames, str)
                else list(argnames)
            )
            rows = [tuple(v) if len(names) > 1 else (v,) for v in argvalues]
            combos = [{**c, **dict(zip(names, row, strict=True))} for c in combos for row in rows]
        for combo in combos:
            suffix = "-".join(str(v) for v in combo.values())
            cases.append(pytest.param(name, combo, id=f"{name}[{suffix}]" if suffix else name))
    return cases


@pytest.mark.parametrize(("name", "params"), _behaviour_cases())
def test_index_behaviour_on_backend(
    name: str,
    params: dict[str, Any],
    backend: Backend,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every test of test_index.py, with its PrefixIndex made by the backend."""
    monkeypatch.setattr(behaviour, "PrefixIndex", backend.make)
    func = getattr(behaviour, name)
    kwargs = dict(params)
    for arg in inspect.signature(func).parameters:
        if arg not in kwargs:
            kwargs[arg] = request.getfixturevalue(arg)
    func(**kwargs)


def test_behaviour_suite_is_collected() -> None:
    names = {p.values[0] for p in _behaviour_cases()}
    assert "test_scenarios_step_by_step" in names
    assert "test_speculative_entries_score_then_confirm_or_expire" in names
    assert len(names) >= 20


def test_conformance_scenarios_read_through_both(
    vectors: dict[str, Any], redis_server: RedisServer
) -> None:
    """The scenario cases step by step: writer and reader agree after every step."""
    backend = Backend("redis", redis_server.url)
    try:
        for case_no in range(len(vectors["scenario_cases"])):
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(behaviour, "PrefixIndex", backend.make)
                behaviour.test_scenarios_step_by_step(vectors, case_no)
        reads = sum(getattr(i, "checked_reads", 0) for i in backend.made)
        steps = sum(
            1 for case in vectors["scenario_cases"] for s in case["steps"] if s["batch_input"]
        )
        assert reads == steps
    finally:
        backend.finish(check=True)


# ---------------------------------------------------------------------------- helpers


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing.close()


def writer_and_reader(
    url: str, closing: list[Any], **kwargs: Any
) -> tuple[RedisPrefixIndex, RedisIndexReader]:
    namespace = kwargs.pop("namespace", None) or fresh_namespace()
    reader_kwargs = kwargs.pop("reader_kwargs", {})
    writer = RedisPrefixIndex(redis_url=url, namespace=namespace, default_model="m", **kwargs)
    closing.append(writer)
    reader = RedisIndexReader(
        redis_url=url,
        namespace=namespace,
        block_size=writer.block_size,
        hash_seed=writer.hasher.hash_seed,
        **reader_kwargs,
    )
    closing.append(reader)
    return writer, reader


def agree(
    writer: PrefixIndex, reader: RedisIndexReader, keys: list[int], pods: list[str] | None = None
) -> dict[str, PrefixMatch]:
    mine = writer.match(keys, pods)
    assert reader.match(keys, pods) == mine
    return mine


def raw_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, protocol=2)


# ---------------------------------------------------------------------------- layout


def test_redis_layout(url: str, closing: list[Any]) -> None:
    writer, reader = writer_and_reader(url, closing)
    tokens, hashes = chain(2)
    writer.apply("a", [stored(hashes, tokens)])
    writer.apply("b", [stored(hashes[:1], tokens[:16], medium="CPU")], rank=1)
    keys = writer.keys(tokens, "m")
    before = int(time.time() * 1000)
    writer.add_speculative("c", keys[:1])
    ns = writer.namespace
    client = raw_client(url)
    try:
        assert client.get(f"{ns}:r:{keys[0]:016x}") == b"a|0|gpu\nb|1|cpu"
        assert client.get(f"{ns}:r:{keys[1]:016x}") == b"a|0|gpu"
        spec = client.get(f"{ns}:s:{keys[0]:016x}")
        assert isinstance(spec, bytes)
        pod, rank, deadline = spec.split(b"|")
        assert (pod, rank) == (b"c", b"0")
        assert before + 2000 <= int(deadline) <= int(time.time() * 1000) + 2000
        assert 0 < client.pttl(f"{ns}:s:{keys[0]:016x}") <= 2000
        assert client.exists(f"{ns}:s:{keys[1]:016x}") == 0
        meta = client.hgetall(f"{ns}:meta")
        assert meta[b"format"] == b"1" and meta[b"block_size"] == b"16"
        assert meta[b"hash_seed"] == b"" and meta[b"writer"] == writer.writer_id.encode()
        assert client.hgetall(f"{ns}:pods") == {b"a": b"2", b"b": b"1", b"c": b"0"}
        stats = client.hgetall(f"{ns}:stats")
        assert stats[b"entries"] == b"2" and stats[b"speculative_keys"] == b"1"
        # Confirmation by a store removes the speculative string.
        writer.apply("c", [stored(hashes[:1], tokens[:16])])
        assert client.exists(f"{ns}:s:{keys[0]:016x}") == 0
        assert client.get(f"{ns}:r:{keys[0]:016x}") == b"a|0|gpu\nb|1|cpu\nc|0|gpu"
        # Every pod removed: nothing left but meta and stats.
        for name in ("a", "b", "c"):
            writer.remove_pod(name)
        assert sorted(client.scan_iter(f"{ns}:*")) == sorted(
            f"{ns}:{k}".encode() for k in ("meta", "stats")
        )
    finally:
        client.close()
    assert reader.pods() == []


def test_pod_and_tier_names_are_escaped(url: str, closing: list[Any]) -> None:
    writer, reader = writer_and_reader(url, closing)
    tokens, hashes = chain(3)
    odd = "10.0.0.5:8000|x%0A%\nend"
    writer.apply(odd, [stored(hashes[:2], tokens[:32])], rank=2)
    writer.apply(odd, [stored(hashes[2:], tokens[32:], parent=hashes[1], medium="Disk|2%")], rank=2)
    keys = writer.keys(tokens, "m")
    result = agree(writer, reader, keys)
    assert result[odd].matched_blocks == 3 and result[odd].rank == 2
    assert result[odd].blocks_by_tier == {"gpu": 2, "disk|2%": 1}
    assert reader.pods() == [odd]
    assert reader.snapshot() == residency_snapshot(writer)
    assert "disk|2%" in {t for m in residency_snapshot(writer).values() for _, _, t in m}


def test_redact_url() -> None:
    assert redact_url("redis://:s3cret@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert redact_url("redis://user:pw@h/1") == "redis://user:***@h/1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


# ---------------------------------------------------------------------------- configuration


def test_reader_refuses_other_block_size_or_seed(url: str, closing: list[Any]) -> None:
    writer, _ = writer_and_reader(url, closing, hash_seed="s1")
    with pytest.raises(ConfigError, match=r"block_size '16'.*block_size 32"):
        RedisIndexReader(redis_url=url, namespace=writer.namespace, block_size=32, hash_seed="s1")
    with pytest.raises(ConfigError, match=r"hash_seed 's1'.*hash_seed 'other'"):
        RedisIndexReader(redis_url=url, namespace=writer.namespace, hash_seed="other")
    ok = RedisIndexReader(redis_url=url, namespace=writer.namespace, hash_seed="s1")
    closing.append(ok)
    # The same tokens give the same keys on both sides only with the same settings.
    tokens, _ = chain(2)
    assert ok.keys(tokens, "m") == writer.keys(tokens, "m")


def test_reader_sees_a_reconfigured_writer_as_no_matches(
    url: str, closing: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    writer, reader = writer_and_reader(url, closing)
    tokens, hashes = chain(2)
    writer.apply("a", [stored(hashes, tokens)])
    keys = reader.keys(tokens, "m")
    assert reader.match(keys, ["a"])["a"].matched_blocks == 2
    writer.close()
    other = RedisPrefixIndex(redis_url=url, namespace=writer.namespace, block_size=32)
    closing.append(other)
    with caplog.at_level(logging.WARNING, "kvaware_scorer.redis_index"):
        for _ in range(3):
            assert reader.match(keys, ["a"])["a"].matched_blocks == 0
    assert reader.counters["config_mismatch"] == 3
    assert sum("block_size '32'" in r.getMessage() for r in caplog.records) == 1


def test_reader_before_any_writer(url: str, closing: list[Any]) -> None:
    namespace = fresh_namespace()
    reader = RedisIndexReader(redis_url=url, namespace=namespace)
    closing.append(reader)
    tokens, hashes = chain(2)
    keys = reader.keys(tokens, "m")
    assert reader.match(keys, ["a"])["a"].matched_blocks == 0
    assert reader.match(keys) == {}
    assert reader.counters["no_writer"] == 2
    writer = RedisPrefixIndex(redis_url=url, namespace=namespace, default_model="m")
    closing.append(writer)
    writer.apply("a", [stored(hashes, tokens)])
    assert agree(writer, reader, keys)["a"].matched_blocks == 2


def test_unreachable_redis_at_start_names_the_url(tmp_path: Any) -> None:
    probe = RedisServer(tmp_path)
    probe.start()
    port = probe.port
    probe.stop()  # nothing listens there now
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    for make in (
        lambda: RedisPrefixIndex(redis_url=url, redis_timeout_s=0.5),
        lambda: RedisIndexReader(redis_url=url, timeout_s=0.5),
    ):
        with pytest.raises(KVAwareError) as info:
            make()
        message = str(info.value)
        assert f"redis://:***@127.0.0.1:{port}/0" in message and "hunter2" not in message


def test_bad_namespace_url_and_settings_are_refused(url: str) -> None:
    for namespace in ("", "a:b", "kv*", "has space"):
        with pytest.raises(ConfigError, match="namespace"):
            RedisIndexReader(redis_url=url, namespace=namespace)
    with pytest.raises(ConfigError, match="redis_url"):
        RedisIndexReader(redis_url="http://127.0.0.1:1/0")
    with pytest.raises(ConfigError):
        RedisPrefixIndex(redis_url=url, flush_chunk_keys=0)
    with pytest.raises(ConfigError, match="tier weight"):
        RedisIndexReader(redis_url=url, tier_weights={"gpu": 1.5})


def test_namespaces_are_isolated_and_a_new_writer_starts_empty(
    url: str, closing: list[Any]
) -> None:
    tokens, hashes = chain(2)
    first, reader = writer_and_reader(url, closing)
    other, other_reader = writer_and_reader(url, closing, namespace=first.namespace + "x")
    first.apply("a", [stored(hashes, tokens)])
    other.apply("b", [stored(hashes, tokens)])
    keys = reader.keys(tokens, "m")
    assert set(reader.match(keys)) == {"a"} and set(other_reader.match(keys)) == {"b"}
    first.close()
    # A restarted writer starts from an empty index, and so does Redis.
    again = RedisPrefixIndex(redis_url=url, namespace=first.namespace, default_model="m")
    closing.append(again)
    assert reader.match(keys) == {} and reader.snapshot() == {}
    assert other_reader.match(keys)["b"].matched_blocks == 2


def test_second_writer_takes_over_and_the_first_stops(
    url: str, closing: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    tokens, hashes = chain(3)
    first, reader = writer_and_reader(url, closing)
    second = RedisPrefixIndex(redis_url=url, namespace=first.namespace, default_model="m")
    closing.append(second)
    second.apply("b", [stored(hashes, tokens)])
    with caplog.at_level(logging.ERROR, "kvaware_scorer.redis_index"):
        # The stale writer's next transaction lands, then it sees the other id and stops.
        first.apply("a", [stored(hashes, tokens)])
        first.apply("a", [removed(hashes[:1])])
    assert first.stats()["counters"]["redis_writer_conflicts"] == 1
    assert not first.stats()["redis"]["writing"]
    assert any("exactly one writer" in r.getMessage() for r in caplog.records)
    keys = reader.keys(tokens, "m")
    # The one stale transaction is visible until the owner's next write...
    assert reader.match(keys)["a"].matched_blocks == 3
    # The owner rewrites the namespace at its next write: Redis is its own state again.
    second.apply("b", [removed(hashes[2:])])
    assert second.stats()["counters"]["redis_resyncs"] == 1
    assert reader.match(keys, ["a"])["a"].matched_blocks == 0
    assert reader.pods() == ["b"]
    assert reader.snapshot() == residency_snapshot(second)
    assert agree(second, reader, keys)["b"].matched_blocks == 2


# ---------------------------------------------------------------------------- Redis down


@pytest.fixture
def own_server(tmp_path: Any) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "own") as server:
        yield server


def test_reader_answers_without_redis_and_recovers(
    own_server: RedisServer, closing: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    writer, reader = writer_and_reader(
        own_server.url,
        closing,
        retry_interval_s=0.0,
        reader_kwargs={"retry_interval_s": 5.0, "clock": lambda: now[0], "timeout_s": 0.5},
    )
    tokens, hashes = chain(4)
    writer.apply("a", [stored(hashes, tokens)])
    keys = reader.keys(tokens, "m")
    assert reader.match(keys, ["a", "b"])["a"].matched_blocks == 4
    own_server.stop()
    with caplog.at_level(logging.WARNING, "kvaware_scorer.redis_index"):
        for _ in range(5):
            result = reader.match(keys, ["a", "b"])
            assert set(result) == {"a", "b"}
            assert all(m.matched_blocks == 0 and m.score == 0.0 for m in result.values())
            assert reader.match(keys) == {}
            now[0] += 1.0
        assert reader.pods() == []
        assert reader.stats()["redis_ok"] is False
    assert reader.counters["redis_errors"] >= 1
    assert reader.counters["skipped_redis_down"] >= 5
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
    # Redis comes back empty: the writer writes everything again at its next batch.
    own_server.restart()
    now[0] += 10.0
    writer.apply("b", [stored(hashes[:2], tokens[:32])])
    assert writer.stats()["counters"]["redis_resyncs"] == 1
    result = agree(writer, reader, keys)
    assert result["a"].matched_blocks == 4 and result["b"].matched_blocks == 2
    assert reader.snapshot() == residency_snapshot(writer)


def test_writer_keeps_pending_changes_while_redis_is_down(
    own_server: RedisServer, closing: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    writer, reader = writer_and_reader(
        own_server.url, closing, retry_interval_s=0.0, redis_timeout_s=0.5
    )
    tokens, hashes = chain(6)
    writer.apply("a", [stored(hashes[:2], tokens[:32])])
    own_server.stop()
    with caplog.at_level(logging.WARNING, "kvaware_scorer.redis_index"):
        writer.apply("a", [stored(hashes[2:], tokens[32:], parent=hashes[1])])
        writer.apply("b", [stored(hashes[:3], tokens[:48])])
        writer.add_speculative("c", writer.keys(tokens, "m"))
    keys = writer.keys(tokens, "m")
    assert writer.match(keys)["a"].matched_blocks == 6  # memory is unaffected
    stats = writer.stats()
    assert stats["counters"]["redis_errors"] >= 1 and stats["redis"]["pending_keys"] == 6
    assert sum("cannot write" in r.getMessage() for r in caplog.records) == 1
    own_server.restart()
    assert writer.flush()
    assert writer.stats()["redis"]["pending_keys"] == 0
    assert reader.snapshot() == residency_snapshot(writer)
    assert agree(writer, reader, keys)["c"].blocks_by_tier == {"speculative": 6}


def test_idle_writer_heartbeats_and_rewrites_after_a_redis_restart(
    own_server: RedisServer, closing: list[Any]
) -> None:
    now = [1000.0]
    writer, reader = writer_and_reader(
        own_server.url, closing, retry_interval_s=0.0, heartbeat_s=0.0, wall_clock=lambda: now[0]
    )
    tokens, hashes = chain(3)
    writer.apply("a", [stored(hashes, tokens)])
    now[0] += 30.0
    assert reader.stats()["writer_updated_age_s"] == pytest.approx(time.time() - 1000.0, abs=5)
    writer.expire_speculative()  # what the listener calls every 50 ms
    flushes = writer.stats()["counters"]["redis_flushes"]
    updated = raw_client(own_server.url)
    try:
        assert updated.hget(f"{writer.namespace}:stats", "updated_ms") == b"1030000"
    finally:
        updated.close()
    # Redis restarts empty while no event arrives: the next heartbeat notices.
    own_server.restart()
    writer.expire_speculative()
    assert writer.stats()["counters"]["redis_resyncs"] == 1
    assert writer.stats()["counters"]["redis_flushes"] > flushes
    assert reader.snapshot() == residency_snapshot(writer)
    assert agree(writer, reader, writer.keys(tokens, "m"))["a"].matched_blocks == 3


def test_writer_retries_a_failed_write_without_resync(
    url: str, closing: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, reader = writer_and_reader(url, closing, retry_interval_s=0.0)
    tokens, hashes = chain(4)
    writer.apply("a", [stored(hashes[:2], tokens[:32])])
    real_call = writer._link.call
    failing = [True]

    def flaky(commands: Sequence[bytes]) -> list[Any]:
        if failing[0]:
            failing[0] = False
            raise redis.exceptions.ConnectionError("injected")
        return real_call(commands)

    monkeypatch.setattr(writer._link, "call", flaky)
    writer.apply("a", [stored(hashes[2:], tokens[32:], parent=hashes[1])])
    assert writer.stats()["redis"]["pending_keys"] == 2
    writer.apply("a", [removed(hashes[:1])])
    counters = writer.stats()["counters"]
    assert counters["redis_errors"] == 1 and "redis_resyncs" not in counters
    keys = writer.keys(tokens, "m")
    assert agree(writer, reader, keys)["a"].matched_blocks == 0
    assert reader.snapshot() == residency_snapshot(writer)


# ---------------------------------------------------------------------------- speculation


def test_speculative_entries_expire_in_redis_without_the_writer(
    url: str, closing: list[Any]
) -> None:
    frozen = [50.0]
    offset = [0.0]
    writer, reader = writer_and_reader(
        url,
        closing,
        clock=lambda: frozen[0],
        reader_kwargs={"wall_clock": lambda: time.time() + offset[0]},
    )
    tokens, hashes = chain(4)
    keys = writer.keys(tokens, "m")
    writer.apply("a", [stored(hashes[:1], tokens[:16])])
    writer.add_speculative("b", keys)
    assert agree(writer, reader, keys)["b"].blocks_by_tier == {"speculative": 4}
    # The writer's clock stands still (it never expires them); the readers' does not.
    offset[0] = 2.5
    assert writer.match(keys)["b"].matched_blocks == 4
    assert reader.match(keys)["b"].matched_blocks == 0
    assert reader.match(keys)["a"].matched_blocks == 1
    live = {
        k: frozenset(x for x in m if x[2] != "speculative")
        for k, m in residency_snapshot(writer).items()
    }
    assert reader.snapshot() == {k: m for k, m in live.items() if m}
    # The writer's own expiry (its injectable clock) removes them from Redis too.
    frozen[0] += 2.5
    writer.expire_speculative()
    offset[0] = 0.0
    assert agree(writer, reader, keys)["b"].matched_blocks == 0
    assert reader.snapshot() == residency_snapshot(writer)


def test_redis_drops_lapsed_speculative_strings_itself(url: str, closing: list[Any]) -> None:
    writer, reader = writer_and_reader(url, closing, speculative_ttl_s=0.2, clock=lambda: 0.0)
    tokens, hashes = chain(3)
    keys = writer.keys(tokens, "m")
    writer.apply("a", [stored(hashes[:1], tokens[:16])])
    writer.add_speculative("b", keys)
    client = raw_client(url)
    names = [f"{writer.namespace}:s:{k:016x}" for k in keys]
    try:
        assert client.exists(*names) == 3
        wait_for(lambda: client.exists(*names) == 0, "Redis to expire the s-strings", 5.0)
        assert client.exists(f"{writer.namespace}:r:{keys[0]:016x}") == 1
    finally:
        client.close()
    assert reader.match(keys)["b"].matched_blocks == 0
    assert writer.match(keys)["b"].matched_blocks == 3  # its clock never moved


def test_reader_speculation_is_local_and_confirmed_by_events(url: str, closing: list[Any]) -> None:
    now = [0.0]
    writer, reader = writer_and_reader(url, closing, reader_kwargs={"clock": lambda: now[0]})
    other = RedisIndexReader(redis_url=url, namespace=writer.namespace)
    closing.append(other)
    tokens, hashes = chain(4)
    keys = reader.keys(tokens, "m")
    reader.add_speculative("a", keys)
    result = reader.match(keys, ["a"])["a"]
    assert result.matched_blocks == 4 and result.blocks_by_tier == {"speculative": 4}
    assert other.match(keys, ["a"])["a"].matched_blocks == 0
    writer.apply("a", [stored(hashes[:2], tokens[:32], medium="CPU")])
    assert reader.match(keys, ["a"])["a"].blocks_by_tier == {"cpu": 2, "speculative": 2}
    now[0] += 1.0
    reader.add_speculative("a", keys[:1], rank=1)
    now[0] += 1.5  # the first entries lapsed, the rank-1 one has not
    reader.expire_speculative()
    assert reader.stats()["local_speculative_keys"] == 1
    result = reader.match(keys, ["a"])["a"]
    assert result.blocks_by_tier == {"cpu": 2} and result.rank == 0
    reader.remove_pod("a")
    assert reader.stats()["local_speculative_keys"] == 0
    reader.set_pod("a", model="m", capacity=10)  # accepted, nothing to do


# ---------------------------------------------------------------------------- agreement


def test_random_operations_writer_and_reader_agree(url: str, closing: list[Any]) -> None:
    """A seeded random mix of every write, with reads through both after each one."""
    writer, reader = writer_and_reader(
        url,
        closing,
        pod_capacity=40,
        tier_weights={"gpu": 1.0, "cpu": 0.8, "disk": 0.3},
        reader_kwargs={"tier_weights": {"gpu": 1.0, "cpu": 0.8, "disk": 0.3}},
    )
    rng = random.Random(1234)
    prompts = [chain(12, seed=s) for s in range(4)]
    pods = ["p0", "p1", "p2", "p3"]
    held: dict[tuple[str, int], list[int]] = {}
    for step in range(250):
        tokens, hashes = rng.choice(prompts)
        pod, rank = rng.choice(pods), rng.randrange(2)
        op = rng.random()
        if op < 0.45:
            lo = rng.randrange(0, 8)
            hi = rng.randrange(lo + 1, 13)
            medium = rng.choice(["GPU", "GPU", "CPU", "DISK"])
            parent = hashes[lo - 1] if lo else None
            writer.apply(
                pod,
                [stored(hashes[lo:hi], tokens[lo * 16 : hi * 16], parent=parent, medium=medium)],
                rank=rank,
            )
            held.setdefault((pod, rank), []).extend(hashes[lo:hi])
        elif op < 0.7 and held.get((pod, rank)):
            victims = rng.sample(held[(pod, rank)], min(3, len(held[(pod, rank)])))
            writer.apply(pod, [removed(victims, rng.choice(["GPU", "CPU", None]))], rank=rank)
        elif op < 0.85:
            writer.add_speculative(pod, writer.keys(tokens, "m")[: rng.randrange(1, 13)], rank=rank)
        elif op < 0.92:
            writer.apply(pod, [AllBlocksCleared()], rank=rank)
        elif op < 0.96:
            writer.remove_pod(pod)
        else:
            writer.set_pod(pod, capacity=rng.randrange(5, 40))
        keys = writer.keys(tokens, "m")
        agree(writer, reader, keys)
        agree(writer, reader, keys, rng.sample([*pods, "zz"], 3))
        agree(writer, reader, keys[: rng.randrange(0, 13)], pods)
        if step % 25 == 0:
            assert reader.snapshot() == residency_snapshot(writer)
    assert reader.snapshot() == residency_snapshot(writer)
    assert writer.stats()["counters"].get("evicted_capacity", 0) > 0


def test_concurrent_writes_are_mirrored(url: str, closing: list[Any]) -> None:
    writer, reader = writer_and_reader(url, closing)
    prompts = [chain(16, seed=s) for s in range(6)]
    errors: list[BaseException] = []

    def events() -> None:
        try:
            for i in range(120):
                tokens, hashes = prompts[i % len(prompts)]
                pod = f"p{i % 3}"
                if i % 5 == 4:
                    writer.apply(pod, [removed(hashes[8:])])
                else:
                    writer.apply(pod, [stored(hashes, tokens)])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def routes() -> None:
        try:
            for i in range(120):
                tokens, _ = prompts[(i * 7) % len(prompts)]
                writer.add_speculative(f"p{i % 4}", writer.keys(tokens, "m"))
                reader.match(writer.keys(tokens, "m"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=events), threading.Thread(target=routes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    assert writer.flush()
    assert reader.snapshot() == residency_snapshot(writer)
    for tokens, _ in prompts:
        agree(writer, reader, writer.keys(tokens, "m"))


def test_large_batches_are_written_in_chunks(url: str, closing: list[Any]) -> None:
    writer, reader = writer_and_reader(url, closing, flush_chunk_keys=7)
    tokens, hashes = chain(50)
    writer.apply("a", [stored(hashes, tokens)])
    assert writer.stats()["counters"]["redis_flushes"] >= 8
    keys = writer.keys(tokens, "m")
    assert agree(writer, reader, keys)["a"].matched_blocks == 50
    writer.apply("a", [AllBlocksCleared()])
    assert agree(writer, reader, keys)["a"].matched_blocks == 0
    assert reader.snapshot() == {}


def test_reader_reads_all_pods_and_stats(url: str, closing: list[Any]) -> None:
    writer, reader = writer_and_reader(url, closing)
    tokens, hashes = chain(3)
    writer.apply("a", [stored(hashes, tokens)])
    writer.apply("b", [stored(hashes, tokens)], rank=1)
    writer.set_pod("idle", model="m")
    writer.add_speculative("idle", [])
    keys = reader.keys(tokens, "m")
    result = agree(writer, reader, keys)
    assert set(result) == {"a", "b"} and result["b"].rank == 1
    assert agree(writer, reader, []) == writer.match([])
    assert agree(writer, reader, [], ["a"]) == {"a": PrefixMatch("a", 0, 0, 16, 0.0, {}, 0)}
    stats = reader.stats()
    assert stats["redis_ok"] and stats["entries"] == 3 and stats["writer"] == writer.writer_id
    assert stats["pod_blocks"] == {"a": 3, "b": 3}
    assert stats["counters"]["reads"] >= 2


def test_reader_never_fails_a_route_on_bad_data(url: str, closing: list[Any]) -> None:
    writer, reader = writer_and_reader(url, closing)
    tokens, hashes = chain(2)
    writer.apply("a", [stored(hashes, tokens)])
    keys = reader.keys(tokens, "m")
    client = raw_client(url)
    try:
        client.set(f"{writer.namespace}:r:{keys[0]:016x}", b"garbage-without-fields")
        result = reader.match(keys, ["a"])
        assert result["a"].matched_blocks == 0 and reader.counters["bad_values"] == 1
        client.delete(f"{writer.namespace}:meta")
        client.hset(f"{writer.namespace}:meta", "format", "1")  # wrong type would also do
        assert reader.match(keys, ["a"])["a"].matched_blocks == 0
        assert reader.counters["config_mismatch"] == 1
    finally:
        client.close()
    assert reader.match([-1, 2**64], ["a"])["a"].matched_blocks == 0
    assert reader.counters["bad_keys"] == 1


# ---------------------------------------------------------------------------- the other HA mode


def test_two_listeners_on_the_same_pods_end_identical(url: str, closing: list[Any]) -> None:
    """Each replica runs its own listener (connect mode) and index: same contents."""
    writer = RedisPrefixIndex(redis_url=url, namespace=fresh_namespace(), default_model="m")
    closing.append(writer)
    reader = RedisIndexReader(redis_url=url, namespace=writer.namespace)
    closing.append(reader)
    plain = PrefixIndex(default_model="m")
    expected = PrefixIndex(default_model="m")
    pub_a = EventPublisher("tcp://127.0.0.1:0", bind=True, replay_endpoint="tcp://127.0.0.1:0")
    pub_b = EventPublisher("tcp://127.0.0.1:0", bind=True)
    started: list[Any] = []
    try:
        for pub in (pub_a, pub_b):
            pub.start()
            started.append(pub)
        listeners = [KVEventListener(writer), KVEventListener(plain)]
        for listener in listeners:
            listener.start()
            started.append(listener)
            listener.add_pod(
                PodSource("pod-a", pub_a.endpoint, replay_endpoint=pub_a.replay_endpoint)
            )
            listener.add_pod(PodSource("pod-b", pub_b.endpoint))
        for pub, pod in ((pub_a, "pod-a"), (pub_b, "pod-b")):
            for _ in range(400):
                pub.publish(EventBatch(ts=time.time(), events=[AllBlocksCleared()]))
                expected.apply(pod, [AllBlocksCleared()])
                pub.flush()
                time.sleep(0.02)
                if all(pod in listener.index.pods() for listener in listeners):
                    break
            else:
                raise AssertionError(f"listeners never heard from {pod}")

        tokens, hashes = chain(12, seed=5)
        other_tokens, other_hashes = chain(6, seed=6)

        def send(pub: EventPublisher, pod: str, events: list[Any], deliver: bool = True) -> None:
            pub.publish(EventBatch(ts=time.time(), events=events), deliver=deliver)
            expected.apply(pod, events)

        send(pub_a, "pod-a", [stored(hashes[:4], tokens[:64])])
        send(pub_a, "pod-a", [stored(hashes[4:8], tokens[64:128], parent=hashes[3])], deliver=False)
        send(pub_a, "pod-a", [stored(hashes[8:], tokens[128:], parent=hashes[7])])
        send(pub_a, "pod-a", [removed(hashes[10:])])
        send(pub_a, "pod-a", [stored(hashes[:2], [], block_size=0, medium="CPU")])
        send(pub_b, "pod-b", [stored(other_hashes, other_tokens)])
        send(pub_b, "pod-b", [stored(hashes[:3], tokens[:48])])
        send(pub_b, "pod-b", [removed(other_hashes[3:])])
        send(pub_b, "pod-b", [AllBlocksCleared()])
        send(pub_b, "pod-b", [stored(hashes[:6], tokens[:96])])
        for pub in (pub_a, pub_b):
            pub.flush()
        want = residency_snapshot(expected)
        assert want  # the scenario leaves something to compare
        wait_for(
            lambda: residency_snapshot(writer) == want and residency_snapshot(plain) == want,
            "both listeners to converge",
        )
        assert writer.flush()
        assert reader.snapshot() == want
        assert all(listener.stats()["replays"] >= 1 for listener in listeners)
        for keys in (writer.keys(tokens, "m"), writer.keys(other_tokens, "m")):
            result = expected.match(keys)
            assert writer.match(keys) == result == plain.match(keys) == reader.match(keys)
    finally:
        for thing in reversed(started):
            thing.stop()
