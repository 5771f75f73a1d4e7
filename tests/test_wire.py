"""Wire decoding and encoding against vLLM's own bytes (conformance vectors) and bad input."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import msgspec
import pytest
from conftest import untag
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvaware_scorer.errors import WireError
from kvaware_scorer.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
)
from kvaware_scorer.wire import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    END_SEQ,
    REASONS,
    DecodedMessage,
    _decode_slow,
    _event_from_obj,
    decode_frames,
    decode_payload,
    encode_batch,
    encode_batch_legacy,
    encode_frames,
    event_to_map,
    parse_seq,
)

enc = msgspec.msgpack.encode
gen = msgspec.msgpack.decode

# ------------------------------------------------------------------------------------------
# Helpers: expected values built from the vectors' JSON, independently of the decoder.
# ------------------------------------------------------------------------------------------

_CLASSES: dict[str, type[Any]] = {
    "BlockStored": BlockStored,
    "BlockRemoved": BlockRemoved,
    "AllBlocksCleared": AllBlocksCleared,
}


def expected_event(
    raw: Any, stored_fields: list[str] | None = None, removed_fields: list[str] | None = None
) -> KVEvent:
    """An untagged event (map, or array with the release's field lists) as a dataclass."""
    if isinstance(raw, dict):
        fields = dict(raw)
        kind = fields.pop("type")
    else:
        kind = raw[0]
        names = {
            "BlockStored": stored_fields,
            "BlockRemoved": removed_fields,
            "AllBlocksCleared": [],
        }[kind]
        assert names is not None
        fields = dict(zip(names, raw[1:], strict=True))
    event: KVEvent = _CLASSES[kind](**fields)
    return event


def expected_batch(
    decoded: Any, stored_fields: list[str] | None = None, removed_fields: list[str] | None = None
) -> EventBatch:
    value = untag(decoded)
    rank = value[2] if len(value) == 3 else None
    events = [expected_event(e, stored_fields, removed_fields) for e in value[1]]
    return EventBatch(ts=value[0], events=events, data_parallel_rank=rank)


def all_messages(vectors: dict[str, Any]) -> list[tuple[str, dict[str, Any], int]]:
    """(label, message, publisher rank) for every session and scenario message.

    Each message dict has ``batch_input`` (for scenarios it is copied from the step).
    """
    out = []
    for session in vectors["wire_sessions"]:
        for i, msg in enumerate(session["messages"]):
            out.append((f"{session['id']}#{i}", msg, session["publisher"]["data_parallel_rank"]))
    for case in vectors["scenario_cases"]:
        for step in case["steps"]:
            if step.get("message") is not None:
                msg = {**step["message"], "batch_input": step["batch_input"]}
                out.append((f"{case['id']}#step{step['step']}", msg, 0))
    return out


def frames_of(msg: dict[str, Any]) -> list[bytes]:
    return [bytes.fromhex(f) for f in msg["frames_hex"]]


def wrap_event(event_bytes: bytes, ts: float = 1.0, rank: int = 0) -> bytes:
    """A batch payload around one already-encoded event."""
    return b"\x93" + enc(ts) + b"\x91" + event_bytes + enc(rank)


def reason_of(payload: bytes, **kwargs: Any) -> str:
    with pytest.raises(WireError) as info:
        decode_payload(payload, **kwargs)
    assert info.value.reason in REASONS
    assert str(info.value)
    return info.value.reason


def frames_reason(frames: list[bytes]) -> str:
    with pytest.raises(WireError) as info:
        decode_frames(frames)
    assert info.value.reason in REASONS
    return info.value.reason


H1 = 0x723F5BD8703C6917
H2 = 0x86EB6A3B7DCA70A7  # >= 2**63
GOOD_REMOVED_MAP: dict[str, Any] = {
    "type": "BlockRemoved",
    "block_hashes": [H1],
    "medium": "GPU",
    "group_idx": 0,
}
GOOD_REMOVED = BlockRemoved([H1], "GPU", 0)


def stored_map(**changes: Any) -> dict[str, Any]:
    """A valid BlockStored map; a change to ``...`` (Ellipsis) removes the key."""
    event: dict[str, Any] = {
        "type": "BlockStored",
        "block_hashes": [H1, H2],
        "parent_block_hash": None,
        "token_ids": list(range(32)),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None, None],
        "group_idx": 0,
    }
    for key, value in changes.items():
        if value is ...:
            event.pop(key, None)
        else:
            event[key] = value
    return event


