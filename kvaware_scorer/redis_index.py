"""One prefix index shared by several router replicas, through Redis.

Exactly one **writer** (:class:`RedisPrefixIndex`, in the replica or sidecar that runs the
KV-event listener) applies events exactly as :class:`~kvaware_scorer.index.PrefixIndex`
does; the dual-key bridge, slots, capacity and orphans stay in its memory. Every residency
change a batch makes (``apply()``, ``add_speculative()``, a clear, an eviction, an expiry)
is written to Redis in one ``MULTI``/``EXEC`` transaction when the batch releases the
index lock. Every other replica reads through a :class:`RedisIndexReader`, whose
``match()`` gives what the writer's own ``match()`` gives, in one pipelined round trip.

Redis layout, under ``<ns>`` (the namespace, default ``kvaware``)::

    <ns>:meta          hash    format, block_size, hash_seed, writer, started_ms, ...
    <ns>:stats         hash    entries, speculative_keys, updated_ms
    <ns>:pods          hash    pod -> blocks held (all ranks)
    <ns>:r:<key hex>   string  real tiers: sorted lines "pod|rank|tier"
    <ns>:s:<key hex>   string  speculative: sorted lines "pod|rank|deadline_ms", expiring
                               (PXAT) at its latest deadline

``<key hex>`` is the request key as 16 lower-case hex digits. ``%``, ``|`` and newlines
in pod and tier names are written as ``%25``, ``%7C`` and ``%0A``. The writer rewrites a
key's two strings whole from its in-memory state, so nothing in Redis depends on the
writer's slot bits, two writers fed the same events write the same bytes, and a failed
write is repaired by writing the same keys again later. Deadlines are Unix time in ms
(the writer's wall clock); readers drop a speculative member once its deadline passed,
even when the writer is gone, and Redis drops the whole string at the latest one.

The decisions (one writer, wipe at start, resync after Redis loses data, what a reader
does when Redis is down) are in ``docs/redis.md``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
import uuid
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from kvaware_scorer.errors import ConfigError, KVAwareError
from kvaware_scorer.index import DEFAULT_SPECULATIVE_TTL_S, PrefixIndex, PrefixMatch
from kvaware_scorer.keys import KeyHasher
from kvaware_scorer.ratelimit import RateLimitedLogger
from kvaware_scorer.residency import (
    BUILTIN_TIERS,
    DEFAULT_OTHER_TIER_WEIGHT,
    DEFAULT_TIER_WEIGHTS,
    MAX_TIERS,
    SPECULATIVE,
    Residency,
    weigh_prefix,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "kvaware"
DEFAULT_FLUSH_CHUNK_KEYS = 8192
_NAMESPACE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_CACHE_LIMIT = 1 << 16  # encoded / decoded values kept per process
_MAX_READER_SLOTS = 4096  # reader-local (pod, rank) bits before the decoder starts afresh
_MAX_IDLE_CONNECTIONS = 8
_SCAN_COUNT = 1000
_MAX_SCAN_CALLS = 1_000_000
_MAX_OVERLAY_KEYS = 1_000_000
_REDIS_ERRORS = (RedisError, OSError)
_LITTLE_ENDIAN = sys.byteorder == "little"

Member = tuple[str, int, str]  # (pod, rank, tier)


# ---------------------------------------------------------------------------- helpers


def _esc(text: str) -> bytes:
    if "%" in text or "|" in text or "\n" in text:
        text = text.replace("%", "%25").replace("|", "%7C").replace("\n", "%0A")
    return text.encode("utf-8", "surrogateescape")


def _unesc(raw: bytes) -> str:
    text = raw.decode("utf-8", "surrogateescape")
    if "%" in text:
        text = text.replace("%0A", "\n").replace("%7C", "|").replace("%25", "%")
    return text


def _pack(*args: bytes) -> bytes:
    """One command in RESP (the Redis wire protocol)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def check_namespace(namespace: str) -> str:
    """Namespaces are letters, digits, ``_ . -``: no ``:`` (no nesting) and no glob chars."""
    if not namespace or not set(namespace) <= _NAMESPACE_CHARS:
        raise ConfigError(
            f"redis namespace {namespace!r} is not allowed; use letters, digits, '_', '.' or '-'"
        )
    return namespace


def _tier_weights(
    tier_weights: Mapping[str, float] | None, other_tier_weight: float
) -> tuple[dict[str, float], list[float]]:
    """The named weights and the builtin tiers' weights, as ``PrefixIndex`` derives them."""
    weights = dict(DEFAULT_TIER_WEIGHTS if tier_weights is None else tier_weights)
    for name, weight in weights.items():
        if not 0.0 <= weight <= 1.0:
            raise ConfigError(f"tier weight for {name!r} must be in [0, 1], got {weight!r}")
    spec_weight = weights.pop("speculative", weights.get("gpu", 1.0))
    builtin = [weights.get("gpu", 1.0), weights.get("cpu", other_tier_weight), spec_weight]
    return weights, builtin


def residency_snapshot(index: PrefixIndex) -> dict[int, frozenset[Member]]:
    """Every request key of an in-memory index with its holders as (pod, rank, tier).

    Independent of slot bits, so two indexes fed the same events compare equal, and so
    does :meth:`RedisIndexReader.snapshot` of the Redis copy. For tests and debugging:
    it walks the whole index.
    """
    owners = dict(index._bit_owner)
    names = list(index._tier_names)
    out: dict[int, frozenset[Member]] = {}
    for key, value in list(index._entries.items()):
        masks = [value] if value.__class__ is int else list(value[1:])  # type: ignore[index]
        members: set[Member] = set()
        for tier, mask in enumerate(masks):
            while mask:
                bit = mask & -mask
                mask ^= bit
                pod, rank = owners[bit]
                members.add((pod, rank, names[tier]))
        out[key] = frozenset(members)
    return out


