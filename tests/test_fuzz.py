"""Fuzzing the untrusted-input boundaries: ZeroMQ frames, msgpack payloads (and the index
they feed), and the YAML configuration.

Properties:

* ``decode_frames`` / ``decode_payload`` raise nothing but :class:`WireError`, with a reason
  from ``wire.REASONS``; every dropped event's reason is in ``REASONS`` too.
* Whatever decodes is applied to a small :class:`PrefixIndex` (tiny capacities, so
  eviction, orphans and the global cap all run) and scored; the index never raises and its
  per-pod capacity and global cap hold after every batch.
* ``load_config`` raises nothing but :class:`ConfigError`, for mappings and for YAML files.
* Decoding memory is bounded: the tracemalloc peak of one decode is at most a small
  multiple of the payload size.

CI runs a fixed, derandomized number of examples per test (``FUZZ_EXAMPLES``; the whole
file runs in well under a minute). The bugs this fuzzing found are fixed and kept as
regression tests at the end of each section; the fuzz strategies still route exactly
those inputs to the regression tests (documented where it happens).
"""

from __future__ import annotations

import math
import struct
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvaware_scorer.config import PipelineConfig, load_config
from kvaware_scorer.errors import ConfigError, WireError
from kvaware_scorer.events import BlockStored, EventBatch, KVEvent
from kvaware_scorer.index import PrefixIndex
from kvaware_scorer.wire import REASONS, decode_frames, decode_payload, encode_batch

T = TypeVar("T")

# Examples per fuzz test in CI; the total is reported by `pytest --hypothesis-show-statistics`.
FUZZ_EXAMPLES = {
    "frames_raw": 400,
    "frames_structured": 400,
    "payload_bytes": 800,
    "payload_structured": 400,
    "payload_mutated_bytes": 400,
    "payload_memory": 200,
    "config_mapping": 600,
    "config_mutation": 500,
    "config_yaml_text": 300,
}


def fuzz(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return settings(
        max_examples=FUZZ_EXAMPLES[name],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# ====================================================================================
# msgpack values
# ====================================================================================

INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1
EDGE_INTS = [0, 1, -1, 15, 16, 127, 128, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32]
EDGE_INTS += [2**53, 2**63 - 1, 2**63, UINT64_MAX, INT64_MIN, INT64_MIN + 1]

wire_ints = st.one_of(
    st.integers(-300, 300), st.integers(INT64_MIN, UINT64_MAX), st.sampled_from(EDGE_INTS)
)
wire_scalars = st.one_of(
    st.none(),
    st.booleans(),
    wire_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=24),
    st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=12)),
)
wire_junk = st.recursive(
    wire_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=10), wire_ints), inner, max_size=4),
    ),
    max_leaves=10,
)

# A small pool of engine hashes, so parents and removals often name a stored block.
HASH_POOL = [7, 8, 9, 10, 11, 12, 2**64 - 1, 0]
hashes = st.one_of(
    st.integers(0, UINT64_MAX),
    st.sampled_from(HASH_POOL),
    st.binary(min_size=8, max_size=32),
)
VALID_TOKEN = st.integers(0, 2**32 - 1)
BLOCK_SIZES = [16, 16, 16, 16, 8, 32, 4, 0, 1, 3]
MEDIA = [None, "GPU", "GPU", "gpu", "CPU", "disk", "LocalDisk", "x" * 40]
KINDS = [None, "full_attention", "full_attention", "mla_attention", "sliding_window", "weird"]

# vLLM's BlockStored fields in array (<= 0.23) order, after the tag.
STORED_FIELDS = [
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
]
MAP_ONLY_FIELDS = ["locality", "ownership", "session_id", "lookahead_token_ids"]


@st.composite
def extra_key_item(draw: st.DrawFn) -> Any:
    return draw(
        st.one_of(
            st.text(max_size=8),  # lora name or cache salt
            st.tuples(st.text(max_size=8), st.integers(-4, 40)).map(list),  # mm [id, offset]
            st.binary(max_size=16),  # prompt-embedding digest
            wire_junk,
        )
    )


