"""vLLM KV-event wire format: ZeroMQ frames and msgpack payloads, decoded and encoded.

A KV-event message is three ZeroMQ frames ``[topic, seq, payload]``: the UTF-8 topic
(often empty), an 8-byte big-endian unsigned sequence number, and the msgpack payload.
The payload is a batch ``[ts, events, data_parallel_rank]`` (vLLM 0.9.0 sent only the
first two elements). Events are maps with a ``"type"`` key from vLLM 0.24.0 on, and
tagged arrays ``["BlockStored", block_hashes, parent_block_hash, ...]`` up to 0.23.0;
both forms are accepted, even mixed in one batch.

Decoding tries two typed :mod:`msgspec` decoders first (all-map events, then all-array
events), which validate and build every field in C. When neither fits (a mixed batch or
bad input), the batch is split into raw events and each is decoded on its own by the same
typed structs, so one bad event is dropped while the others are kept; a plain msgpack
decode and a check in Python then only name the reason the bad event was dropped.

Every error raised for bad input is a :class:`~kvaware_scorer.errors.WireError` whose
``reason`` is one of :data:`REASONS`. Hashes are returned as they were on the wire: an
``int`` in ``[0, 2**64)`` (never read as signed) or ``bytes`` of at least 8 bytes.

The encoders write vLLM 0.33.0's layout (:func:`encode_batch`, :func:`encode_frames`)
and the array layout of vLLM 0.23.0 (:func:`encode_batch_legacy`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, NoReturn, TypeAlias, TypeGuard

import msgspec
from msgspec import Meta, Struct

from kvaware_scorer.errors import WireError
from kvaware_scorer.events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
)

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "END_SEQ",
    "REASONS",
    "DecodedMessage",
    "decode_frames",
    "decode_payload",
    "encode_batch",
    "encode_batch_legacy",
    "encode_frames",
    "event_to_map",
    "parse_seq",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD_BYTES: Final[int] = 16 * 1024 * 1024
"""Largest payload :func:`decode_payload` accepts by default (16 MiB)."""

END_SEQ: Final[int] = 2**64 - 1
# Past this many malformed events, the whole batch is refused (``bad_batch``).
MAX_BAD_EVENTS: Final[int] = 64
# A scheduler step emits one BlockStored per request and one BlockRemoved per evicted
# block; a batch that is not well formed and declares more events than this is refused.
MAX_EVENTS_PER_BATCH: Final[int] = 16_384
"""Sequence number of the replay end marker (``ff`` * 8, i.e. -1 as a signed int64)."""

REASONS: Final[frozenset[str]] = frozenset(
    {
        "too_large",
        "not_msgpack",
        "bad_batch",
        "bad_event",
        "unknown_event_type",
        "frame_count",
        "bad_seq",
        "bad_topic",
    }
)
"""Every ``WireError.reason`` this module uses (also the reasons in ``EventBatch.errors``)."""

_U64_LIMIT: Final[int] = 2**64
_MIN_HASH_BYTES: Final[int] = 8

# --------------------------------------------------------------------------------------
# Typed decoding (msgspec Structs). These structs alone decide what is accepted; the Python
# check of the slow path below only names the reason of a refusal, so it must refuse
# exactly what they refuse (tests/test_wire.py checks that the two agree).
# --------------------------------------------------------------------------------------

_Hash: TypeAlias = Annotated[int, Meta(ge=0)] | Annotated[bytes, Meta(min_length=_MIN_HASH_BYTES)]
_NonNegInt: TypeAlias = Annotated[int, Meta(ge=0)]


class _MapBlockStored(Struct, tag="BlockStored", tag_field="type"):
    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None
    token_ids: list[int]
    block_size: _NonNegInt
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[list[Any] | None] | None = None
    group_idx: _NonNegInt | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


class _MapBlockRemoved(Struct, tag="BlockRemoved", tag_field="type"):
    block_hashes: list[_Hash]
    medium: str | None = None
    group_idx: _NonNegInt | None = None
    locality: str | None = None
    ownership: str | None = None


class _MapAllBlocksCleared(Struct, tag="AllBlocksCleared", tag_field="type"):
    pass


class _MapBatch(Struct, array_like=True, forbid_unknown_fields=True):
    ts: float
    events: list[_MapBlockStored | _MapBlockRemoved | _MapAllBlocksCleared]
    data_parallel_rank: int | None = None


class _ArrayBlockStored(Struct, tag="BlockStored", array_like=True):
    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None
    token_ids: list[int]
    block_size: _NonNegInt
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[list[Any] | None] | None = None
    group_idx: _NonNegInt | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class _ArrayBlockRemoved(Struct, tag="BlockRemoved", array_like=True):
    block_hashes: list[_Hash]
    medium: str | None = None
    group_idx: _NonNegInt | None = None


class _ArrayAllBlocksCleared(Struct, tag="AllBlocksCleared", array_like=True):
    pass


class _ArrayBatch(Struct, array_like=True, forbid_unknown_fields=True):
    ts: float
    events: list[_ArrayBlockStored | _ArrayBlockRemoved | _ArrayAllBlocksCleared]
    data_parallel_rank: int | None = None


_MapEvent: TypeAlias = _MapBlockStored | _MapBlockRemoved | _MapAllBlocksCleared
_ArrayEvent: TypeAlias = _ArrayBlockStored | _ArrayBlockRemoved | _ArrayAllBlocksCleared


class _RawBatch(Struct, array_like=True, forbid_unknown_fields=True):
    """The batch with its events left undecoded (slow path: one event at a time)."""

    ts: float
    events: list[msgspec.Raw]
    data_parallel_rank: int | None = None


_map_decoder: Final = msgspec.msgpack.Decoder(_MapBatch)
_array_decoder: Final = msgspec.msgpack.Decoder(_ArrayBatch)
_raw_batch_decoder: Final = msgspec.msgpack.Decoder(_RawBatch)
_map_event_decoder: Final = msgspec.msgpack.Decoder(_MapEvent)
_array_event_decoder: Final = msgspec.msgpack.Decoder(_ArrayEvent)
_generic_decoder: Final = msgspec.msgpack.Decoder()


def _convert(ev: _MapEvent | _ArrayEvent) -> KVEvent:
    """The events.py dataclass for a typed event (array events lack the newer fields)."""
    if isinstance(ev, (_MapBlockStored, _ArrayBlockStored)):
        return BlockStored(
            ev.block_hashes,
            ev.parent_block_hash,
            ev.token_ids,
            ev.block_size,
            ev.lora_id,
            ev.medium,
            ev.lora_name,
            ev.extra_keys,
            ev.group_idx,
            ev.kv_cache_spec_kind,
            ev.kv_cache_spec_sliding_window,
            getattr(ev, "locality", None),
            getattr(ev, "ownership", None),
            getattr(ev, "session_id", None),
            getattr(ev, "lookahead_token_ids", None),
        )
    if isinstance(ev, (_MapBlockRemoved, _ArrayBlockRemoved)):
        return BlockRemoved(
            ev.block_hashes,
            ev.medium,
            ev.group_idx,
            getattr(ev, "locality", None),
            getattr(ev, "ownership", None),
        )
    return AllBlocksCleared()


def _from_typed(typed: _MapBatch | _ArrayBatch) -> EventBatch:
    # The common single-hash BlockRemoved (one per evicted block) is built inline.
    events: list[KVEvent] = [
        BlockRemoved(ev.block_hashes, ev.medium, ev.group_idx, ev.locality, ev.ownership)
        if type(ev) is _MapBlockRemoved
        else _convert(ev)
        for ev in typed.events
    ]
    return EventBatch(typed.ts, events, typed.data_parallel_rank)


# --------------------------------------------------------------------------------------
# Slow path, for a batch the typed decoders refuse: the batch is split into raw events,
# each one is decoded by the same typed Structs, and an event they refuse is decoded as
# plain msgpack and checked in Python only to name the reason it is dropped.
# --------------------------------------------------------------------------------------


def _bad_event(message: str) -> NoReturn:
    raise WireError("bad_event", message)


def _is_hash(value: object) -> TypeGuard[BlockHash]:
    if type(value) is int:
        return 0 <= value < _U64_LIMIT
    if type(value) is bytes:
        return len(value) >= _MIN_HASH_BYTES
    return False


def _hash_list(value: object, name: str) -> list[BlockHash]:
    if type(value) is not list:
        _bad_event(f"{name} must be an array of hashes, got {_kind(value)}")
    for item in value:
        if not _is_hash(item):
            _bad_event(f"{name} holds {_describe_hash(item)}")
    return value


def _parent(value: object) -> BlockHash | None:
    if value is None:
        return None
    if _is_hash(value):
        return value
    _bad_event(f"parent_block_hash is {_describe_hash(value)}")


def _int_list(value: object, name: str) -> list[int]:
    if type(value) is not list:
        _bad_event(f"{name} must be an array of ints, got {_kind(value)}")
    for item in value:
        if type(item) is not int:
            _bad_event(f"{name} holds {_kind(item)}, not int")
    return value


def _block_size(value: object) -> int:
    if type(value) is not int:
        _bad_event(f"block_size must be an int, got {_kind(value)}")
    if value < 0:
        _bad_event(f"block_size must be >= 0, got {value}")
    return value


def _opt_int(value: object, name: str) -> int | None:
    if value is None or type(value) is int:
        return value
    _bad_event(f"{name} must be an int or nil, got {_kind(value)}")


def _opt_nonneg_int(value: object, name: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int:
        _bad_event(f"{name} must be an int or nil, got {_kind(value)}")
    if value < 0:
        _bad_event(f"{name} must be >= 0, got {value}")
    return value


def _opt_str(value: object, name: str) -> str | None:
    if value is None or type(value) is str:
        return value
    _bad_event(f"{name} must be a string or nil, got {_kind(value)}")


def _extra_keys(value: object) -> list[list[Any] | None] | None:
    if value is None:
        return None
    if type(value) is not list:
        _bad_event(f"extra_keys must be an array or nil, got {_kind(value)}")
    for item in value:
        if item is not None and type(item) is not list:
            _bad_event(f"extra_keys entries must be arrays or nil, got {_kind(item)}")
    return value


def _lookahead(value: object) -> list[list[int]] | None:
    if value is None:
        return None
    if type(value) is not list:
        _bad_event(f"lookahead_token_ids must be an array or nil, got {_kind(value)}")
    for item in value:
        _int_list(item, "lookahead_token_ids entry")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "nil"
    return type(value).__name__


def _describe_hash(value: object) -> str:
    if type(value) is int:
        return f"an int out of the uint64 range ({value})"
    if type(value) is bytes:
        return f"a {len(value)}-byte hash (at least {_MIN_HASH_BYTES} needed)"
    return f"{_kind(value)}, not a hash (uint64 or bytes)"


_MISSING: Final = object()


def _required(event: dict[Any, Any], key: str) -> object:
    value = event.get(key, _MISSING)
    if value is _MISSING:
        _bad_event(f"{event.get('type')} event has no {key!r}")
    return value


def _event_from_map(event: dict[Any, Any]) -> KVEvent:
    tag = event.get("type", _MISSING)
    if tag is _MISSING:
        _bad_event("map event has no 'type' key")
    if type(tag) is not str:
        _bad_event(f"event 'type' must be a string, got {_kind(tag)}")
    for key in event:
        if type(key) is not str:
            _bad_event(f"event map keys must be strings, got {_kind(key)}")
    get = event.get
    if tag == "BlockStored":
        return BlockStored(
            _hash_list(_required(event, "block_hashes"), "block_hashes"),
            _parent(_required(event, "parent_block_hash")),
            _int_list(_required(event, "token_ids"), "token_ids"),
            _block_size(_required(event, "block_size")),
            _opt_int(get("lora_id"), "lora_id"),
            _opt_str(get("medium"), "medium"),
            _opt_str(get("lora_name"), "lora_name"),
            _extra_keys(get("extra_keys")),
            _opt_nonneg_int(get("group_idx"), "group_idx"),
            _opt_str(get("kv_cache_spec_kind"), "kv_cache_spec_kind"),
            _opt_int(get("kv_cache_spec_sliding_window"), "kv_cache_spec_sliding_window"),
            _opt_str(get("locality"), "locality"),
            _opt_str(get("ownership"), "ownership"),
            _opt_str(get("session_id"), "session_id"),
            _lookahead(get("lookahead_token_ids")),
        )
    if tag == "BlockRemoved":
        return BlockRemoved(
            _hash_list(_required(event, "block_hashes"), "block_hashes"),
            _opt_str(get("medium"), "medium"),
            _opt_nonneg_int(get("group_idx"), "group_idx"),
            _opt_str(get("locality"), "locality"),
            _opt_str(get("ownership"), "ownership"),
        )
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise WireError("unknown_event_type", f"unknown event type {tag[:64]!r}")


# Positions of the optional trailing fields of the <= 0.23 array form (index 0 is the tag).
_ARRAY_STORED_MIN: Final[int] = 5  # tag, block_hashes, parent_block_hash, token_ids, block_size
_ARRAY_REMOVED_MIN: Final[int] = 2  # tag, block_hashes


def _event_from_array(event: list[Any]) -> KVEvent:
    if not event:
        _bad_event("array event is empty (no type tag)")
    tag = event[0]
    if type(tag) is not str:
        _bad_event(f"array event tag must be a string, got {_kind(tag)}")
    size = len(event)
    if tag == "BlockStored":
        if size < _ARRAY_STORED_MIN:
            _bad_event(f"BlockStored array has {size} elements, at least 5 needed")
        padded = event + [None] * (12 - size) if size < 12 else event
        return BlockStored(
            _hash_list(padded[1], "block_hashes"),
            _parent(padded[2]),
            _int_list(padded[3], "token_ids"),
            _block_size(padded[4]),
            _opt_int(padded[5], "lora_id"),
            _opt_str(padded[6], "medium"),
            _opt_str(padded[7], "lora_name"),
            _extra_keys(padded[8]),
            _opt_nonneg_int(padded[9], "group_idx"),
            _opt_str(padded[10], "kv_cache_spec_kind"),
            _opt_int(padded[11], "kv_cache_spec_sliding_window"),
        )
    if tag == "BlockRemoved":
        if size < _ARRAY_REMOVED_MIN:
            _bad_event("BlockRemoved array has no block_hashes")
        padded = event + [None] * (4 - size) if size < 4 else event
        return BlockRemoved(
            _hash_list(padded[1], "block_hashes"),
            _opt_str(padded[2], "medium"),
            _opt_nonneg_int(padded[3], "group_idx"),
        )
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    raise WireError("unknown_event_type", f"unknown event type {tag[:64]!r}")


def _event_from_obj(event: object) -> KVEvent:
    if type(event) is dict:
        return _event_from_map(event)
    if type(event) is list:
        return _event_from_array(event)
    _bad_event(f"event must be a map or an array, got {_kind(event)}")


def _decode_event(raw: msgspec.Raw) -> KVEvent:
    """One event of the slow path; raises WireError(bad_event | unknown_event_type)."""
    try:
        return _convert(_map_event_decoder.decode(raw))
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        return _convert(_array_event_decoder.decode(raw))
    except (msgspec.DecodeError, RecursionError) as exc:
        refusal = str(exc)
    try:
        obj = _generic_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError) as exc:
        _bad_event(f"event is not valid msgpack: {exc}")
    _event_from_obj(obj)  # raises with the precise reason
    _bad_event(f"event refused: {refusal}")  # only if the Python check is looser than msgspec


def _declared_events(payload: bytes) -> int | None:
    """The event count a batch's header declares (``[ts float64, events, ...]``), or None."""
    if len(payload) < 11 or payload[0] not in (0x92, 0x93) or payload[1] != 0xCB:
        return None
    head = payload[10]
    if 0x90 <= head <= 0x9F:
        return head & 0x0F
    if head == 0xDC and len(payload) >= 13:
        return int.from_bytes(payload[11:13], "big")
    if head == 0xDD and len(payload) >= 15:
        return int.from_bytes(payload[11:15], "big")
    return None


