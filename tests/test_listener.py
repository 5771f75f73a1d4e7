"""KVEventListener over real ZeroMQ sockets: bind and connect modes, gaps, replay,
rewinds, DP ranks, bad input and shutdown."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from builders import stored
from waiting import wait_for

from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.events import EventBatch
from kvaware_scorer.index import PrefixIndex
from kvaware_scorer.listener import KVEventListener, PodSource
from kvaware_scorer.publisher import EventPublisher
from kvaware_scorer.wire import encode_frames

DEADLINE_S = 10.0


class Chain:
    """A deterministic prompt split into 16-token blocks with fake engine hashes."""

    def __init__(self, blocks: int, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.tokens = [rng.randrange(150_000) for _ in range(blocks * 16)]
        self.hashes = [rng.getrandbits(64) for _ in range(blocks)]

    def batch(self, lo: int, hi: int) -> EventBatch:
        event = stored(
            self.hashes[lo:hi],
            self.tokens[lo * 16 : hi * 16],
            parent=self.hashes[lo - 1] if lo else None,
        )
        return EventBatch(ts=time.time(), events=[event])


@pytest.fixture
def index() -> PrefixIndex:
    return PrefixIndex(block_size=16, default_model="m")


@pytest.fixture
def cleanup() -> Iterator[list[Any]]:
    things: list[Any] = []
    before = set(threading.enumerate())
    yield things
    for thing in reversed(things):
        thing.stop()
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not leaked, f"threads leaked: {leaked}"


def matched(index: PrefixIndex, chain: Chain, pod: str) -> int:
    return index.match(index.keys(chain.tokens, "m"), [pod])[pod].matched_blocks


def tcp_publisher(topic: str = "", replay: bool = True) -> EventPublisher:
    return EventPublisher(
        "tcp://127.0.0.1:0",
        bind=True,
        replay_endpoint="tcp://127.0.0.1:0" if replay else None,
        topic=topic,
    )


def test_bind_mode_pod_and_model_from_topic(index: PrefixIndex, cleanup: list[Any]) -> None:
    listener = KVEventListener(index, bind=["tcp://127.0.0.1:0"])
    listener.start()
    cleanup.append(listener)
    pub = EventPublisher(listener.bound_endpoints[0], topic="kv@10.0.0.7:8000@llama")
    pub.start()
    cleanup.append(pub)
    assert pub.wait_subscribed()
    chain = Chain(4)
    pub.publish(chain.batch(0, 2))
    pub.publish(chain.batch(2, 4))
    wait_for(lambda: listener.stats()["batches"] == 2, "two batches")
    keys = index.keys(chain.tokens, "llama")
    assert index.match(keys)["10.0.0.7:8000"].matched_blocks == 4


def test_connect_mode_with_dp_ranks(index: PrefixIndex, cleanup: list[Any]) -> None:
    ctx_probe = zmq.Context()
    base = 0
    for _ in range(50):  # find two adjacent free ports, as vLLM offsets rank r to port + r
        s0, s1 = ctx_probe.socket(zmq.PUB), ctx_probe.socket(zmq.PUB)
        try:
            base = s0.bind_to_random_port("tcp://127.0.0.1")
            s1.bind(f"tcp://127.0.0.1:{base + 1}")
            break
        except zmq.ZMQError:
            continue
        finally:
            s0.close(linger=0)
            s1.close(linger=0)
    ctx_probe.term()
    pubs = []
    for rank in range(2):
        pub = EventPublisher(f"tcp://127.0.0.1:{base + rank}", bind=True, data_parallel_rank=rank)
        pub.start()
        cleanup.append(pub)
        pubs.append(pub)
    listener = KVEventListener(index)
    listener.start()
    cleanup.append(listener)
    listener.add_pod(PodSource("pod-a", f"tcp://127.0.0.1:{base}", dp_size=2))
    assert all(p.wait_subscribed() for p in pubs)
    chain = Chain(3)
    pubs[1].publish(chain.batch(0, 3))
    pubs[0].publish(chain.batch(0, 1))
    wait_for(lambda: listener.stats()["batches"] == 2, "two batches")
    result = index.match(index.keys(chain.tokens, "m"))["pod-a"]
    assert result.matched_blocks == 3 and result.rank == 1
    listener.remove_pod("pod-a")
    wait_for(lambda: index.pods() == [], "pod removal")


def _pod(
    index: PrefixIndex, cleanup: list[Any], *, replay: bool, **kw: Any
) -> tuple[EventPublisher, KVEventListener]:
    pub = tcp_publisher(replay=replay)
    pub.start()
    cleanup.append(pub)
    listener = KVEventListener(index, **kw)
    listener.start()
    cleanup.append(listener)
    listener.add_pod(
        PodSource("pod-a", pub.endpoint, replay_endpoint=pub.replay_endpoint if replay else None)
    )
    assert pub.wait_subscribed()
    return pub, listener


def test_gap_is_filled_by_replay(index: PrefixIndex, cleanup: list[Any]) -> None:
    pub, listener = _pod(index, cleanup, replay=True)
    chain = Chain(6)
    pub.publish(chain.batch(0, 2))
    pub.publish(chain.batch(2, 4), deliver=False)  # lost on the way, kept for replay
    pub.publish(chain.batch(4, 6))
    wait_for(lambda: matched(index, chain, "pod-a") == 6, "replayed prefix")
    stats = listener.stats()
    assert stats["gaps"] == 1 and stats["replays"] == 1 and stats["cleared_on_gap"] == 0
    assert stats["batches"] == 3


def test_gap_without_replay_clears_the_pod(index: PrefixIndex, cleanup: list[Any]) -> None:
    pub, listener = _pod(index, cleanup, replay=False)
    chain = Chain(6)
    other = Chain(2, seed=9)
    pub.publish(chain.batch(0, 2))
    wait_for(lambda: matched(index, chain, "pod-a") == 2, "first batch")
    pub.publish(chain.batch(2, 4), deliver=False)
    pub.publish(other.batch(0, 2))
    wait_for(lambda: listener.stats()["cleared_on_gap"] == 1, "clear on gap")
    assert matched(index, chain, "pod-a") == 0  # possibly stale: dropped
    assert matched(index, other, "pod-a") == 2  # applied after the clear


def test_engine_restart_clears_then_applies(index: PrefixIndex, cleanup: list[Any]) -> None:
    pub, listener = _pod(index, cleanup, replay=True)
    chain, fresh = Chain(4), Chain(2, seed=5)
    pub.publish(chain.batch(0, 2))
    pub.publish(chain.batch(2, 4))
    wait_for(lambda: matched(index, chain, "pod-a") == 4, "before restart")
    pub.restart()
    pub.publish(fresh.batch(0, 2))
    wait_for(lambda: listener.stats()["rewinds"] == 1, "rewind")
    wait_for(lambda: matched(index, fresh, "pod-a") == 2, "after restart")
    assert matched(index, chain, "pod-a") == 0


def test_restart_seen_mid_stream_replays_from_zero(index: PrefixIndex, cleanup: list[Any]) -> None:
    pub, listener = _pod(index, cleanup, replay=True)
    chain, fresh = Chain(2), Chain(4, seed=3)
    for lo in range(2):
        pub.publish(chain.batch(lo, lo + 1))
    wait_for(lambda: matched(index, chain, "pod-a") == 2, "before restart")
    pub.restart()
    pub.publish(fresh.batch(0, 2), deliver=False)  # seq 0 of the new instance is lost
    pub.publish(fresh.batch(2, 4))  # seq 1 < expected 2: a rewind, replay from 0
    wait_for(lambda: matched(index, fresh, "pod-a") == 4, "replayed after restart")
    assert matched(index, chain, "pod-a") == 0
    assert listener.stats()["replays"] == 1


def test_joining_mid_stream_replays_history(index: PrefixIndex, cleanup: list[Any]) -> None:
    pub = tcp_publisher(replay=True)
    pub.start()
    cleanup.append(pub)
    chain = Chain(6)
    for lo in range(0, 4, 2):
        pub.publish(chain.batch(lo, lo + 2), deliver=False)  # before we listen
    listener = KVEventListener(index)
    listener.start()
    cleanup.append(listener)
    listener.add_pod(PodSource("pod-a", pub.endpoint, replay_endpoint=pub.replay_endpoint))
    assert pub.wait_subscribed()
    pub.publish(chain.batch(4, 6))
    wait_for(lambda: matched(index, chain, "pod-a") == 6, "history replayed")
    assert listener.stats()["joined_mid_stream"] == 1


def test_replay_timeout_falls_back_to_clearing(index: PrefixIndex, cleanup: list[Any]) -> None:
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # accepts the request, never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        pub = tcp_publisher(replay=False)
        pub.start()
        cleanup.append(pub)
        listener = KVEventListener(index, replay_timeout_s=0.2)
        listener.start()
        cleanup.append(listener)
        listener.add_pod(
            PodSource("pod-a", pub.endpoint, replay_endpoint=f"tcp://127.0.0.1:{port}")
        )
        assert pub.wait_subscribed()
        chain = Chain(6)
        pub.publish(chain.batch(0, 2))
        wait_for(lambda: matched(index, chain, "pod-a") == 2, "first batch")
        pub.publish(chain.batch(2, 4), deliver=False)
        pub.publish(chain.batch(4, 6))
        wait_for(lambda: listener.stats()["replay_timeouts"] == 1, "replay timeout")
        assert matched(index, chain, "pod-a") == 0
        assert index.stats()["orphans_pending"] == 2  # the post-gap batch waits for its parent
    finally:
        silent.close(linger=0)
        ctx.term()


def test_replay_of_recorded_vllm_frames(
    vectors: dict[str, Any], index: PrefixIndex, cleanup: list[Any]
) -> None:
    """A ROUTER answers with the exact frames vLLM's publisher sent in the vectors."""
    session = vectors["wire_sessions"][0]
    replay = next(r for r in session["replay"] if r["start_seq"] == 0)
    messages = session["messages"]
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    rport = router.bind_to_random_port("tcp://127.0.0.1")
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pport = pub.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()
    requests: list[list[bytes]] = []

    def serve() -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(20):
                frames = router.recv_multipart()
                requests.append(frames[1:])
                for response in replay["response_messages_hex"]:
                    router.send_multipart([frames[0], *(bytes.fromhex(f) for f in response)])

    server = threading.Thread(target=serve)
    server.start()
    try:
        listener = KVEventListener(index)
        listener.start()
        cleanup.append(listener)
        listener.add_pod(
            PodSource(
                "pod-v", f"tcp://127.0.0.1:{pport}", replay_endpoint=f"tcp://127.0.0.1:{rport}"
            )
        )
        assert pub.poll(DEADLINE_S * 1000)
        pub.recv()  # the subscription
        last = messages[-1]
        pub.send_multipart([bytes.fromhex(f) for f in last["frames_hex"]])  # join at the end
        wait_for(lambda: listener.stats()["batches"] == len(messages), "replayed session")
        assert [bytes.fromhex(f) for f in replay["request_frames_hex"]] == requests[0]
        assert listener.stats()["joined_mid_stream"] == 1
        assert listener.stats()["replays_incomplete"] == 0
    finally:
        stop.set()
        server.join()
        router.close(linger=0)
        pub.close(linger=0)
        ctx.term()