@st.composite
def stored_fields(draw: st.DrawFn, known: list[Any]) -> dict[str, Any]:
    """A plausible BlockStored: mostly a consistent continuation of ``known`` (hashes
    already stored in this stream), with every optional field and odd values sometimes."""
    n = draw(st.integers(0, 4))
    size = draw(st.sampled_from(BLOCK_SIZES))
    block_hashes = draw(st.lists(hashes, min_size=n, max_size=n))
    tokens_n = n * size if draw(st.integers(0, 9)) else draw(st.integers(0, 40))
    roll = draw(st.integers(0, 9))
    if roll < 5 and known:
        parent = known[-1]  # continue the last stored block, as a request's next chunk does
    elif roll < 7 and known:
        parent = draw(st.sampled_from(known))
    elif roll < 9 or not known:
        parent = None  # a new request from the root
    else:
        parent = draw(hashes)
    fields: dict[str, Any] = {
        "block_hashes": block_hashes,
        "parent_block_hash": parent,
        "token_ids": draw(st.lists(VALID_TOKEN, min_size=tokens_n, max_size=tokens_n)),
        "block_size": size,
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "lora_id": st.one_of(st.none(), st.integers(-5, 2**31)),
        "medium": st.sampled_from(MEDIA),
        "lora_name": st.one_of(st.none(), st.sampled_from(["sql-lora", "a", ""])),
        # One entry per block (None or a list), as vLLM sends them. Shorter lists are a
        # known index bug (test_index_survives_extra_keys_shorter_than_block_hashes).
        "extra_keys": st.one_of(
            st.none(),
            st.lists(
                st.one_of(st.none(), st.lists(extra_key_item(), max_size=3)),
                min_size=n,
                max_size=n + 2,
            ),
        ),
        "group_idx": st.sampled_from([None, 0, 0, 0, 1, 2]),
        "kv_cache_spec_kind": st.sampled_from(KINDS),
        "kv_cache_spec_sliding_window": st.one_of(st.none(), st.integers(-1, 4096)),
        "locality": st.one_of(st.none(), st.text(max_size=6)),
        "ownership": st.one_of(st.none(), st.text(max_size=6)),
        "session_id": st.one_of(st.none(), st.text(max_size=6)),
        "lookahead_token_ids": st.one_of(
            st.none(), st.lists(st.lists(VALID_TOKEN, max_size=3), max_size=2)
        ),
    }
    for name, strategy in optional.items():
        if draw(st.integers(0, 3)) == 0:
            fields[name] = draw(strategy)
    known.extend(block_hashes)
    return fields


@st.composite
def removed_fields(draw: st.DrawFn, known: list[Any]) -> dict[str, Any]:
    pick = st.sampled_from(known) if known else hashes
    fields: dict[str, Any] = {"block_hashes": draw(st.lists(st.one_of(pick, hashes), max_size=3))}
    if draw(st.booleans()):
        fields["medium"] = draw(st.sampled_from(MEDIA))
    if draw(st.booleans()):
        fields["group_idx"] = draw(st.sampled_from([None, 0, 0, 1]))
    return fields


def _as_map(kind: str, fields: dict[str, Any]) -> dict[Any, Any]:
    return {"type": kind, **fields}


def _as_array(kind: str, fields: dict[str, Any], order: list[str], length: int) -> list[Any]:
    out: list[Any] = [kind, *(fields.get(name) for name in order)]
    return out[: max(1, length)]


@st.composite
def mutate_event(draw: st.DrawFn, event: Any) -> Any:
    """One structural or type mutation of an event (map or array form)."""
    op = draw(st.integers(0, 6))
    if isinstance(event, dict):
        keys = list(event)
        if op == 0 and keys:
            event.pop(draw(st.sampled_from(keys)))
        elif op == 1 and keys:
            event[draw(st.sampled_from(keys))] = draw(wire_junk)
        elif op == 2:
            event[draw(st.one_of(st.text(max_size=10), wire_ints))] = draw(wire_junk)
        elif op == 3:
            event["type"] = draw(
                st.one_of(st.sampled_from(["BlockStored", "BlockRemoved", "Nope", ""]), wire_junk)
            )
        elif op == 4 and "block_hashes" in event:
            event["block_hashes"] = draw(st.lists(wire_junk, max_size=3))
        elif op == 5 and "token_ids" in event:
            event["token_ids"] = draw(st.lists(wire_ints, max_size=20))
        else:
            return list(event.values())  # a map turned into an array
        return event
    if isinstance(event, list):
        if op == 0 and event:
            return event[: draw(st.integers(0, len(event)))]
        if op == 1 and event:
            event[draw(st.integers(0, len(event) - 1))] = draw(wire_junk)
            return event
        if op == 2:
            return [*event, *draw(st.lists(wire_junk, min_size=1, max_size=3))]
        if op == 3 and event:
            event[0] = draw(wire_junk)
            return event
        if op == 4 and len(event) > 3:
            event[3] = draw(st.lists(wire_ints, max_size=20))
            return event
    return draw(wire_junk)


