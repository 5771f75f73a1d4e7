"""Sequence tracking and replay for each (pod, rank) KV-event stream.

A gap asks the pod's replay endpoint (vLLM's ROUTER; we use a DEALER) for the missing
batches, buffering live ones (bounded) until the end marker; a sequence that goes
backwards means the engine restarted: the slot is cleared, then replayed from 0; the first
message of a stream with ``seq > 0`` means we joined mid-stream: replay from 0. Without a
replay endpoint (or while replay rests after a failure) a gap or a restart clears the
slot, since stale entries would misroute. A replay that stays silent for
``replay_timeout_s`` is abandoned: the slot is cleared and the buffered batches applied.

A mixin of :class:`kvaware_scorer.listener.KVEventListener`; it runs on the listener's
thread, which owns every socket.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from kvaware_scorer.errors import WireError
from kvaware_scorer.events import EventBatch
from kvaware_scorer.index import PrefixIndex
from kvaware_scorer.ratelimit import RateLimitedLogger
from kvaware_scorer.wire import END_SEQ, decode_payload

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Stream:
    """Sequence state of one (pod, rank) publisher."""

    pod: str
    rank: int
    replay_endpoint: str | None
    expected: int | None = None
    dealer: Any = None
    replaying: bool = False
    replay_from: int = 0
    replay_next: int = 0
    replay_deadline: float = 0.0
    replay_cooldown_until: float = 0.0
    buffered: deque[tuple[int, EventBatch]] = field(default_factory=deque)


class StreamSync:
    """Per-stream sequence state machine; see the module docstring."""

    index: PrefixIndex
    _replay: bool
    _replay_timeout_s: float
    _replay_cooldown_s: float
    _max_buffered: int
    _max_bytes: int
    _ctx: Any
    _poller: Any
    _dealers: dict[Any, _Stream]
    _warn: RateLimitedLogger

    def _count(self, name: str, n: int = 1) -> None:
        raise NotImplementedError

    def _error(self, pod: str, reason: str, detail: str) -> None:
        raise NotImplementedError

    def _apply(self, stream: _Stream, seq: int, batch: EventBatch) -> None:
        raise NotImplementedError

    def _on_message(self, stream: _Stream, seq: int, batch: EventBatch) -> None:
        if stream.replaying:
            if len(stream.buffered) >= self._max_buffered:
                self._count("buffer_drops")
                self._warn.warning(
                    f"{stream.pod}:buffer", "replay buffer full for %s; clearing it", stream.pod
                )
                self._abort_replay(stream, clear=True)
                self._apply(stream, seq, batch)
                return
            stream.buffered.append((seq, batch))
            return
        expected = stream.expected
        can_replay = self._can_replay(stream)
        if expected is None:
            if seq != 0:
                self._count("joined_mid_stream")
                if can_replay:
                    self._begin_replay(stream, 0, seq, batch)
                    return
            self._apply(stream, seq, batch)
        elif seq == expected:
            self._apply(stream, seq, batch)
        elif seq > expected:
            self._count("gaps")
            self._warn.warning(
                f"{stream.pod}:gap",
                "sequence gap from %s rank %d: expected %d, got %d",
                stream.pod,
                stream.rank,
                expected,
                seq,
            )
            if can_replay:
                self._begin_replay(stream, expected, seq, batch)
                return
            self._count("cleared_on_gap")
            self.index.clear_pod(stream.pod, stream.rank)
            self._apply(stream, seq, batch)
        else:
            self._count("rewinds")
            self._count("cleared_on_rewind")
            logger.info(
                "pod %s rank %d restarted (sequence %d after %d); clearing its entries",
                stream.pod,
                stream.rank,
                seq,
                expected - 1,
            )
            self.index.clear_pod(stream.pod, stream.rank)
            if seq != 0 and can_replay:
                self._begin_replay(stream, 0, seq, batch)
                return
            self._apply(stream, seq, batch)

    def _can_replay(self, stream: _Stream) -> bool:
        return (
            self._replay
            and stream.replay_endpoint is not None
            and time.monotonic() >= stream.replay_cooldown_until
        )

    def _begin_replay(self, stream: _Stream, from_seq: int, seq: int, batch: EventBatch) -> None:
        """Ask the pod's ROUTER for every batch from ``from_seq``; buffer live ones meanwhile."""
        assert stream.replay_endpoint is not None
        self._count("replays")
        self._close_dealer(stream)
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.MAXMSGSIZE, self._max_bytes + 4096)
        try:
            dealer.connect(stream.replay_endpoint)
        except zmq.ZMQError as exc:  # e.g. a replay address derived from a bad pod name
            dealer.close(linger=0)
            self._error(stream.pod, "bad_replay_endpoint", f"{stream.replay_endpoint}: {exc}")
            stream.replay_endpoint = None
            self._count("cleared_on_gap")
            self.index.clear_pod(stream.pod, stream.rank)
            self._apply(stream, seq, batch)
            return
        dealer.send_multipart([b"", from_seq.to_bytes(8, "big")])
        self._poller.register(dealer, zmq.POLLIN)
        self._dealers[dealer] = stream
        stream.dealer = dealer
        stream.replaying = True
        stream.replay_from = stream.replay_next = from_seq
        stream.buffered.clear()
        stream.buffered.append((seq, batch))
        stream.replay_deadline = time.monotonic() + self._replay_timeout_s
        logger.info("replaying %s rank %d from sequence %d", stream.pod, stream.rank, from_seq)

    def _close_dealer(self, stream: _Stream) -> None:
        dealer = stream.dealer
        if dealer is not None:
            stream.dealer = None
            self._poller.unregister(dealer)
            dealer.close(linger=0)
            self._dealers.pop(dealer, None)

    def _check_replay_deadlines(self, now: float) -> None:
        for stream in list(self._dealers.values()):
            overdue = stream.replaying and now > stream.replay_deadline
            if overdue and stream.dealer is not None and stream.dealer.poll(0):
                # The answer is there; the thread was busy with other pods. Not a timeout.
                self._read_dealer(stream.dealer, stream)
                if not stream.replaying:
                    self._close_dealer(stream)
                    continue
                stream.replay_deadline = time.monotonic() + self._replay_timeout_s
                continue
            if stream.replaying and now > stream.replay_deadline:
                self._count("replay_timeouts")
                self._warn.warning(
                    f"{stream.pod}:replay_timeout",
                    "replay from %s rank %d timed out; clearing its entries",
                    stream.pod,
                    stream.rank,
                )
                stream.replay_cooldown_until = now + self._replay_cooldown_s
                self._abort_replay(stream, clear=True)
            if not stream.replaying:
                self._close_dealer(stream)

    def _read_dealer(self, dealer: Any, stream: _Stream) -> None:
        for _ in range(1024):
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not stream.replaying:
                return
            stream.replay_deadline = time.monotonic() + self._replay_timeout_s
            if len(frames) < 3 or len(frames[-2]) != 8:
                self._error(stream.pod, "bad_replay_frame", f"{len(frames)} frames")
                continue
            seq = int.from_bytes(frames[-2], "big")
            if seq == END_SEQ:
                self._finish_replay(stream)
                return
            if seq < stream.replay_next:
                continue
            if seq > stream.replay_next:
                # The pod no longer holds the batches we asked for: history is lost.
                self._count("replays_incomplete")
                self._warn.warning(
                    f"{stream.pod}:replay_incomplete",
                    "replay from %s rank %d starts at %d, not %d; entries may be incomplete",
                    stream.pod,
                    stream.rank,
                    seq,
                    stream.replay_next,
                )
                if stream.replay_from > 0:
                    self.index.clear_pod(stream.pod, stream.rank)
            try:
                batch = decode_payload(frames[-1], max_bytes=self._max_bytes)
            except WireError as exc:
                self._error(stream.pod, exc.reason, str(exc))
                stream.replay_next = seq + 1
                continue
            stream.replay_next = seq + 1
            self._apply(stream, seq, batch)

    def _finish_replay(self, stream: _Stream) -> None:
        stream.replaying = False
        self._close_dealer(stream)
        stream.expected = stream.replay_next
        buffered = list(stream.buffered)
        stream.buffered.clear()
        for seq, batch in buffered:
            if stream.expected is not None and seq < stream.expected:
                continue
            self._on_message(stream, seq, batch)

    def _abort_replay(self, stream: _Stream, *, clear: bool) -> None:
        stream.replaying = False
        self._close_dealer(stream)
        if clear:
            self.index.clear_pod(stream.pod, stream.rank)
        buffered = list(stream.buffered)
        stream.buffered.clear()
        stream.expected = None
        for seq, batch in buffered:
            self._apply(stream, seq, batch)