def dropped_reason(bad_event: Any) -> str:
    """Decode [good, bad, good]; check the good ones survive and return the bad one's reason."""
    payload = enc([1.0, [GOOD_REMOVED_MAP, bad_event, {"type": "AllBlocksCleared"}], 0])
    batch = decode_payload(payload)
    assert batch.events == [GOOD_REMOVED, AllBlocksCleared()]
    assert len(batch.errors) == 1, batch.errors
    assert batch.errors[0] in REASONS
    return batch.errors[0]


def full_stored(hashes: list[Any] | None = None) -> BlockStored:
    """A BlockStored with every optional field set."""
    return BlockStored(
        block_hashes=hashes if hashes is not None else [H1, H2],
        parent_block_hash=0xFFFFFFFFFFFFFFFF,
        token_ids=list(range(100, 132)),
        block_size=16,
        lora_id=7,
        medium="STORAGE",
        lora_name="chat-lora",
        extra_keys=[None, ["chat-lora", ["mm-id", -3], b"\x00" * 32, "salt"]],
        group_idx=1,
        kv_cache_spec_kind="sliding_window",
        kv_cache_spec_sliding_window=4096,
        locality="REMOTE",
        ownership="kvcr",
        session_id="sess-1",
        lookahead_token_ids=[[1, 2], [3, 4]],
    )


def all_shapes_batch() -> EventBatch:
    return EventBatch(
        ts=1767225600.25,
        events=[
            BlockStored([H1], None, list(range(16)), 16),
            BlockStored([H1, H2], H1, list(range(32)), 16, None, "GPU", None, [None, None], 0),
            full_stored(),
            full_stored([b"\x01" * 32, b"\x02" * 16]),
            BlockStored([], None, [], 0, medium="CPU", locality="LOCAL"),
            BlockRemoved([H2]),
            BlockRemoved([H1, b"\x03" * 16], "CPU", 2, "LOCAL", "kvcr"),
            AllBlocksCleared(),
        ],
        data_parallel_rank=5,
    )


def without_new_fields(event: KVEvent) -> KVEvent:
    """The event as a vLLM 0.23 array can carry it (fields added in 0.26+ dropped)."""
    if isinstance(event, BlockStored):
        return dataclasses.replace(
            event, locality=None, ownership=None, session_id=None, lookahead_token_ids=None
        )
    if isinstance(event, BlockRemoved):
        return dataclasses.replace(event, locality=None, ownership=None)
    return event


# ------------------------------------------------------------------------------------------
# Decoding vLLM's bytes
# ------------------------------------------------------------------------------------------


def test_every_wire_and_scenario_message_decodes(vectors: dict[str, Any]) -> None:
    messages = all_messages(vectors)
    assert len(messages) >= 30
    for label, msg, publisher_rank in messages:
        decoded = decode_frames(frames_of(msg))
        assert isinstance(decoded, DecodedMessage)
        assert decoded.topic == msg["topic"], label
        assert decoded.seq == msg["seq"], label
        assert decoded.batch == expected_batch(msg["decoded"]), label
        assert decoded.batch.errors == [], label
        # The same events as handed to the publisher, which stamped its rank when unset.
        batch_input = untag(msg["batch_input"])
        assert decoded.batch.events == [expected_event(e) for e in batch_input["events"]], label
        rank = batch_input["data_parallel_rank"]
        assert decoded.batch.data_parallel_rank == (publisher_rank if rank is None else rank)
        assert decoded.batch.ts == batch_input["ts"]
        # Payload alone gives the same batch.
        assert decode_payload(bytes.fromhex(msg["payload_hex"])) == decoded.batch, label


def test_session_covers_ranks_topics_and_empty_batch(vectors: dict[str, Any]) -> None:
    ranks = set()
    topics = set()
    empty = 0
    for _, msg, _ in all_messages(vectors):
        decoded = decode_frames(frames_of(msg))
        ranks.add(decoded.batch.data_parallel_rank)
        topics.add(decoded.topic)
        empty += not decoded.batch.events
    assert {0, 1, 3} <= ranks
    assert "" in topics
    assert any(t.startswith("kv@") for t in topics)
    assert empty >= 1