@st.composite
def event_objects(draw: st.DrawFn, known: list[Any] | None = None) -> Any:
    """A valid-looking event in map or array form, sometimes mutated, sometimes junk."""
    known = [] if known is None else known
    form = draw(st.sampled_from(["map", "array"]))
    kind = draw(st.sampled_from(["BlockStored"] * 5 + ["BlockRemoved"] * 3 + ["AllBlocksCleared"]))
    if kind == "BlockStored":
        fields = draw(stored_fields(known))
        order = STORED_FIELDS
    elif kind == "BlockRemoved":
        fields = draw(removed_fields(known))
        order = ["block_hashes", "medium", "group_idx"]
    else:
        fields, order = {}, []
    if form == "map":
        event: Any = _as_map(kind, fields)
    else:
        length = draw(st.integers(len(order) // 2, len(order) + 2)) + 1
        event = _as_array(kind, fields, order, length)
    if draw(st.integers(0, 4)) == 0:
        for _ in range(draw(st.integers(1, 2))):
            event = draw(mutate_event(event))
    return event


@st.composite
def batch_objects(draw: st.DrawFn, known: list[Any] | None = None) -> Any:
    """A batch [ts, events, rank?], sometimes with batch-level mutations."""
    known = [] if known is None else known
    events = [draw(event_objects(known)) for _ in range(draw(st.integers(0, 6)))]
    ts = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(0, 2**40)))
    rank = draw(st.one_of(st.none(), st.integers(-2, 3), wire_ints))
    shape = draw(st.integers(0, 11))
    if shape == 0:
        return [ts, events]
    if shape == 1:
        return [ts, events, rank, draw(wire_junk)]
    if shape == 2:
        return [draw(wire_junk), events, rank]
    if shape == 3:
        return [ts, draw(wire_junk), rank]
    if shape == 4:
        return {"ts": ts, "events": events}
    if shape == 5:
        return draw(wire_junk)
    return [ts, events, rank]


@st.composite
def streams(draw: st.DrawFn) -> list[Any]:
    """Consecutive batches of one pod, whose stores chain onto each other."""
    known: list[Any] = []
    return [draw(batch_objects(known)) for _ in range(draw(st.integers(1, 4)))]