def _decode_slow(payload: bytes) -> EventBatch:
    declared = _declared_events(payload)
    # (Each event takes at least one byte: a larger count is a truncated payload, below.)
    if declared is not None and MAX_EVENTS_PER_BATCH < declared <= len(payload):
        # Decoding event by event costs memory per event: refuse absurd batches up front.
        raise WireError(
            "too_large", f"batch declares {declared} events; at most {MAX_EVENTS_PER_BATCH}"
        )
    try:
        batch = _raw_batch_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        # The typed check stops at the first wrong type; tell malformed bytes apart.
        try:
            _generic_decoder.decode(payload)
        except (msgspec.DecodeError, RecursionError) as bad:
            raise WireError("not_msgpack", f"payload is not valid msgpack: {bad}") from None
        raise WireError(
            "bad_batch", f"batch must be [ts: number, events: array, rank: int|nil]: {exc}"
        ) from None
    except msgspec.DecodeError as exc:
        raise WireError("not_msgpack", f"payload is not valid msgpack: {exc}") from None
    except RecursionError:
        raise WireError("not_msgpack", "payload is nested too deeply") from None
    events: list[KVEvent] = []
    errors: list[str] = []
    for index, raw in enumerate(batch.events):
        try:
            events.append(_decode_event(raw))
        except WireError as exc:
            errors.append(exc.reason)
            if len(errors) > MAX_BAD_EVENTS:
                # A batch of mostly junk: stop paying for it (CPU and memory per byte).
                raise WireError(
                    "bad_batch", f"more than {MAX_BAD_EVENTS} malformed events in one batch"
                ) from None
            logger.debug(
                "dropped event %d of batch ts=%s: %s: %s", index, batch.ts, exc.reason, exc
            )
    return EventBatch(batch.ts, events, batch.data_parallel_rank, errors)


