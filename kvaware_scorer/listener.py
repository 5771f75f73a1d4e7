"""KVEventListener: one thread that owns every ZeroMQ socket and feeds the index.

Two modes, usable together:

* **bind**: we bind SUB sockets; pods' publishers connect to us. The pod is named by
  the topic ``kv@<pod>@<model>`` and the DP rank by the batch's ``data_parallel_rank``.
* **connect**: we dial each pod's publisher (:meth:`KVEventListener.add_pod`), one SUB per
  DP rank at port + rank as vLLM offsets it. The pod is the name we were given.

Every (pod, rank) stream has its sequence tracked (:mod:`kvaware_scorer.streams`): a gap
asks the pod's replay endpoint (ROUTER; we use a DEALER) for the missing batches; a
sequence that goes backwards means the engine restarted: the pod's entries are cleared,
then replayed from 0. Without a replay endpoint a gap or restart clears the pod's entries,
since stale entries would misroute.
Live messages that arrive during a replay are buffered (bounded) and applied after it.

Bad input never stops the thread: it is counted per pod and reason, logged at most once
per interval per pod and reason, and dropped. With ``known_pods`` (static discovery),
bind-mode events from pods that are not known endpoints are refused (``unknown_pod``).

Overload: each SUB socket queues at most ``max_queued_messages`` messages (ZeroMQ's
receive high-water mark; the publisher's PUB drops beyond it, as vLLM's does at its own
HWM). Whatever is shed there shows up as a sequence gap, which is counted, logged and
repaired by replay or by clearing the pod, so memory stays bounded when events arrive
faster than they can be applied, and readers of the index never wait for the writer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import zmq

from kvaware_scorer.endpoints import parse_topic, rank_endpoint
from kvaware_scorer.errors import ConfigError, KVAwareError, WireError
from kvaware_scorer.events import BlockStored, EventBatch
from kvaware_scorer.hash_check import HashCheck
from kvaware_scorer.index import PrefixIndex
from kvaware_scorer.ratelimit import RateLimitedLogger
from kvaware_scorer.streams import StreamSync, _Stream
from kvaware_scorer.wire import DEFAULT_MAX_PAYLOAD_BYTES, decode_frames

logger = logging.getLogger(__name__)

_MAX_ERROR_LABELS = 256
BatchCallback = Callable[[str, int, int, EventBatch], None]


@dataclass(frozen=True)
class PodSource:
    """A pod whose publisher we dial (connect mode).

    ``endpoint`` and ``replay_endpoint`` are rank 0's; rank r uses vLLM's offset.
    """

    pod: str
    endpoint: str
    replay_endpoint: str | None = None
    model: str | None = None
    dp_size: int = 1
    topic: str = ""

    def __post_init__(self) -> None:
        if self.dp_size < 1:
            raise ConfigError(f"pod {self.pod!r}: dp_size must be >= 1, got {self.dp_size}")
        for rank in range(self.dp_size):
            rank_endpoint(self.endpoint, rank)
            if self.replay_endpoint:
                rank_endpoint(self.replay_endpoint, rank)


class KVEventListener(StreamSync):
    """Consumes vLLM KV events into a :class:`PrefixIndex`.

    Nothing happens at construction. :meth:`start` binds and starts the thread (and
    re-raises a bind error); :meth:`stop` is idempotent and returns within ``timeout_s``.
    Only the listener thread touches sockets; other threads talk to it through a queue
    and a wake-up pipe.
    """

    def __init__(
        self,
        index: PrefixIndex,
        *,
        bind: Iterable[str] = (),
        topic_filter: str = "kv@",
        bind_replay_port: int | None = None,
        replay: bool = True,
        replay_timeout_s: float = 2.0,
        replay_cooldown_s: float = 30.0,
        max_buffered_batches: int = 10_000,
        max_queued_messages: int = 10_000,
        max_dp_ranks: int = 64,
        known_pods: Callable[[], Collection[str]] | None = None,
        max_message_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        poll_interval_ms: int = 50,
        on_batch: BatchCallback | None = None,
        hash_check: HashCheck | None = None,
        hash_check_interval_s: float = 60.0,
        log_interval_s: float = 10.0,
    ) -> None:
        self.index = index
        self._bind = list(bind)
        self._topic_filter = topic_filter.encode()
        self._bind_replay_port = bind_replay_port
        self._replay = replay
        self._replay_timeout_s = replay_timeout_s
        self._replay_cooldown_s = replay_cooldown_s
        self._max_buffered = max_buffered_batches
        self._rcvhwm = max_queued_messages
        self._max_dp_ranks = max_dp_ranks
        self._known_pods = known_pods
        self._max_bytes = max_message_bytes
        self._poll_ms = poll_interval_ms
        self._on_batch = on_batch
        self._hash_check = hash_check
        self._hash_check_interval_s = hash_check_interval_s
        self._next_hash_check: dict[str, float] = {}
        self._warn = RateLimitedLogger(logger, log_interval_s)

        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._lock = threading.Lock()
        self._control: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._wake_r = self._wake_w = -1
        self._streams: dict[tuple[str, int], _Stream] = {}
        self._sources: dict[str, PodSource] = {}
        self._pending_sources: dict[str, PodSource] = {}
        self.bound_endpoints: list[str] = []
        # Owned by the listener thread while it runs; no other thread touches them.
        self._ctx: Any = None
        self._poller: Any = None
        self._dealers: dict[Any, _Stream] = {}
        self._stats: dict[str, int] = {}
        self._errors: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout_s: float = 5.0) -> None:
        """Bind, start the thread, and wait until it is ready. Idempotent."""
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping.clear()
            self._ready.clear()
            self._start_error = None
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            self._thread = threading.Thread(target=self._run, name="kvaware-kv-events", daemon=True)
            self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise KVAwareError(f"KV event listener did not start within {timeout_s} s")
        if self._start_error is not None:
            error = self._start_error
            self.stop()
            raise KVAwareError(f"KV event listener could not start: {error}") from error

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop the thread and close every socket. Idempotent, bounded by ``timeout_s``."""
        with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._stopping.set()
            self._wake()
            thread.join(timeout_s)
            if thread.is_alive():
                logger.warning("KV event listener thread did not stop within %.1f s", timeout_s)
                return
            self._thread = None
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1
            logger.info("KV event listener stopped: %s", self._stats)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # ------------------------------------------------------------------ control

    def add_pod(self, source: PodSource) -> None:
        """Dial a pod's publisher (connect mode). Replaces an earlier source of that name."""
        self._pending_sources[source.pod] = source
        self._control.put(("add", source))
        self._wake()

    def remove_pod(self, pod: str) -> None:
        """Stop listening to ``pod`` and drop its entries from the index."""
        self._pending_sources.pop(pod, None)
        self._control.put(("remove", pod))
        self._wake()

    def pods(self) -> list[str]:
        return sorted(self._pending_sources)

    # ------------------------------------------------------------------ stats

    def _count(self, name: str, n: int = 1) -> None:
        self._stats[name] = self._stats.get(name, 0) + n

    def _error(self, pod: str, reason: str, detail: str) -> None:
        if pod not in self._errors and len(self._errors) >= _MAX_ERROR_LABELS:
            pod = "other"  # peers choose pod names: keep the label set bounded
        per_pod = self._errors.setdefault(pod, {})
        per_pod[reason] = per_pod.get(reason, 0) + 1
        self._count("decode_errors")
        self._warn.warning(f"{pod}:{reason}", "dropped input from %s (%s): %s", pod, reason, detail)

    def stats(self) -> dict[str, Any]:
        """Counters: batches, events applied, decode errors by pod and reason, gaps,
        replays, rewinds, orphans, drops; plus the index's own figures."""
        out: dict[str, Any] = {
            name: 0
            for name in (
                "batches",
                "events_applied",
                "decode_errors",
                "gaps",
                "replays",
                "replays_incomplete",
                "replay_timeouts",
                "rewinds",
                "cleared_on_gap",
                "cleared_on_rewind",
                "joined_mid_stream",
                "buffer_drops",
            )
        }
        out.update(self._stats)
        out["errors_by_pod"] = {pod: dict(r) for pod, r in list(self._errors.items())}
        index_stats = self.index.stats()
        out["orphans"] = index_stats["counters"].get("orphans", 0)
        out["index"] = index_stats
        return out

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        ctx = self._ctx = zmq.Context()
        poller = self._poller = zmq.Poller()
        subs: dict[Any, tuple[str, int] | None] = {}  # socket -> (pod, rank), None in bind mode
        dealers = self._dealers = {}
        try:
            for address in self._bind:
                sock = ctx.socket(zmq.SUB)
                subs[sock] = None
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.MAXMSGSIZE, self._max_bytes + 4096)
                sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
                sock.setsockopt(zmq.SUBSCRIBE, self._topic_filter)
                sock.bind(address)
                self.bound_endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
                poller.register(sock, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
        except (zmq.ZMQError, OSError) as exc:
            self._start_error = exc
            for sock in subs:
                sock.close(linger=0)
            ctx.term()
            self._ready.set()
            return
        self._ready.set()
        logger.info("KV event listener started; bound %s", self.bound_endpoints or "nothing")
        next_housekeeping = 0.0
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(self._poll_ms))
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                    self._drain_control(subs)
                for sock, mode in list(subs.items()):
                    if sock in ready:
                        self._read_sub(sock, mode)
                for dealer, stream in list(dealers.items()):
                    if dealer in ready:
                        try:
                            self._read_dealer(dealer, stream)
                        except Exception:  # a bug, not input: keep the thread alive
                            self._count("handler_errors")
                            logger.exception("replay from %s failed", stream.pod)
                now = time.monotonic()
                if now >= next_housekeeping:
                    next_housekeeping = now + 0.05
                    self.index.expire_speculative()
                    self._check_replay_deadlines(now)
        except Exception:  # pragma: no cover - a bug, not input; keep the router alive
            logger.exception("KV event listener thread failed")
            self._count("thread_failures")
        finally:
            for sock in list(subs) + list(dealers):
                sock.close(linger=0)
            dealers.clear()
            for stream in self._streams.values():
                stream.dealer = None
            ctx.term()

    def _drain_control(self, subs: dict[Any, Any]) -> None:
        while True:
            try:
                op, arg = self._control.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                self._detach(arg.pod, subs)
                self._attach(arg, subs)
            else:
                self._detach(arg, subs)
                self.index.remove_pod(arg)

    def _attach(self, source: PodSource, subs: dict[Any, Any]) -> None:
        self._sources[source.pod] = source
        if source.model is not None:
            self.index.set_pod(source.pod, model=source.model)
        for rank in range(source.dp_size):
            sock = self._ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self._max_bytes + 4096)
            sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
            sock.setsockopt(zmq.SUBSCRIBE, source.topic.encode())
            try:
                sock.connect(rank_endpoint(source.endpoint, rank))
            except zmq.ZMQError as exc:
                sock.close(linger=0)
                self._error(source.pod, "connect_failed", str(exc))
                continue
            self._poller.register(sock, zmq.POLLIN)
            subs[sock] = (source.pod, rank)
            replay = rank_endpoint(source.replay_endpoint, rank) if source.replay_endpoint else None
            self._streams[(source.pod, rank)] = _Stream(source.pod, rank, replay)
        logger.info(
            "listening to pod %s at %s (dp_size %d)", source.pod, source.endpoint, source.dp_size
        )

    def _detach(self, pod: str, subs: dict[Any, Any]) -> None:
        for sock, owner in list(subs.items()):
            if owner is not None and owner[0] == pod:
                self._poller.unregister(sock)
                sock.close(linger=0)
                del subs[sock]
        for key in [k for k in self._streams if k[0] == pod]:
            self._close_dealer(self._streams.pop(key))
        self._sources.pop(pod, None)

    # ------------------------------------------------------------------ messages

    def _read_sub(self, sock: Any, owner: tuple[str, int] | None) -> None:
        for _ in range(256):  # bounded, so one busy pod cannot starve the others
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            label = owner[0] if owner else "bind"
            try:
                message = decode_frames(frames, max_bytes=self._max_bytes)
            except WireError as exc:
                self._error(label, exc.reason, str(exc))
                continue
            batch = message.batch
            if owner is None:
                parsed = parse_topic(message.topic)
                if parsed is None:
                    self._error(
                        "bind", "bad_topic", f"topic {message.topic!r} is not kv@<pod>@<model>"
                    )
                    continue
                pod, model = parsed
                if self._known_pods is not None and pod not in self._known_pods():
                    self._error(
                        pod, "unknown_pod", "events from a pod that is not a known endpoint"
                    )
                    continue
                rank = batch.data_parallel_rank or 0
                if not 0 <= rank < self._max_dp_ranks:
                    self._error("bind", "bad_rank", f"data_parallel_rank {rank} from {pod!r}")
                    continue
                stream = self._streams.get((pod, rank))
                if stream is None:
                    if model is not None:
                        self.index.set_pod(pod, model=model)
                    stream = _Stream(pod, rank, self._bind_replay_endpoint(pod, rank))
                    self._streams[(pod, rank)] = stream
            else:
                stream = self._streams[owner]
                if stream.expected is None and message.topic:
                    parsed = parse_topic(message.topic)
                    source = self._sources.get(owner[0])
                    if parsed and parsed[1] and source is not None and source.model is None:
                        self.index.set_pod(owner[0], model=parsed[1])
            try:
                self._on_message(stream, message.seq, batch)
            except Exception:  # a bug, not input: count it, keep reading
                self._count("handler_errors")
                logger.exception("handling a message from %s failed; message dropped", stream.pod)

    def _bind_replay_endpoint(self, pod: str, rank: int) -> str | None:
        if self._bind_replay_port is None:
            return None
        host = pod.rsplit(":", 1)[0] if ":" in pod else pod
        return f"tcp://{host}:{self._bind_replay_port + rank}"

    def _apply(self, stream: _Stream, seq: int, batch: EventBatch) -> None:
        stream.expected = seq + 1
        self._count("batches")
        for reason in batch.errors:
            self._error(stream.pod, reason, f"event dropped from batch {seq}")
        if batch.events:
            try:
                self.index.apply(stream.pod, batch.events, rank=stream.rank)
            except Exception:  # a bug, not input: count it and keep the thread alive
                self._count("apply_errors")
                logger.exception("applying a batch from %s failed; batch dropped", stream.pod)
                return
            self._count("events_applied", len(batch.events))
            if self._hash_check is not None:
                self._maybe_check_hashes(self._hash_check, stream.pod, batch)
        if self._on_batch is not None:
            try:
                self._on_batch(stream.pod, stream.rank, seq, batch)
            except Exception:
                logger.exception("on_batch callback failed")

    def _maybe_check_hashes(self, checker: HashCheck, pod: str, batch: EventBatch) -> None:
        now = time.monotonic()
        if now < self._next_hash_check.get(pod, 0.0):
            return
        for event in batch.events:
            if not isinstance(event, BlockStored):
                continue
            try:
                result = checker.check(event)
            except Exception as exc:
                self._warn.warning(f"{pod}:hash_check", "hash check failed for %s: %s", pod, exc)
                return
            if result is None:
                continue
            self._next_hash_check[pod] = now + self._hash_check_interval_s
            if result.ok:
                self._count("hash_checks_ok")
            else:
                self._count("hash_mismatches")
                self._warn.warning(
                    f"{pod}:hash_mismatch",
                    "pod %s: block hashes differ from the configured vLLM hash settings; %s",
                    pod,
                    result.hint,
                )
            return