def encode(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


payload_objects = batch_objects().map(encode)


# ====================================================================================
# Properties
# ====================================================================================


def check_wire_error(exc: WireError) -> None:
    assert exc.reason in REASONS, exc.reason
    assert str(exc)


def decode_or_wire_error(payload: bytes, max_bytes: int | None = None) -> EventBatch | None:
    try:
        if max_bytes is None:
            batch = decode_payload(payload)
        else:
            batch = decode_payload(payload, max_bytes=max_bytes)
    except WireError as exc:
        check_wire_error(exc)
        return None
    assert isinstance(batch, EventBatch)
    assert set(batch.errors) <= REASONS, batch.errors
    return batch


KNOWN_INDEX_BUGS: dict[str, int] = {"token_id_out_of_range": 0, "short_extra_keys": 0}


def known_index_bug(event: KVEvent) -> str | None:
    """Inputs covered by the regression tests below (they once made PrefixIndex.apply raise)."""
    if not isinstance(event, BlockStored):
        return None
    if any(not 0 <= t < 2**32 for t in event.token_ids):
        return "token_id_out_of_range"
    if event.extra_keys is not None and len(event.extra_keys) < len(event.block_hashes):
        return "short_extra_keys"
    return None


CAPACITY = 6
MAX_ENTRIES = 10


def small_index(block_size: int = 16) -> PrefixIndex:
    return PrefixIndex(
        block_size=block_size,
        default_model="m",
        pod_capacity=CAPACITY,
        max_entries=MAX_ENTRIES,
        max_orphan_blocks=4,
    )


def apply_and_check(index: PrefixIndex, batch: EventBatch, pod: str) -> None:
    """Apply as the listener does (rank from the batch), then score; nothing may raise."""
    events = []
    for event in batch.events:
        bug = known_index_bug(event)
        if bug is None:
            events.append(event)
        else:
            KNOWN_INDEX_BUGS[bug] += 1
    rank = (batch.data_parallel_rank or 0) % 2  # two ranks per pod at most
    index.apply(pod, events, rank=rank)
    stats = index.stats()
    for blocks in stats["pod_blocks"].values():
        assert blocks <= 2 * CAPACITY, stats
    assert len(index) <= MAX_ENTRIES, stats
    assert stats["orphans_pending"] <= 4 * 4, stats  # max_orphan_blocks per slot, 4 slots
    for event in events:
        if isinstance(event, BlockStored) and event.token_ids:
            keys = index.keys(event.token_ids, "m")
            for match in index.match(keys).values():
                assert 0 <= match.matched_blocks <= len(keys)
                assert 0.0 <= match.score <= 1.0
    index.expire_speculative()


# ------------------------------------------------------------------------------ frames


@fuzz("frames_raw")
@given(st.lists(st.binary(max_size=48), max_size=5))
def test_fuzz_frames_arbitrary(frames: list[bytes]) -> None:
    try:
        message = decode_frames(frames)
    except WireError as exc:
        check_wire_error(exc)
        return
    assert len(frames) == 3 and 0 <= message.seq <= UINT64_MAX


@fuzz("frames_structured")
@given(
    topic=st.one_of(st.text(max_size=30).map(str.encode), st.binary(max_size=30)),
    seq=st.one_of(
        st.integers(0, UINT64_MAX).map(lambda s: s.to_bytes(8, "big")), st.binary(max_size=12)
    ),
    payload=st.one_of(payload_objects, st.binary(max_size=64)),
    extra=st.lists(st.binary(max_size=8), max_size=2),
    max_bytes=st.one_of(st.none(), st.integers(0, 256)),
)
def test_fuzz_frames_structured(
    topic: bytes, seq: bytes, payload: bytes, extra: list[bytes], max_bytes: int | None
) -> None:
    frames = [topic, seq, payload, *extra]
    try:
        if max_bytes is None:
            message = decode_frames(frames)
        else:
            message = decode_frames(frames, max_bytes=max_bytes)
    except WireError as exc:
        check_wire_error(exc)
        if exc.reason == "too_large":
            assert max_bytes is not None and len(payload) > max_bytes
        return
    assert not extra and len(seq) == 8
    assert message.seq == int.from_bytes(seq, "big")
    assert message.topic == topic.decode()


# ----------------------------------------------------------------------------- payloads


@fuzz("payload_bytes")
@given(st.binary(max_size=300))
def test_fuzz_payload_arbitrary_bytes(payload: bytes) -> None:
    batch = decode_or_wire_error(payload)
    if batch is not None:
        apply_and_check(small_index(), batch, "pod-a")


@fuzz("payload_structured")
@given(batches=streams(), block_size=st.sampled_from([16, 16, 8, 32, 4]))
def test_fuzz_payload_structured_then_index(batches: list[Any], block_size: int) -> None:
    """Valid-looking batches (both event forms) with mutated fields, types and lengths, as
    one pod's stream: decoded, then applied to one index in order."""
    index = small_index(block_size)
    for i, obj in enumerate(batches):
        batch = decode_or_wire_error(encode(obj))
        if batch is not None:
            apply_and_check(index, batch, f"pod-{i % 2}")


@fuzz("payload_mutated_bytes")
@given(
    obj=batch_objects(),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.sampled_from("rid")),
        min_size=1,
        max_size=4,
    ),
    cut=st.one_of(st.none(), st.integers(0, 10_000)),
)
def test_fuzz_payload_byte_mutations(
    obj: Any, edits: list[tuple[int, int, str]], cut: int | None
) -> None:
    """Byte-level damage to an encoded batch: replace, insert, delete, truncate."""
    data = bytearray(encode(obj))
    for position, value, op in edits:
        at = position % (len(data) + 1)
        if op == "r" and at < len(data):
            data[at] = value
        elif op == "i":
            data[at:at] = bytes([value])
        elif op == "d" and at < len(data):
            del data[at]
    if cut is not None:
        del data[cut % (len(data) + 1) :]
    batch = decode_or_wire_error(bytes(data))
    if batch is not None:
        apply_and_check(small_index(), batch, "pod-a")