def test_bad_frames_are_counted_and_the_thread_survives(
    index: PrefixIndex, cleanup: list[Any]
) -> None:
    listener = KVEventListener(index, bind=["tcp://127.0.0.1:0"], topic_filter="")
    listener.start()
    cleanup.append(listener)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(listener.bound_endpoints[0])
    try:
        assert pub.poll(DEADLINE_S * 1000)
        pub.recv()
        good = encode_frames("kv@pod-b@m", 0, Chain(1).batch(0, 1))
        bad = [
            [b"kv@pod-b@m", b"\x00" * 7, good[2]],  # short seq
            [b"kv@pod-b@m", good[1]],  # two frames
            [b"kv@pod-b@m", good[1], b"\xc1\xc1"],  # not msgpack
            [b"\xff\xfe", good[1], good[2]],  # topic not UTF-8
            [b"nonsense", good[1], good[2]],  # topic without pod
            [b"kv@pod-b@m", good[1], good[2][:-3]],  # truncated payload
        ]
        for frames in bad:
            pub.send_multipart(frames)
        pub.send_multipart(good)
        wait_for(lambda: listener.stats()["batches"] == 1, "the good batch")
        stats = listener.stats()
        assert stats["decode_errors"] == len(bad)
        reasons = {r for per_pod in stats["errors_by_pod"].values() for r in per_pod}
        assert {"bad_seq", "frame_count", "not_msgpack", "bad_topic"} <= reasons
        assert listener.running
    finally:
        pub.close(linger=0)
        ctx.term()