# --------------------------------------------------------------------------------------
# Public decoding API
# --------------------------------------------------------------------------------------


def decode_payload(payload: bytes, *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> EventBatch:
    """Decode one msgpack payload (frame 2) into an :class:`EventBatch`.

    Raises :class:`WireError` (and nothing else) when the payload as a whole is unusable:
    ``too_large``, ``not_msgpack`` or ``bad_batch``. A bad event does not fail the batch:
    it is left out and its reason (``bad_event`` or ``unknown_event_type``) is appended to
    ``EventBatch.errors``.
    """
    if len(payload) > max_bytes:
        raise WireError("too_large", f"payload of {len(payload)} bytes exceeds {max_bytes}")
    try:
        return _from_typed(_map_decoder.decode(payload))
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        return _from_typed(_array_decoder.decode(payload))
    except (msgspec.DecodeError, RecursionError):
        pass
    return _decode_slow(payload)


def parse_seq(frame: bytes) -> int:
    """Read a sequence-number frame: exactly 8 bytes, big-endian, unsigned."""
    if len(frame) != 8:
        raise WireError("bad_seq", f"seq frame must be 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big")


@dataclass(slots=True)
class DecodedMessage:
    """One decoded ZeroMQ message ``[topic, seq, payload]``."""

    topic: str
    seq: int
    batch: EventBatch


def decode_frames(
    frames: Sequence[bytes], *, max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> DecodedMessage:
    """Decode a 3-frame message ``[topic, seq, payload]`` as vLLM's publisher sends it.

    Raises :class:`WireError` with reason ``frame_count``, ``bad_topic`` or ``bad_seq``, or
    any reason of :func:`decode_payload`. The replay end marker (``seq == END_SEQ`` with an
    empty payload) is not a batch: check :func:`parse_seq` first when reading replies.
    """
    if len(frames) != 3:
        raise WireError(
            "frame_count", f"expected 3 frames [topic, seq, payload], got {len(frames)}"
        )
    topic_frame, seq_frame, payload = frames
    try:
        topic = bytes(topic_frame).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("bad_topic", f"topic frame is not UTF-8: {exc}") from None
    seq = parse_seq(seq_frame)
    return DecodedMessage(topic, seq, decode_payload(payload, max_bytes=max_bytes))


# --------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------

_encoder: Final = msgspec.msgpack.Encoder()


def event_to_map(event: KVEvent) -> dict[str, Any]:
    """The event as vLLM 0.33.0 encodes it: a dict in wire key order.

    ``"type"`` first, then every required field (even when ``None``), then each optional
    field that is not ``None``. Values are the event's own objects (not copied).
    """
    if isinstance(event, BlockStored):
        ev = event
        out: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": ev.block_hashes,
            "parent_block_hash": ev.parent_block_hash,
            "token_ids": ev.token_ids,
            "block_size": ev.block_size,
            "lora_id": ev.lora_id,
            "medium": ev.medium,
            "lora_name": ev.lora_name,
        }
        if ev.extra_keys is not None:
            out["extra_keys"] = ev.extra_keys
        if ev.group_idx is not None:
            out["group_idx"] = ev.group_idx
        if ev.kv_cache_spec_kind is not None:
            out["kv_cache_spec_kind"] = ev.kv_cache_spec_kind
        if ev.kv_cache_spec_sliding_window is not None:
            out["kv_cache_spec_sliding_window"] = ev.kv_cache_spec_sliding_window
        if ev.locality is not None:
            out["locality"] = ev.locality
        if ev.ownership is not None:
            out["ownership"] = ev.ownership
        if ev.session_id is not None:
            out["session_id"] = ev.session_id
        if ev.lookahead_token_ids is not None:
            out["lookahead_token_ids"] = ev.lookahead_token_ids
        return out
    if isinstance(event, BlockRemoved):
        rm = event
        out = {"type": "BlockRemoved", "block_hashes": rm.block_hashes, "medium": rm.medium}
        if rm.group_idx is not None:
            out["group_idx"] = rm.group_idx
        if rm.locality is not None:
            out["locality"] = rm.locality
        if rm.ownership is not None:
            out["ownership"] = rm.ownership
        return out
    if isinstance(event, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV event: {event!r}")


def _event_array(event: KVEvent) -> list[Any]:
    if isinstance(event, BlockStored):
        ev = event
        return [
            "BlockStored",
            ev.block_hashes,
            ev.parent_block_hash,
            ev.token_ids,
            ev.block_size,
            ev.lora_id,
            ev.medium,
            ev.lora_name,
            ev.extra_keys,
            ev.group_idx,
            ev.kv_cache_spec_kind,
            ev.kv_cache_spec_sliding_window,
        ]
    if isinstance(event, BlockRemoved):
        rm = event
        return ["BlockRemoved", rm.block_hashes, rm.medium, rm.group_idx]
    if isinstance(event, AllBlocksCleared):
        return ["AllBlocksCleared"]
    raise TypeError(f"not a KV event: {event!r}")


def _encode(obj: list[Any]) -> bytes:
    try:
        return _encoder.encode(obj)
    except OverflowError as exc:
        raise ValueError(f"cannot encode batch: {exc} (hashes must be in [0, 2**64))") from None


def encode_batch(batch: EventBatch) -> bytes:
    """Encode a batch exactly as vLLM 0.33.0 does (the map form of 0.24.0 and later).

    The batch is a 3-element array ``[ts (float64), events, data_parallel_rank]``; each
    event is a map whose first key is ``"type"``, followed by every required field in
    declaration order (present even when ``None``), then each optional field that is not
    ``None``. ``batch.errors`` is not encoded. Raises ``ValueError`` for an int that does
    not fit msgpack (e.g. a hash >= 2**64) and ``TypeError`` for a non-event.
    """
    return _encode(
        [float(batch.ts), [event_to_map(e) for e in batch.events], batch.data_parallel_rank]
    )


def encode_batch_legacy(batch: EventBatch) -> bytes:
    """Encode a batch in the array form of vLLM 0.23.0 (events as tagged arrays).

    ``BlockStored`` becomes ``["BlockStored", block_hashes, parent_block_hash, token_ids,
    block_size, lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind,
    kv_cache_spec_sliding_window]``, ``BlockRemoved`` becomes ``["BlockRemoved",
    block_hashes, medium, group_idx]``, ``AllBlocksCleared`` ``["AllBlocksCleared"]``.
    Fields that release did not have (``locality``, ``ownership``, ``session_id``,
    ``lookahead_token_ids``) are dropped, as a 0.23 pod would never send them.
    """
    return _encode(
        [float(batch.ts), [_event_array(e) for e in batch.events], batch.data_parallel_rank]
    )


def encode_frames(topic: str, seq: int, batch: EventBatch) -> list[bytes]:
    """The three frames ``[topic, seq, payload]`` vLLM 0.33.0's publisher sends for a batch."""
    if not 0 <= seq < _U64_LIMIT:
        raise ValueError(f"seq must be in [0, 2**64), got {seq}")
    return [topic.encode("utf-8"), seq.to_bytes(8, "big"), encode_batch(batch)]