def _length_bombs() -> list[bytes]:
    """Headers claiming huge lengths over tiny bodies: nothing may be preallocated."""
    ts = b"\xcb" + struct.pack(">d", 1.0)
    big = b"\xff\xff\xff\xff"
    return [
        b"\x93" + ts + b"\xdd" + big + b"\xc0",  # events: array32 of 4G
        b"\x93" + ts + b"\xdb" + big + b"x",  # events: str32 of 4G
        b"\x93" + ts + b"\xc6" + big + b"x",  # events: bin32 of 4G
        b"\xdf" + big + b"\x80",  # batch: map32 of 4G pairs
        b"\x93" + ts + b"\x91\xdf" + big,  # an event: map32 of 4G pairs
        b"\x93" + ts + b"\x91\x95\xabBlockStored\xdd" + big,  # block_hashes: array32 of 4G
        b"\x93" + ts + b"\x91\xc9" + big + b"\x01",  # ext32 of 4G
    ]


@pytest.mark.parametrize("payload", _length_bombs())
def test_length_bombs_allocate_nothing(payload: bytes) -> None:
    tracemalloc.start()
    try:
        decode_or_wire_error(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024, peak


PEAKS: list[tuple[int, int]] = []


@fuzz("payload_memory")
@given(
    payload=st.one_of(
        payload_objects,
        st.binary(max_size=4096),
        st.lists(event_objects(), max_size=200).map(lambda evs: encode([1.0, evs, 0])),
    )
)
def test_fuzz_decode_memory_is_bounded(payload: bytes) -> None:
    """The tracemalloc peak of one decode stays under 1 MiB + 32 x the payload size."""
    tracemalloc.start()
    try:
        decode_or_wire_error(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    PEAKS.append((len(payload), peak))
    assert peak <= (1 << 20) + 32 * len(payload), (len(payload), peak)


def test_valid_batches_round_trip_through_the_fuzz_helpers() -> None:
    """The strategies' valid shapes really decode (so the fuzzing is not all rejects)."""
    stored = {
        "type": "BlockStored",
        "block_hashes": [7, 8],
        "parent_block_hash": None,
        "token_ids": list(range(32)),
        "block_size": 16,
        "extra_keys": [None, None],
    }
    second = {k: v for k, v in stored.items() if k != "type"}
    second.update(block_hashes=[9, 10], parent_block_hash=8, token_ids=list(range(32, 64)))
    array_form = _as_array("BlockStored", second, STORED_FIELDS, 12)
    removed = ["BlockRemoved", [10], "GPU"]
    batch = decode_payload(encode([1.0, [stored, array_form, removed], 0]))
    assert len(batch.events) == 3 and not batch.errors
    index = small_index()
    apply_and_check(index, batch, "pod-a")
    assert [index.holds("pod-a", h) for h in (7, 8, 9, 10)] == [True, True, True, False]
    assert encode_batch(batch)  # re-encodable


# ------------------------------------------------------------------ known bugs (wire/index)


def _stored_payload(**fields: Any) -> bytes:
    event = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": None,
        "token_ids": [1] * 16,
        "block_size": 16,
        **fields,
    }
    return encode([1.0, [event], 0])


@pytest.mark.parametrize("token", [-1, 2**32, UINT64_MAX])
def test_index_survives_token_ids_out_of_uint32(token: int) -> None:
    batch = decode_payload(_stored_payload(token_ids=[token] * 16))
    assert len(batch.events) == 1  # the wire accepts it today
    index = small_index()
    index.apply("pod-a", batch.events)  # must not raise: drop (and count) the event


def test_index_survives_extra_keys_shorter_than_block_hashes() -> None:
    payload = _stored_payload(block_hashes=[1, 2], token_ids=[3] * 32, extra_keys=[["salt"]])
    batch = decode_payload(payload)
    small_index().apply("pod-a", batch.events)  # must not raise


def test_all_bad_events_payload_costs_memory_proportional_to_its_size() -> None:
    n = 1 << 16
    payload = b"\x92\xcb" + struct.pack(">d", 1.0) + b"\xdd" + struct.pack(">I", n) + b"\xc0" * n
    tracemalloc.start()
    try:
        decode_or_wire_error(payload)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 32 * len(payload), f"peak {peak} for a {len(payload)}-byte payload"


# ====================================================================================
# Configuration
# ====================================================================================

BIG = 10**300  # ints beyond float range in float fields are a known bug (pinned below)

yaml_ints = st.one_of(
    st.integers(-5, 70_000), st.integers(-BIG, BIG), st.sampled_from([0, 1, -1, 65535, 65536])
)
yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    yaml_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16),
    st.sampled_from(
        ["${KV_FUZZ_UNSET}", "${KV_FUZZ_UNSET:-7}", "${KV_FUZZ_UNSET:-x}", "${", "$}", "1e3"]
    ),
    st.dates(),
    st.binary(max_size=8),
)
yaml_keys = st.one_of(
    st.text(max_size=12), yaml_ints, st.none(), st.booleans(), st.floats(allow_nan=False)
)
yaml_junk = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(yaml_keys, inner, max_size=4)
    ),
    max_leaves=12,
)