def test_decoded_hashes_are_unsigned_ints_or_bytes(vectors: dict[str, Any]) -> None:
    seen_big = seen_bytes = False
    for _, msg, _ in all_messages(vectors):
        for event in decode_frames(frames_of(msg)).batch.events:
            if isinstance(event, AllBlocksCleared):
                continue
            hashes = list(event.block_hashes)
            if isinstance(event, BlockStored) and event.parent_block_hash is not None:
                hashes.append(event.parent_block_hash)
            for h in hashes:
                assert type(h) in (int, bytes)
                if type(h) is int:
                    assert 0 <= h < 2**64
                    seen_big |= h >= 2**63
                else:
                    seen_bytes = True
    assert seen_big and seen_bytes


def test_legacy_payload_cases(vectors: dict[str, Any]) -> None:
    cases = vectors["legacy_payload_cases"]
    assert {c["event_encoding"] for c in cases} == {"array", "map"}
    for case in cases:
        batch = decode_payload(bytes.fromhex(case["payload_hex"]))
        expected = expected_batch(
            case["decoded"], case["blockstored_fields"], case["blockremoved_fields"]
        )
        assert batch == expected, case["id"]
        assert batch.errors == []
        # And equal to what the publisher was given (modulo the 0.9.0 batch without a rank).
        batch_input = untag(case["batch_input"])
        events = [
            expected_event(e, case["blockstored_fields"], case["blockremoved_fields"])
            for e in batch_input["events"]
        ]
        assert batch.events == events, case["id"]
        if len(case["batch_fields"]) == 2:
            assert batch.data_parallel_rank is None


def test_legacy_0_9_0_has_no_medium_and_0_23_has_group(vectors: dict[str, Any]) -> None:
    by_version = {c["vllm_version"]: c for c in vectors["legacy_payload_cases"]}
    old = decode_payload(bytes.fromhex(by_version["0.9.0"]["payload_hex"]))
    assert isinstance(old.events[0], BlockStored)
    assert old.events[0].medium is None
    assert old.data_parallel_rank is None
    new = decode_payload(bytes.fromhex(by_version["0.23.0"]["payload_hex"]))
    assert isinstance(new.events[0], BlockStored)
    assert new.events[0].group_idx == 0
    assert isinstance(new.events[1], BlockRemoved)
    assert new.events[1].group_idx == 0


def test_hash_case_block_stored_events(vectors: dict[str, Any]) -> None:
    cases = [c for c in vectors["hash_cases"] if c["expected"].get("block_stored_event")]
    assert len(cases) >= 50
    for case in cases:
        expected = expected_event(untag(case["expected"]["block_stored_event"]))
        raw = bytes.fromhex(case["expected"]["block_stored_event_msgpack_hex"])
        batch = decode_payload(wrap_event(raw))
        assert batch.events == [expected], case["id"]
        assert batch.errors == []
        # The event hashes agree with the per-block event_hash_int values.
        hashes = [int(b["event_hash_int"]) for b in case["expected"]["blocks"]]
        assert isinstance(expected, BlockStored)
        assert expected.block_hashes == hashes[: len(expected.block_hashes)]
        # Our encoder writes the same map, key for key, in the same order.
        ours = gen(encode_batch(EventBatch(1.0, [expected], 0)))[1][0]
        assert list(ours.items()) == list(gen(raw).items()), case["id"]


def test_bytes_hashes_round_trip() -> None:
    digest32, digest16 = bytes(range(32)), bytes(range(16))
    batch = EventBatch(
        1.0,
        [
            BlockStored([digest32, digest16], digest16, list(range(32)), 16),
            BlockRemoved([digest32, b"\xff" * 8]),
        ],
        0,
    )
    decoded = decode_payload(encode_batch(batch))
    assert decoded == batch
    stored = decoded.events[0]
    assert isinstance(stored, BlockStored)
    assert type(stored.block_hashes[0]) is bytes
    assert type(stored.parent_block_hash) is bytes


def test_uint64_extremes_are_unsigned() -> None:
    payload = enc(
        [1.0, [stored_map(block_hashes=[0, 2**63, 2**64 - 1], parent_block_hash=2**64 - 1)], 0]
    )
    # msgspec writes 2**64 - 1 as cf ff..ff: the decoder must not read it as -1.
    assert b"\xcf" + b"\xff" * 8 in payload
    (event,) = decode_payload(payload).events
    assert isinstance(event, BlockStored)
    assert event.block_hashes == [0, 2**63, 2**64 - 1]
    assert event.parent_block_hash == 2**64 - 1


