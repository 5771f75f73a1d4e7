"""EventPublisher: a KV-event publisher with vLLM's wire behaviour, for simulated engines
and tests.

Like vLLM's ``ZmqEventPublisher``: one thread owns the sockets; batches are sent as
``[topic, seq (8-byte big-endian), payload]`` with ``seq`` from 0 per instance; the last
``buffer_steps`` batches are kept for replay on a ROUTER socket, answered with
``[identity, b"", topic, seq, payload]`` per batch and the end marker
``[identity, b"", b"", 0xff * 8, b""]``. The data socket binds when the endpoint has ``*``
or ``::`` or is ipc/inproc, else connects (``bind=`` overrides that, so a test can bind
127.0.0.1 only); the replay socket always binds.

Unlike vLLM it uses an XPUB socket, so :meth:`EventPublisher.wait_subscribed` can tell
when a subscriber is attached (the bytes on the wire are the same), and it can drop a
batch on purpose (``deliver=False``: kept for replay but not sent, as PUB does at its
high-water mark) to exercise recovery.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections import deque
from typing import Any

import zmq

from kvaware_scorer.endpoints import publisher_binds
from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.events import EventBatch
from kvaware_scorer.wire import END_SEQ, encode_batch

logger = logging.getLogger(__name__)

_END_MARKER = [b"", END_SEQ.to_bytes(8, "big"), b""]


class EventPublisher:
    """Publishes :class:`EventBatch` objects; see the module docstring."""

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        data_parallel_rank: int = 0,
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
        bind: bool | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.bind = publisher_binds(endpoint) if bind is None else bind
        self.replay_endpoint = replay_endpoint
        self.topic = topic.encode()
        self.data_parallel_rank = data_parallel_rank
        self.buffer_steps = buffer_steps
        self.hwm = hwm
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._subscribed = threading.Event()
        self._error: BaseException | None = None
        self._wake_r = self._wake_w = -1
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self.sent = 0

    def start(self, timeout_s: float = 5.0) -> None:
        """Bind or connect, then start the thread. Raises if a socket cannot be set up."""
        if self._thread is not None:
            return
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="kvaware-publisher", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._error is not None:
            error = self._error
            self.stop()
            raise KVAwareError(f"publisher for {self.endpoint} could not start: {error}")

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop the thread and close the sockets. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        self._queue.put(("stop", None))
        self._wake()
        thread.join(timeout_s)
        self._thread = None
        os.close(self._wake_r)
        os.close(self._wake_w)

    def publish(self, batch: EventBatch, *, deliver: bool = True) -> None:
        """Queue a batch; ``deliver=False`` keeps it for replay without sending it."""
        self._queue.put(("batch" if deliver else "drop", batch))
        self._wake()

    def restart(self) -> None:
        """Behave like a restarted engine: sequence back to 0, replay buffer emptied."""
        self._queue.put(("restart", None))
        self._wake()

    def wait_subscribed(self, timeout_s: float = 5.0) -> bool:
        """Wait until a subscriber's subscription reached this publisher."""
        return self._subscribed.wait(timeout_s)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued batch has been handled by the thread."""
        done = threading.Event()
        self._queue.put(("flush", done))
        self._wake()
        return done.wait(timeout_s)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _run(self) -> None:
        ctx = zmq.Context()
        pub = ctx.socket(zmq.XPUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, self.hwm)
        router = None
        poller = zmq.Poller()
        try:
            if self.bind:
                pub.bind(self.endpoint)
                self.endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            else:
                pub.connect(self.endpoint)
            poller.register(pub, zmq.POLLIN)
            if self.replay_endpoint is not None:
                router = ctx.socket(zmq.ROUTER)
                router.setsockopt(zmq.LINGER, 0)
                router.setsockopt(zmq.SNDHWM, 2 * (self.buffer_steps + 1))
                router.bind(self.replay_endpoint)
                self.replay_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
                poller.register(router, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
        except zmq.ZMQError as exc:
            self._error = exc
            pub.close(linger=0)
            if router is not None:
                router.close(linger=0)
            ctx.term()
            self._ready.set()
            return
        self._ready.set()
        try:
            running = True
            while running:
                ready = dict(poller.poll(100))
                if pub in ready:
                    while pub.poll(0):
                        if pub.recv()[:1] == b"\x01":
                            self._subscribed.set()
                if router is not None and router in ready:
                    self._serve_replay(router)
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                    running = self._drain(pub)
        finally:
            pub.close(linger=0)
            if router is not None:
                router.close(linger=0)
            ctx.term()

    def _drain(self, pub: Any) -> bool:
        while True:
            try:
                op, arg = self._queue.get_nowait()
            except queue.Empty:
                return True
            if op == "stop":
                return False
            if op == "flush":
                arg.set()
            elif op == "restart":
                self._seq = 0
                self._buffer.clear()
            else:
                batch: EventBatch = arg
                if batch.data_parallel_rank is None:
                    batch.data_parallel_rank = self.data_parallel_rank
                payload = encode_batch(batch)
                seq = self._seq.to_bytes(8, "big")
                self._buffer.append((self._seq, payload))
                self._seq += 1
                if op == "batch":
                    pub.send_multipart([self.topic, seq, payload])
                    self.sent += 1

    def _serve_replay(self, router: Any) -> None:
        while router.poll(0):
            frames = router.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                logger.warning("replay request with %d frames ignored", len(frames))
                continue
            identity = frames[0]
            start = int.from_bytes(frames[2], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    router.send_multipart(
                        [identity, b"", self.topic, seq.to_bytes(8, "big"), payload]
                    )
            router.send_multipart([identity, b"", *_END_MARKER])