SCHEMA_NAMES = [
    "plugins", "allow", "block", "index", "block_size", "hash_seed", "tier_weights",
    "other_tier_weight", "pod_capacity", "max_entries", "speculative_ttl_s",
    "max_orphan_blocks", "listener", "enabled", "bind", "topic_filter", "bind_replay_port",
    "replay", "replay_timeout_s", "max_message_bytes", "max_queued_messages", "unknown_pods",
    "hash_check", "hash_algo", "pythonhashseed", "endpoints", "id", "url", "models",
    "adapters", "labels", "kv_events", "endpoint", "replay_endpoint", "dp_size", "topic",
    "tokenizers", "model", "source", "chat_template", "filters", "type", "params",
    "scorers", "weight", "picker", "fallback", "load", "scrape", "scrape_interval_s",
    "scrape_timeout_s", "kvaware", "gpu", "cpu",
]  # fmt: skip

# Schema-shaped YAML: keys from the configuration's own names at every level, so random
# trees reach deep sections; values mix plausible and junk.
schema_tree = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(SCHEMA_NAMES), yaml_keys), inner, max_size=5),
    ),
    max_leaves=25,
)

VALID_CONFIG: dict[str, Any] = {
    "plugins": {"allow": None, "block": []},
    "index": {
        "block_size": 16,
        "hash_seed": "",
        "tier_weights": {"gpu": 1.0, "cpu": 0.8, "disk": 0.5},
        "other_tier_weight": 0.5,
        "pod_capacity": 2_000_000,
        "max_entries": 20_000_000,
        "speculative_ttl_s": 2.0,
        "max_orphan_blocks": 65536,
    },
    "listener": {
        "enabled": True,
        "bind": ["tcp://127.0.0.1:5557"],
        "topic_filter": "kv@",
        "bind_replay_port": 5558,
        "replay": True,
        "replay_timeout_s": 2.0,
        "max_message_bytes": 16_777_216,
        "max_queued_messages": 10_000,
        "unknown_pods": "auto",
        "hash_check": {"hash_algo": "sha256", "pythonhashseed": None, "block_size": 16},
    },
    "endpoints": [
        {
            "id": "10.0.0.5:8000",
            "url": "http://10.0.0.5:8000",
            "models": ["m"],
            "adapters": ["sql-lora"],
            "labels": {"zone": "a"},
        },
        {
            "id": "pod-b",
            "models": ["m"],
            "kv_events": {
                "endpoint": "tcp://10.0.0.6:5557",
                "replay_endpoint": "tcp://10.0.0.6:5558",
                "dp_size": 1,
                "topic": "",
            },
        },
    ],
    "tokenizers": [{"model": "m", "source": "/models/m", "chat_template": None, "adapters": []}],
    "filters": [{"type": "model-match"}, {"type": "health", "params": {"unhealthy_after": 3}}],
    "scorers": [{"type": "kv-prefix", "weight": 2.0, "params": {"length_weight": 0.0}}],
    "picker": {"type": "max-score", "params": {"seed": None}},
    "fallback": "error",
    "load": {"scrape": True, "scrape_interval_s": 1.0, "scrape_timeout_s": 0.5},
}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