def test_replay_transcript_frames(vectors: dict[str, Any]) -> None:
    checked = 0
    for session in vectors["wire_sessions"]:
        for replay in session.get("replay") or []:
            responses = replay["response_messages_hex"]
            assert responses
            *data, marker = responses
            for message in data:
                frames = [bytes.fromhex(f) for f in message]
                assert frames[0] == b""  # DEALER's empty delimiter
                decoded = decode_frames(frames[1:])
                assert decoded.seq >= replay["start_seq"]
                checked += 1
            marker_frames = [bytes.fromhex(f) for f in marker]
            assert parse_seq(marker_frames[2]) == END_SEQ
            assert marker_frames[3] == b""
    assert checked > 0


# ------------------------------------------------------------------------------------------
# Tolerance: forms the decoder accepts
# ------------------------------------------------------------------------------------------


def test_two_element_batch_and_nil_rank_and_int_ts() -> None:
    two = decode_payload(enc([5, [GOOD_REMOVED_MAP]]))
    assert two == EventBatch(5.0, [GOOD_REMOVED], None)
    assert type(two.ts) is float
    nil = decode_payload(enc([1.5, [], None]))
    assert nil == EventBatch(1.5, [], None)


def test_unknown_map_keys_and_explicit_nil_optionals_are_accepted() -> None:
    event = stored_map(
        future_field={"nested": [1, 2]},
        kv_cache_spec_kind=None,
        locality=None,
        lookahead_token_ids=None,
    )
    (decoded,) = decode_payload(enc([1.0, [event], 0])).events
    assert decoded == BlockStored(
        [H1, H2], None, list(range(32)), 16, None, "GPU", None, [None, None], 0
    )


def test_map_without_optional_vllm_fields() -> None:
    """lora_id, medium and lora_name are required by vLLM but not by events.py."""
    event = stored_map(lora_id=..., medium=..., lora_name=..., extra_keys=..., group_idx=...)
    (decoded,) = decode_payload(enc([1.0, [event], 0])).events
    assert decoded == BlockStored([H1, H2], None, list(range(32)), 16)


def test_type_key_not_first() -> None:
    event = {"block_hashes": [H1], "medium": None, "type": "BlockRemoved"}
    assert decode_payload(enc([1.0, [event], 0])).events == [BlockRemoved([H1])]


def test_legacy_arrays_short_and_with_extra_trailing_fields() -> None:
    tokens = list(range(16))
    payload = enc(
        [
            1.0,
            [
                ["BlockStored", [H1], None, tokens, 16],
                ["BlockStored", [H1], H2, tokens, 16, 3, "GPU", "l", [["l"]], 1, "k", 8, "x", "y"],
                ["BlockRemoved", [H2]],
                ["BlockRemoved", [H2], "CPU", 4, "extra"],
                ["AllBlocksCleared", "extra"],
            ],
            0,
        ]
    )
    batch = decode_payload(payload)
    assert batch.errors == []
    assert batch.events == [
        BlockStored([H1], None, tokens, 16),
        BlockStored([H1], H2, tokens, 16, 3, "GPU", "l", [["l"]], 1, "k", 8),
        BlockRemoved([H2]),
        BlockRemoved([H2], "CPU", 4),
        AllBlocksCleared(),
    ]


def test_mixed_map_and_array_events_in_one_batch() -> None:
    payload = enc([1.0, [["BlockRemoved", [H1], "GPU", 0], GOOD_REMOVED_MAP], 2])
    batch = decode_payload(payload)
    assert batch == EventBatch(1.0, [GOOD_REMOVED, GOOD_REMOVED], 2)


# ------------------------------------------------------------------------------------------
# Encoders
# ------------------------------------------------------------------------------------------


def test_encode_matches_vllm_layout_for_every_message(vectors: dict[str, Any]) -> None:
    for label, msg, _ in all_messages(vectors):
        vllm_payload = bytes.fromhex(msg["payload_hex"])
        batch = decode_payload(vllm_payload)
        ours = encode_batch(batch)
        assert decode_payload(ours) == batch, label
        theirs_generic, ours_generic = gen(vllm_payload), gen(ours)
        assert ours_generic == theirs_generic, label
        # Same key order in every event map.
        for a, b in zip(ours_generic[1], theirs_generic[1], strict=True):
            assert list(a) == list(b), label
        # ts as float64, a 3-element batch array.
        assert ours[0] == 0x93
        assert ours[1] == 0xCB