def test_start_stop_idempotent_bounded_and_bind_errors(index: PrefixIndex) -> None:
    before = set(threading.enumerate())
    listener = KVEventListener(index, bind=["tcp://127.0.0.1:0"])
    listener.stop()  # never started: no-op
    listener.start()
    listener.start()
    listener.stop()  # joins with its 1 s bound; the thread must be gone after it
    assert not listener.running
    listener.stop()
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]
    holder = KVEventListener(index, bind=["tcp://127.0.0.1:0"])
    holder.start()
    try:
        taken = KVEventListener(index, bind=[holder.bound_endpoints[0]])
        with pytest.raises(KVAwareError, match="could not start"):
            taken.start()
    finally:
        holder.stop()
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]


def test_construction_has_no_side_effects(index: PrefixIndex) -> None:
    before = set(threading.enumerate())
    KVEventListener(index, bind=["tcp://127.0.0.1:0"])
    EventPublisher("tcp://127.0.0.1:0", bind=True)
    assert set(threading.enumerate()) == before


def test_hash_settings_mismatch_is_diagnosed(
    vectors: dict[str, Any],
    index: PrefixIndex,
    cleanup: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from builders import event_from_json

    from kvaware_scorer.hash_check import HashCheck
    from kvaware_scorer.vllm_hash import VllmHashSettings

    case = next(
        c
        for c in vectors["hash_cases"]
        if c["inputs"]["hash_algo"] == "sha256_cbor"
        and c["inputs"]["pythonhashseed"] == "0"
        and c["inputs"]["block_size"] == 16
        and not c["inputs"]["lora"]
        and not c["inputs"]["mm_features"]
        and not c["inputs"]["cache_salt"]
        and c["inputs"].get("num_hash_lookahead_tokens", 0) == 0
        and c["expected"].get("block_stored_event")
    )
    event = event_from_json(case["expected"]["block_stored_event"])
    wrong = HashCheck(VllmHashSettings(hash_algo="sha256", pythonhashseed="0", block_size=16))
    listener = KVEventListener(index, bind=["tcp://127.0.0.1:0"], hash_check=wrong)
    listener.start()
    cleanup.append(listener)
    pub = EventPublisher(listener.bound_endpoints[0], topic="kv@pod-h@m")
    pub.start()
    cleanup.append(pub)
    assert pub.wait_subscribed()
    with caplog.at_level("WARNING", logger="kvaware_scorer.listener"):
        pub.publish(EventBatch(ts=1.0, events=[event]))
        wait_for(lambda: listener.stats().get("hash_mismatches", 0) == 1, "hash mismatch")
    assert any("sha256_cbor" in r.getMessage() for r in caplog.records)
    right = HashCheck(VllmHashSettings(hash_algo="sha256_cbor", pythonhashseed="0", block_size=16))
    ok_listener = KVEventListener(index, bind=["tcp://127.0.0.1:0"], hash_check=right)
    ok_listener.start()
    cleanup.append(ok_listener)
    pub2 = EventPublisher(ok_listener.bound_endpoints[0], topic="kv@pod-h@m")
    pub2.start()
    cleanup.append(pub2)
    assert pub2.wait_subscribed()
    pub2.publish(EventBatch(ts=1.0, events=[event]))
    wait_for(lambda: ok_listener.stats().get("hash_checks_ok", 0) == 1, "hash check ok")