CONFIG_PATHS = list(_paths(VALID_CONFIG))[1:]


def _copy(value: T) -> T:
    return yaml.safe_load(yaml.safe_dump(value))  # type: ignore[no-any-return]


@st.composite
def mutated_config(draw: st.DrawFn) -> Any:
    config: Any = _copy(VALID_CONFIG)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(CONFIG_PATHS))
        parent: Any = config
        for step in path[:-1]:
            try:
                parent = parent[step]
            except (KeyError, IndexError, TypeError):
                break
        else:
            last = path[-1]
            op = draw(st.integers(0, 5))
            try:
                if op == 0:
                    parent[last] = draw(yaml_junk)
                elif op == 1:
                    del parent[last]
                elif op == 2 and isinstance(parent, dict):
                    parent[draw(yaml_keys)] = draw(yaml_junk)
                elif op == 3:
                    parent[last] = [parent[last]]
                elif op == 4:
                    parent[last] = str(parent[last])
                else:
                    parent[last] = None
            except (KeyError, IndexError, TypeError):
                pass
    if draw(st.integers(0, 4)) == 0:
        config = {"kvaware": config, "router": draw(yaml_junk)}
    return config


def load_or_config_error(source: Any) -> PipelineConfig | None:
    try:
        config = load_config(source)
    except ConfigError as exc:
        assert str(exc)
        return None
    assert isinstance(config, PipelineConfig)
    return config


def test_valid_config_loads() -> None:
    config = load_or_config_error(_copy(VALID_CONFIG))
    assert config is not None and config.listener.bind_replay_port == 5558


@fuzz("config_mapping")
@given(st.one_of(schema_tree, st.dictionaries(st.sampled_from(SCHEMA_NAMES), schema_tree)))
def test_fuzz_config_arbitrary_trees(source: Any) -> None:
    if isinstance(source, (str, Path)):
        source = {"kvaware": source}  # a bare string would be read as a file path
    load_or_config_error(source)


@fuzz("config_mutation")
@given(mutated_config())
def test_fuzz_config_mutations_of_a_valid_config(source: Any) -> None:
    load_or_config_error(source)


@st.composite
def yaml_texts(draw: st.DrawFn) -> str:
    """YAML text: a dumped tree (valid or mutated config, or junk), then damaged."""
    tree = draw(st.one_of(mutated_config(), schema_tree))
    try:
        text: str = yaml.safe_dump(tree, default_flow_style=draw(st.booleans()))
    except yaml.YAMLError:
        text = str(tree)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        piece = draw(st.sampled_from(["", ":", "- ", "{", "]", "\t", "&a", "*a", "!!", "\n  "]))
        text = text[:at] + piece + text[at + draw(st.integers(0, 3)) :]
    return text


@fuzz("config_yaml_text")
@given(yaml_texts())
def test_fuzz_config_yaml_files(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "config.yaml")
        path.write_text(text, encoding="utf-8")
        load_or_config_error(path)


# ------------------------------------------------------------------- known bugs (config)


def test_config_int_beyond_float_range_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        load_config({"listener": {"replay_timeout_s": 10**400}})


@pytest.mark.parametrize(
    "source",
    [
        {"listener": {"replay_timeout_s": math.nan}},
        {"index": {"tier_weights": {"gpu": math.nan}}},
        {"index": {"speculative_ttl_s": "nan"}},
        {"load": {"scrape_interval_s": math.nan}},
    ],
)
def test_config_nan_is_refused(source: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        load_config(source)


def test_config_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError):
        load_config(path)


def test_config_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"index: {hash_seed: caf\xe9}\n")
    with pytest.raises(ConfigError):
        load_config(path)