def test_encode_frames_matches_vllm_frames(vectors: dict[str, Any]) -> None:
    for label, msg, _ in all_messages(vectors):
        frames = frames_of(msg)
        batch = decode_payload(frames[2])
        ours = encode_frames(msg["topic"], msg["seq"], batch)
        assert len(ours) == 3
        assert ours[0] == frames[0], label
        assert ours[1] == frames[1], label
        assert decode_frames(ours) == DecodedMessage(msg["topic"], msg["seq"], batch)


def test_encode_layout_required_and_optional_fields() -> None:
    batch = EventBatch(2, [BlockStored([H1], None, [1], 1), BlockRemoved([H1])], None)
    payload = encode_batch(batch)
    value = gen(payload)
    assert value[0] == 2.0 and type(value[0]) is float
    assert value[2] is None
    stored, removed = value[1]
    assert list(stored) == [
        "type",
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ]
    assert list(removed) == ["type", "block_hashes", "medium"]
    full = gen(encode_batch(EventBatch(1.0, [full_stored()], 0)))[1][0]
    assert list(full) == ["type", *(f.name for f in dataclasses.fields(BlockStored))]
    assert event_to_map(AllBlocksCleared()) == {"type": "AllBlocksCleared"}


def test_round_trip_all_shapes() -> None:
    batch = all_shapes_batch()
    assert decode_payload(encode_batch(batch)) == batch
    for event in batch.events:
        single = EventBatch(3.0, [event], 0)
        assert decode_payload(encode_batch(single)) == single


def test_legacy_round_trip_all_shapes() -> None:
    batch = all_shapes_batch()
    decoded = decode_payload(encode_batch_legacy(batch))
    assert decoded.events == [without_new_fields(e) for e in batch.events]
    assert decoded.ts == batch.ts
    assert decoded.data_parallel_rank == batch.data_parallel_rank
    value = gen(encode_batch_legacy(batch))
    assert [len(e) for e in value[1]] == [12, 12, 12, 12, 12, 4, 4, 1]
    assert [e[0] for e in value[1]] == [
        "BlockStored",
        "BlockStored",
        "BlockStored",
        "BlockStored",
        "BlockStored",
        "BlockRemoved",
        "BlockRemoved",
        "AllBlocksCleared",
    ]


def test_legacy_encoding_matches_vllm_0_23(vectors: dict[str, Any]) -> None:
    (case,) = [c for c in vectors["legacy_payload_cases"] if c["vllm_version"] == "0.23.0"]
    theirs = bytes.fromhex(case["payload_hex"])
    ours = encode_batch_legacy(decode_payload(theirs))
    assert gen(ours) == gen(theirs)


def test_encoder_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError, match="2\\*\\*64"):
        encode_batch(EventBatch(1.0, [BlockRemoved([2**64])], 0))
    with pytest.raises(ValueError):
        encode_frames("", -1, EventBatch(1.0, [], 0))
    with pytest.raises(ValueError):
        encode_frames("", 2**64, EventBatch(1.0, [], 0))
    with pytest.raises(TypeError):
        encode_batch(EventBatch(1.0, ["nope"], 0))  # type: ignore[list-item]
    assert parse_seq(encode_frames("t", END_SEQ, EventBatch(1.0, [], 0))[1]) == END_SEQ


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_too_large(vectors: dict[str, Any]) -> None:
    payload = bytes.fromhex(vectors["wire_sessions"][0]["messages"][0]["payload_hex"])
    assert reason_of(payload, max_bytes=len(payload) - 1) == "too_large"
    assert decode_payload(payload, max_bytes=len(payload)).events
    assert reason_of(b"\x90" * (DEFAULT_MAX_PAYLOAD_BYTES + 1)) == "too_large"
    with pytest.raises(WireError) as info:
        decode_frames([b"", bytes(8), payload], max_bytes=10)
    assert info.value.reason == "too_large"