class _Link:
    """Raw connections to one Redis: our own RESP packing, redis-py's sockets and reply
    parser (hiredis when installed). A small stack of idle connections serves threads."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        try:
            pool = redis.ConnectionPool.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),
                protocol=2,  # RESP2: plain arrays on every Redis >= 6.2 and redis-py >= 5
            )
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"redis_url {redact_url(url)!r} is not valid: {exc}") from exc
        self._factory = pool.connection_class
        self._kwargs = dict(pool.connection_kwargs)
        self._idle: deque[Any] = deque()
        self._closed = False

    def call(self, commands: Sequence[bytes]) -> list[Any]:
        """Send packed commands in one write and read one reply per command.

        A pooled connection that turns out dead (Redis restarted, or closed an idle
        client) is dropped with the other idle ones and the call made once more on a new
        connection: every command this module sends can safely run twice.
        """
        payload = [b"".join(commands)]
        for attempt in range(2):
            conn = None
            if not attempt:
                with contextlib.suppress(IndexError):
                    conn = self._idle.pop()
            reused = conn is not None
            if conn is None:
                conn = self._factory(**self._kwargs)
            try:
                conn.send_packed_command(payload, check_health=False)
                replies = [conn.read_response() for _ in commands]
            except (RedisConnectionError, ConnectionError):
                conn.disconnect()
                if not reused:
                    raise
                self.close_idle()
                continue
            except BaseException:
                conn.disconnect()  # replies may be left unread: never reuse it
                raise
            if self._closed or len(self._idle) >= _MAX_IDLE_CONNECTIONS:
                conn.disconnect()
            else:
                self._idle.append(conn)
            return replies
        raise RedisConnectionError("no connection")  # not reached: attempt 1 is fresh

    def close_idle(self) -> None:
        while self._idle:
            try:
                self._idle.pop().disconnect()
            except IndexError:  # another thread took it
                return

    def close(self) -> None:
        self._closed = True
        self.close_idle()


def _connect(url: str, timeout_s: float, role: str) -> _Link:
    link = _Link(url, timeout_s)
    try:
        reply = link.call([_pack(b"PING")])
    except _REDIS_ERRORS as exc:
        link.close()
        raise KVAwareError(
            f"{role}: cannot reach Redis at {redact_url(url)}: {exc}; "
            "check index.redis_url and that Redis is running"
        ) from exc
    if reply[0] not in (b"PONG", "PONG", True):
        link.close()
        raise KVAwareError(f"{role}: {redact_url(url)} did not answer PING like Redis: {reply!r}")
    return link


# ---------------------------------------------------------------------------- writer


class _MirrorLock:
    """The writer's index lock: releasing it writes what the batch changed to Redis.

    Every mutation of a :class:`PrefixIndex` happens under its lock, so hooking the
    release covers ``apply()``, ``add_speculative()``, ``expire_speculative()``,
    ``clear_pod()``, ``remove_pod()`` and ``set_pod()`` (capacity) alike.
    """

    __slots__ = ("_after", "inner")

    def __init__(self, after: Callable[[], object]) -> None:
        self.inner = threading.Lock()
        self._after = after

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self.inner.acquire(blocking, timeout)

    def release(self) -> None:
        self.inner.release()
        self._after()

    def locked(self) -> bool:
        return self.inner.locked()

    def __enter__(self) -> bool:
        return self.inner.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _Flush:
    keys: set[int]
    commands: list[bytes]
    pods: dict[str, int]


class RedisPrefixIndex(PrefixIndex):
    """A :class:`PrefixIndex` whose residency is mirrored to Redis for other replicas.

    In-memory behaviour (and the writer's own lock-free ``match()``) is unchanged. At
    construction it connects (a :class:`KVAwareError` naming the URL if Redis cannot be
    reached), wipes the namespace (a new writer starts empty and rebuilds from the pods'
    events) and records ``block_size``/``hash_seed`` for readers to check.

    After each write batch the changed keys go to Redis in one transaction (batches of
    more than ``flush_chunk_keys`` keys, such as clearing a large pod, in several). If
    Redis fails, the keys stay pending, the error is counted and logged (rate-limited),
    and nothing is tried for ``retry_interval_s``; the next batch after that writes them.
    If Redis lost the namespace (a restart without persistence), the whole index is
    written again. ``expire_speculative()`` (the listener calls it every 50 ms) also
    writes a heartbeat when nothing was written for ``heartbeat_s``.

    Exactly one writer per namespace: a writer that finds another one's id in
    ``<ns>:meta`` stops writing, logs an error and asks the owner to rewrite the
    namespace (its one stale transaction is then overwritten).
    """

    def __init__(
        self,
        *,
        redis_url: str = DEFAULT_REDIS_URL,
        namespace: str = DEFAULT_NAMESPACE,
        redis_timeout_s: float = 1.0,
        retry_interval_s: float = 1.0,
        flush_chunk_keys: int = DEFAULT_FLUSH_CHUNK_KEYS,
        wall_clock: Callable[[], float] = time.time,
        log_interval_s: float = 10.0,
        heartbeat_s: float = 1.0,
        **index_kwargs: Any,
    ) -> None:
        super().__init__(**index_kwargs)
        if flush_chunk_keys <= 0 or redis_timeout_s <= 0 or min(retry_interval_s, heartbeat_s) < 0:
            raise ConfigError(
                "flush_chunk_keys and redis_timeout_s must be positive, "
                "retry_interval_s and heartbeat_s >= 0"
            )
        self.namespace = check_namespace(namespace)
        self.redis_url = redis_url
        self.writer_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._writer_id_b = self.writer_id.encode()
        self._wall_clock = wall_clock
        self._retry_interval_s = retry_interval_s
        self._chunk = flush_chunk_keys
        self._warn = RateLimitedLogger(logger, log_interval_s)
        ns = namespace.encode()
        self._meta_key = ns + b":meta"
        self._stats_key = ns + b":stats"
        self._pods_key = ns + b":pods"
        self._rprefix = ns + b":r:"
        self._sprefix = ns + b":s:"
        # Pending work, guarded by the index lock.
        self._dirty: set[int] = set()
        self._pods_dirty = True
        self._beat = False  # write a transaction even with nothing pending
        self._spec_wall: dict[int, dict[int, int]] = {}  # key -> {bit: deadline, Unix ms}
        self._spec_in_redis: set[int] = set()  # keys whose s-string may exist in Redis
        self._published_pods: dict[str, int] = {}
        # Encoding caches, dropped whenever slots change (bits are reused).
        self._member_cache: dict[tuple[int, int], bytes] = {}
        self._value_cache: dict[Residency, bytes] = {}
        # Flushing state, guarded by _send_lock.
        self._send_lock = threading.Lock()
        self._retry_at = 0.0
        self._last_write = 0.0
        self._heartbeat_s = heartbeat_s
        self._disabled = False
        self._closed = False
        self.redis_counters: dict[str, int] = {}
        self._link = _connect(redis_url, redis_timeout_s, "Redis index writer")
        mirror = _MirrorLock(self._after_write)
        self._inner = mirror.inner
        self._lock = mirror  # type: ignore[assignment]
        try:
            with self._send_lock:
                self._reset_namespace()
        except _REDIS_ERRORS as exc:
            self._link.close()
            raise KVAwareError(
                f"Redis index writer: cannot initialise namespace {namespace!r} at "
                f"{redact_url(redis_url)}: {exc}"
            ) from exc
        self.flush()

    # ------------------------------------------------------------------ tracking

    def _set(self, key: int, tier: int, bit: int) -> None:
        super()._set(key, tier, bit)
        self._dirty.add(key)
        if tier == SPECULATIVE:
            deadline = int((self._wall_clock() + self.speculative_ttl_s) * 1000)
            per_key = self._spec_wall.get(key)
            if per_key is None:
                self._spec_wall[key] = {bit: deadline}
            else:
                per_key[bit] = deadline

    def _clear(self, key: int, tier: int, bit: int) -> None:
        super()._clear(key, tier, bit)
        self._dirty.add(key)

    def _publish_snapshots(self) -> None:
        super()._publish_snapshots()
        self._pods_dirty = True
        self._member_cache = {}
        self._value_cache = {}

    def _after_write(self) -> None:
        if self._dirty or self._pods_dirty:
            self.flush()

    def expire_speculative(self) -> None:
        """Drop lapsed speculative entries; when nothing was written for ``heartbeat_s``,
        also write a heartbeat (``<ns>:stats`` ``updated_ms``). The listener calls this
        every 50 ms, so an idle writer still shows readers it is alive, and notices a
        Redis restart (and rewrites the index) without waiting for the next event."""
        super().expire_speculative()
        if time.monotonic() - self._last_write >= self._heartbeat_s and not self._disabled:
            self._beat = True
            self.flush()

    # ------------------------------------------------------------------ encoding

    def _member(self, bit: int, tier: int) -> bytes:
        cached = self._member_cache.get((bit, tier))
        if cached is None:
            pod, rank = self._bit_owner[bit]
            cached = b"%s|%d|%s" % (_esc(pod), rank, _esc(self._tier_names[tier]))
            self._member_cache[(bit, tier)] = cached
        return cached

    def _encode_real(self, value: Residency) -> bytes:
        """The ``r`` string of a residency value (b"" when only speculative)."""
        cached = self._value_cache.get(value)
        if cached is not None:
            return cached
        masks = [value] if value.__class__ is int else list(value[1:])  # type: ignore[index]
        members = []
        for tier, mask in enumerate(masks):
            if tier == SPECULATIVE:
                continue
            while mask:
                bit = mask & -mask
                mask ^= bit
                members.append(self._member(bit, tier))
        members.sort()
        encoded = b"\n".join(members)
        if len(self._value_cache) >= _CACHE_LIMIT:
            self._value_cache.clear()
        self._value_cache[value] = encoded
        return encoded

    def _encode_spec(self, key: int, mask: int) -> tuple[bytes, int]:
        """The ``s`` string of a key's speculative mask, and its latest deadline."""
        per_key = self._spec_wall.get(key, {})
        fallback = int((self._wall_clock() + self.speculative_ttl_s) * 1000)
        members = []
        latest = 0
        kept: dict[int, int] = {}
        while mask:
            bit = mask & -mask
            mask ^= bit
            deadline = per_key.get(bit, fallback)
            kept[bit] = deadline
            latest = max(latest, deadline)
            pod, rank = self._bit_owner[bit]
            members.append(b"%s|%d|%d" % (_esc(pod), rank, deadline))
        self._spec_wall[key] = kept
        members.sort()
        return b"\n".join(members), latest

    def _pod_counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(self._pod_masks, 0)
        for (pod, _rank), slot in self._slots.items():
            counts[pod] = counts.get(pod, 0) + len(slot.held)
        return counts

    def _collect(self) -> _Flush | None:
        """Under the index lock: the next transaction of pending changes, or None."""
        if not self._dirty and not self._pods_dirty and not self._beat:
            return None
        self._beat = False
        dirty = self._dirty
        if len(dirty) <= self._chunk:
            keys = dirty
            self._dirty = set()
        else:
            keys = {dirty.pop() for _ in range(self._chunk)}
        entries = self._entries
        rprefix, sprefix = self._rprefix, self._sprefix
        mset: list[bytes] = []
        dels: list[bytes] = []
        spec_cmds: list[bytes] = []
        spec_in_redis = self._spec_in_redis
        for key in keys:
            value = entries.get(key)
            hexkey = b"%016x" % key
            real = b"" if value is None else self._encode_real(value)
            if real:
                mset.append(rprefix + hexkey)
                mset.append(real)
            else:
                dels.append(rprefix + hexkey)
            spec = 0
            if value is not None and value.__class__ is not int and len(value) > 3:  # type: ignore[arg-type]
                spec = value[SPECULATIVE + 1]  # type: ignore[index]
            if spec:
                encoded, latest = self._encode_spec(key, spec)
                spec_cmds.append(_pack(b"SET", sprefix + hexkey, encoded, b"PXAT", b"%d" % latest))
                spec_in_redis.add(key)
            else:
                self._spec_wall.pop(key, None)
                if key in spec_in_redis:
                    spec_in_redis.discard(key)
                    dels.append(sprefix + hexkey)
        commands = [_pack(b"MULTI"), _pack(b"HMGET", self._meta_key, b"writer", b"rewrite")]
        if mset:
            commands.append(_pack(b"MSET", *mset))
        if dels:
            commands.append(_pack(b"DEL", *dels))
        commands.extend(spec_cmds)
        counts = self._pod_counts()
        published = self._published_pods
        changed: list[bytes] = []
        for pod, count in counts.items():
            if published.get(pod) != count:
                changed += (pod.encode("utf-8", "surrogateescape"), b"%d" % count)
        gone = [pod.encode("utf-8", "surrogateescape") for pod in published if pod not in counts]
        if changed:
            commands.append(_pack(b"HSET", self._pods_key, *changed))
        if gone:
            commands.append(_pack(b"HDEL", self._pods_key, *gone))
        self._pods_dirty = False
        commands.append(
            _pack(
                b"HSET",
                self._stats_key,
                b"entries",
                b"%d" % len(entries),
                b"speculative_keys",
                b"%d" % self._spec_keys,
                b"updated_ms",
                b"%d" % int(self._wall_clock() * 1000),
            )
        )
        commands.append(_pack(b"EXEC"))
        return _Flush(keys, commands, counts)

    # ------------------------------------------------------------------ flushing

    def _rcount(self, name: str, n: int = 1) -> None:
        self.redis_counters[name] = self.redis_counters.get(name, 0) + n

    def flush(self) -> bool:
        """Write pending changes to Redis now; True when Redis is up to date.

        Called after every write batch; call it directly to retry sooner than the next
        batch after an outage. Never raises for Redis errors (they are counted).
        """
        if self._disabled or self._closed:
            return False
        with self._send_lock:
            if time.monotonic() < self._retry_at:
                return False
            rounds = (len(self._entries) + len(self._dirty)) // self._chunk + 4
            resynced = False
            while rounds > 0:
                rounds -= 1
                with self._inner:
                    batch = self._collect()
                if batch is None:
                    return True
                try:
                    replies = self._link.call(batch.commands)
                    result = replies[-1]
                    if not isinstance(result, list):
                        raise RedisError(f"transaction aborted: {result!r}")
                    failed = [r for r in result if isinstance(r, Exception)]
                    if failed:
                        raise RedisError(f"transaction command failed: {failed[0]}")
                except _REDIS_ERRORS as exc:
                    self._write_failed(batch, exc)
                    return False
                self._published_pods = batch.pods
                self._last_write = time.monotonic()
                self._rcount("redis_flushes")
                self._rcount("redis_keys_written", len(batch.keys))
                owner, rewrite = result[0]
                if owner == self._writer_id_b and rewrite is None:
                    continue
                if owner is None or owner == self._writer_id_b:
                    # Redis lost the namespace (restarted without persistence, flushed),
                    # or a writer that lost it to us wrote into it once before stopping.
                    if resynced:
                        return False
                    logger.warning(
                        "Redis index %s at %s %s; writing the whole index again",
                        self.namespace,
                        redact_url(self.redis_url),
                        "lost its data" if owner is None else "was written by a stale writer",
                    )
                    self._rcount("redis_resyncs")
                    try:
                        self._reset_namespace()
                    except _REDIS_ERRORS as exc:
                        self._write_failed(None, exc)
                        return False
                    resynced = True
                    rounds = (len(self._entries) + len(self._dirty)) // self._chunk + 4
                    continue
                self._stop_on_conflict(owner)
                return False
            return not self._dirty

    def _stop_on_conflict(self, owner: bytes) -> None:
        """Another writer owns the namespace: stop, and have it rewrite what we wrote."""
        self._disabled = True
        self._rcount("redis_writer_conflicts")
        with contextlib.suppress(*_REDIS_ERRORS):
            self._link.call([_pack(b"HSET", self._meta_key, b"rewrite", self._writer_id_b)])
        logger.error(
            "Redis index %s at %s is now written by %r; this writer (%s) stops writing to "
            "it and asks that writer to rewrite it: run exactly one writer per namespace",
            self.namespace,
            redact_url(self.redis_url),
            owner,
            self.writer_id,
        )

    def _write_failed(self, batch: _Flush | None, exc: BaseException) -> None:
        with self._inner:
            if batch is not None:
                self._dirty |= batch.keys
                self._spec_in_redis |= batch.keys  # their s-strings may or may not exist
            self._published_pods = {}
            self._pods_dirty = True
        self._retry_at = time.monotonic() + self._retry_interval_s
        self._rcount("redis_errors")
        self._warn.warning(
            "write",
            "Redis index writer: cannot write to %s (%s); %d keys pending, retrying in %.1f s",
            redact_url(self.redis_url),
            exc,
            len(self._dirty),
            self._retry_interval_s,
        )

    def _reset_namespace(self) -> None:
        """Under the send lock: delete the namespace, write meta, mark everything pending."""
        self._wipe()
        now_ms = int(self._wall_clock() * 1000)
        self._link.call(
            [
                _pack(
                    b"HSET",
                    self._meta_key,
                    b"format",
                    FORMAT_VERSION.encode(),
                    b"block_size",
                    b"%d" % self.block_size,
                    b"hash_seed",
                    self.hasher.hash_seed.encode(),
                    b"writer",
                    self._writer_id_b,
                    b"started_ms",
                    b"%d" % now_ms,
                    b"speculative_ttl_ms",
                    b"%d" % int(self.speculative_ttl_s * 1000),
                )
            ]
        )
        with self._inner:
            self._dirty = set(self._entries)
            self._spec_in_redis = set()
            self._published_pods = {}
            self._pods_dirty = True

    def _wipe(self) -> None:
        pattern = self.namespace.encode() + b":*"
        cursor = b"0"
        for _ in range(_MAX_SCAN_CALLS):
            (reply,) = self._link.call(
                [_pack(b"SCAN", cursor, b"MATCH", pattern, b"COUNT", b"%d" % _SCAN_COUNT)]
            )
            cursor, found = reply[0], reply[1]
            if found:
                self._link.call([_pack(b"UNLINK", *found)])
            if cursor in (b"0", 0, "0"):
                return
        raise RedisError(f"SCAN of namespace {self.namespace!r} did not finish")

    def resync(self) -> bool:
        """Rewrite the whole namespace from memory (what happens after Redis lost it)."""
        with self._send_lock:
            try:
                self._reset_namespace()
            except _REDIS_ERRORS as exc:
                self._write_failed(None, exc)
                return False
            self._retry_at = 0.0
        return self.flush()

    def close(self) -> None:
        """Write what is pending, then close the connections. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._link.close()

    def __enter__(self) -> RedisPrefixIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["counters"].update(self.redis_counters)
        out["redis"] = {
            "url": redact_url(self.redis_url),
            "namespace": self.namespace,
            "writer": self.writer_id,
            "pending_keys": len(self._dirty),
            "writing": not (self._disabled or self._closed),
        }
        return out


# ---------------------------------------------------------------------------- reader


class _Decoder:
    """Reader-local decoding of Redis strings into residency masks.

    The bits are this process's own: a (pod, rank) gets one the first time it is read.
    Decoded ``r`` strings are cached by their bytes (many keys share a holder set). A
    ``match()`` keeps the decoder it started with; when too many slots accumulate
    (pods come and go), the reader starts a fresh decoder.
    """

    def __init__(self, tier_of: Callable[[bytes], int]) -> None:
        self.tier_of = tier_of
        self.bits: dict[bytes, int] = {}
        self.owner: dict[int, tuple[str, int]] = {}
        self.pod_masks: dict[str, int] = {}
        self.values: dict[bytes, Residency] = {}
        self._lock = threading.Lock()

    def bit(self, slot: bytes) -> int:
        bit = self.bits.get(slot)
        if bit is not None:
            return bit
        with self._lock:
            bit = self.bits.get(slot)
            if bit is None:
                pod_raw, _, rank_raw = slot.rpartition(b"|")
                pod, rank = _unesc(pod_raw), int(rank_raw)
                bit = 1 << len(self.bits)
                self.owner[bit] = (pod, rank)
                self.pod_masks[pod] = self.pod_masks.get(pod, 0) | bit
                self.bits[slot] = bit
            return bit

    def real(self, raw: bytes) -> Residency:
        value = self.values.get(raw)
        if value is not None:
            return value
        masks = [0, 0, 0]
        for line in raw.split(b"\n"):
            slot, _, tier_raw = line.rpartition(b"|")
            tier = self.tier_of(tier_raw)
            while len(masks) <= tier:
                masks.append(0)
            masks[tier] |= self.bit(slot)
        value = _residency(masks)
        if len(self.values) >= _CACHE_LIMIT:
            self.values.clear()  # keep the current working set, not the first one
        self.values[raw] = value
        return value

    def spec(self, raw: bytes, now_ms: int) -> int:
        mask = 0
        for line in raw.split(b"\n"):
            slot, _, deadline = line.rpartition(b"|")
            if int(deadline) > now_ms:
                mask |= self.bit(slot)
        return mask


def _pairs(reply: Any) -> dict[bytes, bytes]:
    """A HGETALL reply as a dict (a flat array in RESP2, a map in RESP3)."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _residency(masks: list[int]) -> Residency:
    while len(masks) > 1 and not masks[-1]:
        masks.pop()
    if len(masks) == 1:
        return masks[0]
    any_mask = 0
    for mask in masks:
        any_mask |= mask
    return (any_mask, *masks)


def _with_spec(value: Residency | None, spec: int) -> Residency:
    if value is None:
        return (spec, 0, 0, spec)
    masks = [value, 0, 0] if value.__class__ is int else list(value[1:])  # type: ignore[index]
    while len(masks) <= SPECULATIVE:
        masks.append(0)
    masks[SPECULATIVE] |= spec
    return _residency(masks)


class RedisIndexReader:
    """Reads the shared index a :class:`RedisPrefixIndex` writes; for the other replicas.

    ``match()`` has the semantics and output of :meth:`PrefixIndex.match`, in one
    pipelined round trip: the writer's config, the pod list (only when ``pods`` is None)
    and the ``r`` and ``s`` strings of every key (two ``MGET``); results are decoded in
    order and decoding stops at the first block no candidate holds.

    ``block_size`` and ``hash_seed`` must be the writer's (checked at start-up, where a
    mismatch raises :class:`ConfigError`, and at every read, where it gives no matches).
    Redis unreachable at start-up raises :class:`KVAwareError` naming the URL. At read
    time it never raises: ``match()`` returns no matches (zero for every asked pod), the
    failure is counted and logged (rate-limited), and Redis is not asked again for
    ``retry_interval_s``, so routing does not wait on timeouts.

    ``add_speculative()`` keeps this replica's own routing decisions in memory for
    ``speculative_ttl_s`` (scored like GPU blocks, unless Redis shows the pod holding the
    block); they are not shared with other replicas. ``set_pod``/``clear_pod``/
    ``remove_pod`` only touch that local state: the writer owns the index.
    """

    def __init__(
        self,
        *,
        redis_url: str = DEFAULT_REDIS_URL,
        namespace: str = DEFAULT_NAMESPACE,
        block_size: int = 16,
        hash_seed: str = "",
        tier_weights: Mapping[str, float] | None = None,
        other_tier_weight: float = DEFAULT_OTHER_TIER_WEIGHT,
        speculative_ttl_s: float = DEFAULT_SPECULATIVE_TTL_S,
        default_model: str = "",
        timeout_s: float = 0.25,
        retry_interval_s: float = 1.0,
        log_interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if speculative_ttl_s < 0 or timeout_s <= 0 or retry_interval_s < 0:
            raise ConfigError(
                "speculative_ttl_s and retry_interval_s must be >= 0, timeout_s positive"
            )
        self.hasher = KeyHasher(block_size, hash_seed)
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.default_model = default_model
        self.speculative_ttl_s = speculative_ttl_s
        self.namespace = check_namespace(namespace)
        self.redis_url = redis_url
        self._named_weights, self._weights = _tier_weights(tier_weights, other_tier_weight)
        self._other_weight = other_tier_weight
        self._tier_names: list[str] = list(BUILTIN_TIERS)
        self._tier_raw: dict[bytes, int] = {_esc(n): i for i, n in enumerate(BUILTIN_TIERS)}
        self._tier_lock = threading.Lock()
        self._clock = clock
        self._wall_clock = wall_clock
        self._retry_interval_s = retry_interval_s
        self._down_until = 0.0
        self._warn = RateLimitedLogger(logger, log_interval_s, clock)
        self.counters: dict[str, int] = {}
        self._decoder = _Decoder(self._tier_of)
        ns = namespace.encode()
        self._name_len = len(namespace) + 19  # "<ns>:r:" + 16 hex digits
        self._mget_parts = [
            (f"{namespace}:{kind}:", f"\r\n${self._name_len}\r\n{namespace}:{kind}:")
            for kind in ("r", "s")
        ]
        self._expected = [FORMAT_VERSION.encode(), b"%d" % block_size, hash_seed.encode()]
        self._meta_cmd = _pack(b"HMGET", ns + b":meta", b"format", b"block_size", b"hash_seed")
        self._pods_cmd = _pack(b"HKEYS", ns + b":pods")
        self._stats_cmds = [
            _pack(b"HGETALL", ns + b":meta"),
            _pack(b"HGETALL", ns + b":stats"),
            _pack(b"HGETALL", ns + b":pods"),
        ]
        # This replica's speculative entries: key -> {slot: deadline (clock)}.
        self._overlay: dict[int, dict[bytes, float]] = {}
        self._overlay_queue: deque[tuple[float, bytes, tuple[int, ...]]] = deque()
        self._overlay_lock = threading.Lock()
        self._link = _connect(redis_url, timeout_s, "Redis index reader")
        try:
            (meta,) = self._link.call([self._meta_cmd])
        except _REDIS_ERRORS as exc:
            self._link.close()
            raise KVAwareError(
                f"Redis index reader: cannot read {namespace}:meta at {redact_url(redis_url)}: "
                f"{exc}"
            ) from exc
        if all(v is None for v in meta):
            logger.warning(
                "Redis index %s at %s has no writer yet; matches are empty until one starts",
                namespace,
                redact_url(redis_url),
            )
        elif list(meta) != self._expected:
            self._link.close()
            raise ConfigError(self._mismatch(meta))

    # ------------------------------------------------------------------ helpers

    def _mismatch(self, meta: Sequence[bytes | None]) -> str:
        def show(raw: bytes | None) -> str:
            return "<missing>" if raw is None else repr(raw.decode("utf-8", "replace"))

        return (
            f"Redis index {self.namespace!r} at {redact_url(self.redis_url)} was written with "
            f"format {show(meta[0])}, block_size {show(meta[1])}, hash_seed {show(meta[2])}, "
            f"but this reader has format {FORMAT_VERSION!r}, block_size {self.block_size}, "
            f"hash_seed {self.hash_seed!r}; set index.block_size and index.hash_seed to the "
            "writer's (and run the same kvaware-scorer version)"
        )

    def _tier_of(self, raw: bytes) -> int:
        tier = self._tier_raw.get(raw)
        if tier is not None:
            return tier
        with self._tier_lock:
            tier = self._tier_raw.get(raw)
            if tier is None:
                name = _unesc(raw)
                if name not in self._tier_names and len(self._tier_names) >= MAX_TIERS:
                    name = "other"  # as the writer folds them
                if name in self._tier_names:
                    tier = self._tier_names.index(name)
                else:
                    tier = len(self._tier_names)
                    self._weights.append(self._named_weights.get(name, self._other_weight))
                    self._tier_names.append(name)
                self._tier_raw[raw] = tier
            return tier

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def _failed(self, exc: BaseException) -> None:
        self._count("redis_errors")
        self._down_until = self._clock() + self._retry_interval_s
        self._warn.warning(
            "down",
            "Redis index reader: %s unreachable (%s); scoring without KV-cache matches for %.1f s",
            redact_url(self.redis_url),
            exc,
            self._retry_interval_s,
        )

    def _empty(self, wanted: Iterable[str] | None, total: int) -> dict[str, PrefixMatch]:
        if wanted is None:
            return {}
        return {pod: PrefixMatch(pod, 0, total, self.block_size, 0.0, {}, 0) for pod in wanted}

    def _decoder_now(self) -> _Decoder:
        decoder = self._decoder
        if len(decoder.bits) > _MAX_READER_SLOTS:
            decoder = self._decoder = _Decoder(self._tier_of)
        return decoder

    # ------------------------------------------------------------------ reads

    keys = PrefixIndex.keys  # same hasher settings as the writer, checked at start-up

    def match(
        self, keys: Sequence[int], pods: Iterable[str] | None = None
    ) -> dict[str, PrefixMatch]:
        """Longest cached prefix per pod, from block 0, as :meth:`PrefixIndex.match`."""
        wanted: list[str] | None = None if pods is None else list(pods)
        total = len(keys)
        if wanted is not None and (not total or not wanted):
            return self._empty(wanted, total)
        if self._clock() < self._down_until:
            self._count("skipped_redis_down")
            return self._empty(wanted, total)
        commands = [self._meta_cmd]
        if wanted is None:
            commands.append(self._pods_cmd)
        if total:
            try:
                packed = array("Q", keys)
            except (OverflowError, TypeError):
                self._count("bad_keys")  # not request keys (uint64): nothing can match
                return self._empty(wanted, total)
            if _LITTLE_ENDIAN:
                packed.byteswap()
            # "k0 k1 ..." as 16 hex digits each, then the spaces become the RESP framing.
            hexed = packed.tobytes().hex(" ", 8)
            head = f"*{total + 1}\r\n$4\r\nMGET\r\n${self._name_len}\r\n"
            for prefix, sep in self._mget_parts:
                commands.append(f"{head}{prefix}{hexed.replace(' ', sep)}\r\n".encode())
        try:
            replies = self._link.call(commands)
        except _REDIS_ERRORS as exc:
            self._failed(exc)
            return self._empty(wanted, total)
        self._count("reads")
        meta = replies[0]
        if meta != self._expected:
            if all(v is None for v in meta):
                self._count("no_writer")
                self._warn.warning(
                    "nowriter",
                    "Redis index %s at %s has no writer; no KV-cache matches",
                    self.namespace,
                    redact_url(self.redis_url),
                )
            else:
                self._count("config_mismatch")
                self._warn.warning("mismatch", "%s", self._mismatch(meta))
            return self._empty(wanted, total)
        if wanted is None:
            wanted = [raw.decode("utf-8", "surrogateescape") for raw in replies[1]]
        if not total:
            return self._empty(wanted, total)
        try:
            return self._walk(keys, replies[-2], replies[-1], wanted)
        except (ValueError, IndexError, KeyError) as exc:  # not what a writer writes
            self._count("bad_values")
            self._warn.warning(
                "badvalue", "Redis index %s: unreadable value: %r", self.namespace, exc
            )
            return self._empty(wanted, total)

    def _walk(
        self,
        keys: Sequence[int],
        reals: list[bytes | None],
        specs: list[bytes | None],
        wanted: list[str],
    ) -> dict[str, PrefixMatch]:
        # The walk of PrefixIndex.match over decoded values, stopping at the first block
        # no candidate holds (later replies are never decoded).
        decoder = self._decoder_now()
        drops: list[tuple[int, int]] = []
        special: list[tuple[int, tuple[int, ...]]] = []
        total = len(keys)
        if specs.count(None) == total and not self._overlay:
            values: Iterable[Residency | None] = self._reals(decoder, reals)
        else:
            values = self._merged(decoder, keys, reals, specs)
        walk = iter(values)
        first = next(walk, None)
        alive = 0
        if first is not None:
            pod_masks = decoder.pod_masks  # block 0 decoded: its slots have bits
            for pod in wanted:
                alive |= pod_masks.get(pod, 0)
        value = first
        depth = 0
        while alive and value is not None:
            if value.__class__ is int:
                mask = value
            else:
                mask = value[0]  # type: ignore[index]
                special.append((depth, value))  # type: ignore[arg-type]
            kept = alive & mask
            if kept != alive:
                drops.append((depth, alive ^ kept))
                alive = kept
            depth += 1
            value = next(walk, None)
        if alive:
            drops.append((depth, alive))
        return self._results(decoder, wanted, total, drops, special)

    @staticmethod
    def _reals(decoder: _Decoder, reals: list[bytes | None]) -> Iterator[Residency | None]:
        """Decoded ``r`` strings in order (the common case: nothing speculative)."""
        cached = decoder.values.get
        for raw in reals:
            if raw is None:
                return
            value = cached(raw)
            yield decoder.real(raw) if value is None else value

    def _merged(
        self,
        decoder: _Decoder,
        keys: Sequence[int],
        reals: list[bytes | None],
        specs: list[bytes | None],
    ) -> Iterator[Residency | None]:
        """Decoded ``r`` strings with live speculative members (Redis and this replica's)."""
        now_ms = int(self._wall_clock() * 1000)
        overlay = self._overlay
        now = self._clock() if overlay else 0.0
        for key, raw, sraw in zip(keys, reals, specs, strict=True):
            value: Residency | None = None if raw is None else decoder.real(raw)
            spec = 0 if sraw is None else decoder.spec(sraw, now_ms)
            mine = overlay.get(key) if overlay else None
            if mine:
                held = 0 if value is None else value if value.__class__ is int else value[0]  # type: ignore[index]
                for slot, deadline in list(mine.items()):
                    if deadline > now:
                        bit = decoder.bit(slot)
                        if not held & bit:
                            spec |= bit
            if spec:
                value = _with_spec(value, spec)
            if value is None:
                return
            yield value

    def _results(
        self,
        decoder: _Decoder,
        wanted: list[str],
        total: int,
        drops: list[tuple[int, int]],
        special: list[tuple[int, tuple[int, ...]]],
    ) -> dict[str, PrefixMatch]:
        # The same arithmetic, in the same order, as PrefixIndex._results; ties between
        # ranks of one pod go to the lowest rank (the writer: the slot seen first).
        owners = decoder.owner
        weights = self._weights
        names = self._tier_names
        wanted_set = set(wanted)
        results: dict[str, PrefixMatch] = {}
        for depth, dropped_mask in drops:
            if not depth:
                continue
            slots = []
            left = dropped_mask
            while left:
                bit = left & -left
                left ^= bit
                pod, rank = owners[bit]
                if pod in wanted_set:
                    slots.append((rank, bit, pod))
            slots.sort()
            for rank, bit, pod in slots:
                weighted, tiers = weigh_prefix(bit, depth, special, weights, names)
                current = results.get(pod)
                if current is None or weighted > current.weighted_blocks:
                    results[pod] = PrefixMatch(
                        pod,
                        depth,
                        total,
                        self.block_size,
                        weighted,
                        tiers,
                        rank,
                    )
        for pod in wanted:
            if pod not in results:
                results[pod] = PrefixMatch(pod, 0, total, self.block_size, 0.0, {}, 0)
        return results

    def pods(self) -> list[str]:
        """The pods the writer knows, sorted (empty when Redis is unreachable)."""
        if self._clock() < self._down_until:
            return []
        try:
            (names,) = self._link.call([self._pods_cmd])
        except _REDIS_ERRORS as exc:
            self._failed(exc)
            return []
        return sorted(raw.decode("utf-8", "surrogateescape") for raw in names)

    def stats(self) -> dict[str, Any]:
        """The writer's published counts (entries, blocks per pod, speculative keys) and
        this reader's counters; ``redis_ok`` False when Redis could not be read."""
        out: dict[str, Any] = {
            "entries": 0,
            "pod_blocks": {},
            "speculative_keys": 0,
            "local_speculative_keys": len(self._overlay),
            "counters": dict(self.counters),
            "redis_ok": False,
            "writer": None,
        }
        try:
            meta, stats, pods = self._link.call(self._stats_cmds)
        except _REDIS_ERRORS as exc:
            self._failed(exc)
            return out
        meta_map, stats_map, pods_map = _pairs(meta), _pairs(stats), _pairs(pods)
        writer = meta_map.get(b"writer")
        out.update(
            entries=int(stats_map.get(b"entries", 0)),
            speculative_keys=int(stats_map.get(b"speculative_keys", 0)),
            pod_blocks={k.decode("utf-8", "surrogateescape"): int(v) for k, v in pods_map.items()},
            redis_ok=True,
            writer=None if writer is None else writer.decode("utf-8", "replace"),
        )
        updated = stats_map.get(b"updated_ms")
        if updated is not None:
            out["writer_updated_age_s"] = round(self._wall_clock() - int(updated) / 1000, 3)
        return out

    def snapshot(self, limit: int = 1_000_000) -> dict[int, frozenset[Member]]:
        """Every key in Redis with its holders as (pod, rank, tier), live speculative
        members included; comparable with :func:`residency_snapshot`. Reads at most
        ``limit`` keys (SCAN); for tests and debugging."""
        now_ms = int(self._wall_clock() * 1000)
        out: dict[int, set[Member]] = {}
        pattern = self.namespace.encode() + b":[rs]:*"
        cursor = b"0"
        seen = 0
        for _ in range(_MAX_SCAN_CALLS):
            (reply,) = self._link.call(
                [_pack(b"SCAN", cursor, b"MATCH", pattern, b"COUNT", b"%d" % _SCAN_COUNT)]
            )
            cursor, found = reply[0], reply[1]
            if found:
                (values,) = self._link.call([_pack(b"MGET", *found)])
                for name, raw in zip(found, values, strict=True):
                    if raw is None:
                        continue
                    kind, key = name[-18:-17], int(name[-16:], 16)
                    members = out.setdefault(key, set())
                    for line in raw.split(b"\n"):
                        pod_raw, rank_raw, last = line.split(b"|")
                        pod, rank = _unesc(pod_raw), int(rank_raw)
                        if kind == b"r":
                            members.add((pod, rank, _unesc(last)))
                        elif int(last) > now_ms:
                            members.add((pod, rank, "speculative"))
                    if not members:
                        del out[key]
                seen += len(found)
            if cursor in (b"0", 0, "0") or seen >= limit:
                break
        return {key: frozenset(members) for key, members in out.items()}

    # ------------------------------------------------------------------ local state

    def add_speculative(self, pod: str, keys: Sequence[int], *, rank: int = 0) -> None:
        """Remember that ``keys`` were just routed to ``pod`` (this replica only)."""
        if not keys or self.speculative_ttl_s <= 0:
            return
        now = self._clock()
        deadline = now + self.speculative_ttl_s
        slot = b"%s|%d" % (_esc(pod), rank)
        with self._overlay_lock:
            self._expire(now)
            overlay = self._overlay
            for key in keys:
                current = overlay.get(key)
                overlay[key] = {slot: deadline} if current is None else {**current, slot: deadline}
            self._overlay_queue.append((deadline, slot, tuple(keys)))
            while len(overlay) > _MAX_OVERLAY_KEYS and self._overlay_queue:
                self._drop(self._overlay_queue.popleft(), force=True)

    def expire_speculative(self) -> None:
        """Drop this replica's lapsed speculative entries."""
        if self._overlay_queue:
            with self._overlay_lock:
                self._expire(self._clock())

    def _expire(self, now: float) -> None:
        queue = self._overlay_queue
        while queue and queue[0][0] <= now:
            self._drop(queue.popleft(), force=False)

    def _drop(self, item: tuple[float, bytes, tuple[int, ...]], *, force: bool) -> None:
        deadline, slot, keys = item
        overlay = self._overlay
        for key in keys:
            current = overlay.get(key)
            if current is None or slot not in current:
                continue
            if not force and current[slot] > deadline:
                continue  # routed there again since
            rest = {s: d for s, d in current.items() if s != slot}
            if rest:
                overlay[key] = rest
            else:
                del overlay[key]

    def set_pod(self, pod: str, *, model: str | None = None, capacity: int | None = None) -> None:
        """Accepted for interface compatibility; the writer owns pods and capacities."""

    def clear_pod(self, pod: str, rank: int | None = None) -> None:
        """Forget this replica's speculative entries for ``pod`` (one rank, or all)."""
        escaped = _esc(pod)
        with self._overlay_lock:
            for key, current in list(self._overlay.items()):
                rest = {}
                for slot, deadline in current.items():
                    slot_pod, _, slot_rank = slot.rpartition(b"|")
                    if slot_pod != escaped or (rank is not None and int(slot_rank) != rank):
                        rest[slot] = deadline
                if len(rest) != len(current):
                    if rest:
                        self._overlay[key] = rest
                    else:
                        del self._overlay[key]

    def remove_pod(self, pod: str) -> None:
        """Forget this replica's speculative entries for ``pod``."""
        self.clear_pod(pod)

    def close(self) -> None:
        """Close the connections. Idempotent."""
        self._link.close()

    def __enter__(self) -> RedisIndexReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