def test_every_truncation_of_a_real_payload_is_not_msgpack(vectors: dict[str, Any]) -> None:
    msg = vectors["wire_sessions"][0]["messages"][4]  # the all-optional-fields batch
    payload = bytes.fromhex(msg["payload_hex"])
    for cut in range(len(payload)):
        assert reason_of(payload[:cut]) == "not_msgpack", cut


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # reserved byte
        b"\x93\xcb\x00",  # truncated float
        enc([1.0, [], 0]) + b"\x00",  # trailing bytes
        b"\xdd\x80\x00\x00\x00",  # array32 claiming 2**31 elements, no data
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 2**32 - 1 elements
        b"\xdf\x80\x00\x00\x00",  # map32 claiming 2**31 pairs
        b"\xc6\x7f\xff\xff\xff",  # bin32 claiming 2 GiB
        b"\xdb\x7f\xff\xff\xff",  # str32 claiming 2 GiB
        b"\x93\xcb" + bytes(8) + b"\xdd\x80\x00\x00\x00",  # events array claiming 2**31
        b"\x91" * 5000 + b"\xc0",  # nesting deeper than any decoder allows
        b"\x81\x81\x01\x02\x03",  # map used as a map key
    ],
)
def test_not_msgpack(payload: bytes) -> None:
    assert reason_of(payload) == "not_msgpack"


def test_absurd_lengths_inside_an_event() -> None:
    head = b"\x93\xcb" + bytes(8) + b"\x91"
    stored = enc(stored_map())
    token_key = enc("token_ids")
    cut = stored.index(token_key) + len(token_key)
    # token_ids claiming 2**31 elements with nothing after it.
    assert reason_of(head + stored[:cut] + b"\xdd\x80\x00\x00\x00") == "not_msgpack"
    # block_hashes claiming 2**32 - 1 hashes.
    removed = b"\x82\xa4type\xacBlockRemoved\xacblock_hashes\xdd\xff\xff\xff\xff"
    assert reason_of(head + removed) == "not_msgpack"


@pytest.mark.parametrize(
    "batch",
    [
        {"ts": 1.0, "events": []},
        1,
        "batch",
        None,
        [],
        [1.0],
        [1.0, [], 0, 0],
        ["1.0", [], 0],
        [None, [], 0],
        [True, [], 0],
        [b"\x00", [], 0],
        [1.0, {"type": "AllBlocksCleared"}, 0],
        [1.0, None, 0],
        [1.0, 5, 0],
        [1.0, [], "0"],
        [1.0, [], 1.0],
        [1.0, [], True],
        [1.0, [], [0]],
    ],
)
def test_bad_batch(batch: Any) -> None:
    assert reason_of(enc(batch)) == "bad_batch"


@pytest.mark.parametrize(
    "event",
    [
        {"block_hashes": [H1], "medium": "GPU"},  # map without "type"
        {"type": 1, "block_hashes": [H1]},
        {"type": None},
        {"type": b"BlockRemoved", "block_hashes": [H1]},
        {"type": "BlockRemoved", "block_hashes": [H1], 7: "non-string key"},
        {"type": "AllBlocksCleared", b"k": 1},
        [],
        [None, [H1]],
        [1, [H1]],
        5,
        "BlockRemoved",
        None,
        b"\x00" * 8,
        1.5,
        # missing required fields
        stored_map(block_hashes=...),
        stored_map(parent_block_hash=...),
        stored_map(token_ids=...),
        stored_map(block_size=...),
        {"type": "BlockRemoved", "medium": "GPU"},
        ["BlockStored", [H1], None, []],
        ["BlockRemoved"],
        # wrong types and values
        stored_map(block_size=-1),
        stored_map(block_size=16.0),
        stored_map(block_size="16"),
        stored_map(block_size=None),
        stored_map(block_size=True),
        stored_map(block_hashes=[-1]),
        stored_map(block_hashes=[-(2**63)]),
        stored_map(block_hashes=[1.5]),
        stored_map(block_hashes=[float(2**64)]),
        stored_map(block_hashes=["0123456789abcdef"]),
        stored_map(block_hashes=[b"1234567"]),
        stored_map(block_hashes=[None]),
        stored_map(block_hashes=[True]),
        stored_map(block_hashes=[[H1]]),
        stored_map(block_hashes=H1),
        stored_map(block_hashes=None),
        stored_map(parent_block_hash=-5),
        stored_map(parent_block_hash=b"short"),
        stored_map(parent_block_hash="parent"),
        stored_map(parent_block_hash=[H1]),
        stored_map(token_ids=None),
        stored_map(token_ids=[1, "2"]),
        stored_map(token_ids=[1, 2.0]),
        stored_map(token_ids=[1, None]),
        stored_map(token_ids={"0": 1}),
        stored_map(lora_id="7"),
        stored_map(lora_id=1.0),
        stored_map(medium=1),
        stored_map(medium=b"GPU"),
        stored_map(lora_name=["x"]),
        stored_map(extra_keys="x"),
        stored_map(extra_keys=[None, 5]),
        stored_map(extra_keys=[None, "lora"]),
        stored_map(extra_keys={"a": 1}),
        stored_map(group_idx=-1),
        stored_map(group_idx="0"),
        stored_map(group_idx=False),
        stored_map(kv_cache_spec_kind=3),
        stored_map(kv_cache_spec_sliding_window="4096"),
        stored_map(locality=True),
        stored_map(ownership=1),
        stored_map(session_id=b"s"),
        stored_map(lookahead_token_ids=[1, 2]),
        stored_map(lookahead_token_ids=[[1], ["2"]]),
        stored_map(lookahead_token_ids="12"),
        {"type": "BlockRemoved", "block_hashes": [H1], "medium": 0},
        {"type": "BlockRemoved", "block_hashes": [H1], "group_idx": -2},
        {"type": "BlockRemoved", "block_hashes": [H1], "locality": 1},
        {"type": "BlockRemoved", "block_hashes": [H1], "ownership": []},
        {"type": "BlockRemoved", "block_hashes": [-1]},
        ["BlockStored", [H1], None, [1], -16],
        ["BlockStored", [H1], None, [1], 1, "lora"],
        ["BlockRemoved", [H1], 5],
        ["BlockRemoved", [H1], "GPU", -1],
        ["BlockRemoved", "hash"],
    ],
)
def test_bad_event_is_dropped_and_good_ones_kept(event: Any) -> None:
    assert dropped_reason(event) == "bad_event"


@pytest.mark.parametrize(
    "event",
    [
        {"type": "BlockEvicted", "block_hashes": [H1]},
        {"type": ""},
        {"type": "blockstored"},
        ["KVCacheReset"],
        ["Foo", 1, 2],
    ],
)
def test_unknown_event_type(event: Any) -> None:
    assert dropped_reason(event) == "unknown_event_type"


def test_batch_keeps_good_events_around_several_bad_ones(vectors: dict[str, Any]) -> None:
    msg = vectors["wire_sessions"][0]["messages"][4]
    good = decode_payload(bytes.fromhex(msg["payload_hex"])).events
    raw_good = gen(bytes.fromhex(msg["payload_hex"]))[1]
    events = [{"type": "Nope"}, *raw_good, stored_map(block_size=-1), ["AllBlocksCleared"]]
    batch = decode_payload(enc([9.0, events, 4]))
    assert batch.events == [*good, AllBlocksCleared()]
    assert batch.errors == ["unknown_event_type", "bad_event"]
    assert batch.ts == 9.0
    assert batch.data_parallel_rank == 4


def test_all_events_bad_still_gives_the_batch() -> None:
    batch = decode_payload(enc([1.0, [1, {"type": "X"}], 0]))
    assert batch == EventBatch(1.0, [], 0, ["bad_event", "unknown_event_type"])


def test_frame_errors(vectors: dict[str, Any]) -> None:
    msg = vectors["wire_sessions"][1]["messages"][0]
    topic, seq, payload = frames_of(msg)
    assert frames_reason([topic, seq]) == "frame_count"
    assert frames_reason([topic, seq, payload, b""]) == "frame_count"
    assert frames_reason([]) == "frame_count"
    assert frames_reason([b"", topic, seq, payload]) == "frame_count"
    assert frames_reason([b"\xff\xfe", seq, payload]) == "bad_topic"
    assert frames_reason([b"kv@\xc3", seq, payload]) == "bad_topic"
    assert frames_reason([topic, seq[:7], payload]) == "bad_seq"
    assert frames_reason([topic, seq + b"\x00", payload]) == "bad_seq"
    assert frames_reason([topic, b"", payload]) == "bad_seq"
    assert frames_reason([topic, seq, payload[:-1]]) == "not_msgpack"
    assert frames_reason([topic, seq, b""]) == "not_msgpack"
    # The replay end marker is not a batch.
    assert frames_reason([b"", b"\xff" * 8, b""]) == "not_msgpack"


def test_parse_seq() -> None:
    assert parse_seq(bytes(8)) == 0
    assert parse_seq(b"\x00" * 7 + b"\x01") == 1
    assert parse_seq(b"\x80" + b"\x00" * 7) == 2**63
    assert parse_seq(b"\xff" * 8) == END_SEQ == 2**64 - 1
    for size in (0, 7, 9):
        with pytest.raises(WireError) as info:
            parse_seq(b"\x00" * size)
        assert info.value.reason == "bad_seq"


# ------------------------------------------------------------------------------------------
# The typed fast path and the generic path agree on every input
# ------------------------------------------------------------------------------------------

_PROBE_VALUES: list[Any] = [
    None,
    True,
    0,
    1,
    -1,
    2**63,
    2**64 - 1,
    -(2**63),
    1.5,
    "GPU",
    "",
    b"",
    b"1234567",
    b"12345678",
    [],
    [1],
    [None],
    [[1]],
    [[]],
    [b"12345678"],
    [-1],
    [1.0],
    [[1], None],
    {"a": 1},
    msgspec.msgpack.Ext(1, b"x"),
]
_STORED_FIELDS = ["type", *(f.name for f in dataclasses.fields(BlockStored))]
_REMOVED_FIELDS = ["type", *(f.name for f in dataclasses.fields(BlockRemoved))]


def _outcome(func: Any, payload: bytes) -> Any:
    try:
        return func(payload)
    except WireError as exc:
        return ("error", exc.reason)


def _check_agreement(event: Any) -> bool:
    """msgspec's typed structs and the Python check accept and refuse the same events.

    Returns whether the event was accepted.
    """
    batch = decode_payload(enc([1.0, [event], 0]))
    try:
        checked = _event_from_obj(gen(enc(event)))
    except WireError as exc:
        assert batch.events == [], event
        assert batch.errors == [exc.reason], event
        return False
    assert batch.errors == [], event
    assert batch.events == [checked], event
    return True


def _probe_events() -> list[Any]:
    events: list[Any] = []
    for field in _STORED_FIELDS:
        for value in _PROBE_VALUES:
            events.append(stored_map(**{field: value}))
    for field in _REMOVED_FIELDS:
        for value in _PROBE_VALUES:
            events.append({**GOOD_REMOVED_MAP, field: value})
    for value in _PROBE_VALUES:
        events.append({**GOOD_REMOVED_MAP, value if type(value) in (int, str) else "k": 1})
        events.append(["BlockRemoved", [H1], None, None, value])  # extra trailing field
        events.append(["AllBlocksCleared", value])
    for position in range(1, 12):
        for value in _PROBE_VALUES:
            stored: list[Any] = ["BlockStored", [H1], None, list(range(16)), 16, *([None] * 7)]
            stored[position] = value
            events.append(stored)
            events.append(stored[: position + 1])
            if position < 4:
                removed: list[Any] = ["BlockRemoved", [H1], None, None]
                removed[position] = value
                events.append(removed)
                events.append(removed[: position + 1])
    return events


def test_typed_structs_and_python_check_agree() -> None:
    events = _probe_events()
    accepted = sum(_check_agreement(event) for event in events)
    assert 100 < accepted < len(events) - 100


def test_batch_level_fast_and_slow_paths_agree() -> None:
    for value in _PROBE_VALUES:
        for batch in ([value, [], 0], [1.0, [], value], [1.0, value, 0], [value]):
            payload = enc(batch)
            assert _outcome(decode_payload, payload) == _outcome(_decode_slow, payload), batch


# ------------------------------------------------------------------------------------------
# Fuzzing: nothing but WireError ever escapes
# ------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_only_raise_wire_error(data: bytes) -> None:
    try:
        decode_payload(data)
    except WireError as exc:
        assert exc.reason in REASONS


_SEED_PAYLOAD = encode_batch(all_shapes_batch())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.integers(0, len(_SEED_PAYLOAD) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    )
)
def test_fuzz_mutated_payload_only_raises_wire_error(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_SEED_PAYLOAD)
    for pos, byte in edits:
        data[pos] = byte
    try:
        batch = decode_payload(bytes(data))
    except WireError as exc:
        assert exc.reason in REASONS
        return
    assert all(reason in REASONS for reason in batch.errors)
    assert _decode_slow(bytes(data)) == batch


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.binary(max_size=10),
)
_values = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_STORED_FIELDS), _values, max_size=6))
def test_fuzz_event_fields_typed_and_python_check_agree(changes: dict[str, Any]) -> None:
    _check_agreement(stored_map(**changes))


def test_seq_struct_is_big_endian() -> None:
    assert parse_seq(struct.pack(">Q", 0x0102030405060708)) == 0x0102030405060708
