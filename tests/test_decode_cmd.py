"""The ``decode`` command: hex lines on stdin to JSON lines on stdout, on vLLM's own bytes."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
from typing import Any

import msgspec
import pytest
from conftest import untag

from kvaware_scorer.commands.decode_cmd import add_arguments, batch_to_json, run
from kvaware_scorer.events import BlockRemoved, BlockStored, EventBatch
from kvaware_scorer.wire import encode_batch

REQUIRED = {
    "BlockStored": [
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    ],
    "BlockRemoved": ["block_hashes", "medium"],
    "AllBlocksCleared": [],
}
FIELDS = {
    "BlockStored": [f.name for f in dataclasses.fields(BlockStored)],
    "BlockRemoved": [f.name for f in dataclasses.fields(BlockRemoved)],
    "AllBlocksCleared": [],
}


def cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    text: str,
    argv: list[str] | None = None,
) -> tuple[int, list[dict[str, Any]], str]:
    """Run the command on ``text`` as stdin; (exit status, parsed JSON lines, raw stdout)."""
    parser = argparse.ArgumentParser(prog="kvaware-scorer decode")
    add_arguments(parser)
    args = parser.parse_args(argv or [])
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code = run(args)
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines()], out


def as_cli_json(tagged: Any) -> Any:
    """The vectors' tagged JSON as the command prints it: $int -> int, $bin -> hex."""
    if isinstance(tagged, dict):
        if set(tagged) == {"$bin"}:
            return tagged["$bin"].lower()
        if set(tagged) == {"$int"}:
            return int(tagged["$int"])
        return {k: as_cli_json(v) for k, v in tagged.items()}
    if isinstance(tagged, list):
        return [as_cli_json(v) for v in tagged]
    return tagged


def frames_line(msg: dict[str, Any]) -> str:
    return " ".join(frame or "-" for frame in msg["frames_hex"])


def all_messages(vectors: dict[str, Any]) -> list[dict[str, Any]]:
    out = [m for s in vectors["wire_sessions"] for m in s["messages"]]
    for case in vectors["scenario_cases"]:
        out += [step["message"] for step in case["steps"] if step.get("message")]
    return out


def legacy_event_json(raw: Any, stored_fields: list[str], removed_fields: list[str]) -> Any:
    """A <= 0.23 array event as the command prints it (vLLM 0.33 map layout)."""
    raw = as_cli_json(raw)
    if isinstance(raw, dict):
        return raw
    kind = raw[0]
    names = {"BlockStored": stored_fields, "BlockRemoved": removed_fields}.get(kind, [])
    values = dict(zip(names, raw[1:], strict=True))
    out: dict[str, Any] = {"type": kind}
    for name in FIELDS[kind]:
        value = values.get(name)
        if name in REQUIRED[kind] or value is not None:
            out[name] = value
    return out


def test_every_message_as_frames(
    vectors: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    messages = all_messages(vectors)
    text = "".join(frames_line(m) + "\n" for m in messages)
    code, results, _ = cli(monkeypatch, capsys, text)
    assert code == 0
    assert len(results) == len(messages)
    for msg, result in zip(messages, results, strict=True):
        decoded = msg["decoded"]
        assert list(result) == ["ts", "data_parallel_rank", "seq", "topic", "events"]
        assert result["ts"] == decoded[0]
        assert result["data_parallel_rank"] == decoded[2]
        assert result["seq"] == msg["seq"]
        assert result["topic"] == msg["topic"]
        expected_events = as_cli_json(decoded[1])
        assert result["events"] == expected_events
        for got, want in zip(result["events"], expected_events, strict=True):
            assert list(got) == list(want)  # vLLM's key order, required nulls kept


def test_every_message_as_payload(
    vectors: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    messages = all_messages(vectors)
    text = "".join(m["payload_hex"] + "\n" for m in messages)
    code, results, _ = cli(monkeypatch, capsys, text)
    assert code == 0
    for msg, result in zip(messages, results, strict=True):
        assert list(result) == ["ts", "data_parallel_rank", "events"]
        assert result["events"] == as_cli_json(msg["decoded"][1])


def test_legacy_payloads(
    vectors: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = vectors["legacy_payload_cases"]
    code, results, _ = cli(monkeypatch, capsys, "".join(c["payload_hex"] + "\n" for c in cases))
    assert code == 0
    for case, result in zip(cases, results, strict=True):
        decoded = case["decoded"]
        assert result["ts"] == decoded[0]
        assert result["data_parallel_rank"] == (decoded[2] if len(decoded) == 3 else None)
        expected = [
            legacy_event_json(e, case["blockstored_fields"], case["blockremoved_fields"])
            for e in decoded[1]
        ]
        assert result["events"] == expected, case["id"]
    first = results[0]["events"][0]  # vLLM 0.9.0: no medium/lora_name on the wire
    assert first["medium"] is None and first["lora_name"] is None
    assert "group_idx" not in first


def test_empty_topic_forms_and_named_topic(
    vectors: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = vectors["wire_sessions"][0]["messages"][0]
    _, seq, payload = msg["frames_hex"]
    named = vectors["wire_sessions"][1]["messages"][0]
    text = f"- {seq} {payload}\n {seq} {payload}\n{frames_line(named)}\n"
    code, results, _ = cli(monkeypatch, capsys, text)
    assert code == 0
    assert results[0] == results[1]
    assert results[0]["topic"] == ""
    assert results[2]["topic"] == named["topic"] != ""


def test_hashes_ints_exact_and_bytes_hex(
    vectors: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    session = vectors["wire_sessions"][0]["messages"]
    bytes_msg = next(m for m in session if '"$bin"' in json.dumps(m["decoded"]))
    int_msg = session[0]
    code, results, out = cli(
        monkeypatch, capsys, f"{frames_line(int_msg)}\n{frames_line(bytes_msg)}\n"
    )
    assert code == 0
    big = int_msg["decoded"][1][0]["block_hashes"][1]["$int"]
    assert int(big) > 2**63
    assert f"{big}," in out or f"{big}]" in out  # a JSON integer, not a string or float
    assert results[0]["events"][0]["block_hashes"][1] == int(big)
    hashes = results[1]["events"][0]["block_hashes"]
    assert all(isinstance(h, str) and h == h.lower() and len(h) in (32, 64) for h in hashes)
    assert hashes == [h["$bin"] for h in bytes_msg["decoded"][1][0]["block_hashes"]]


def test_bytes_inside_extra_keys_are_hex(
    vectors: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        c
        for c in vectors["hash_cases"]
        if c["expected"].get("block_stored_event")
        and '"$bin"' in json.dumps(c["expected"]["block_stored_event"]["extra_keys"])
    ]
    assert cases
    lines = []
    for case in cases:
        raw = bytes.fromhex(case["expected"]["block_stored_event_msgpack_hex"])
        payload = b"\x93" + msgspec.msgpack.encode(1.0) + b"\x91" + raw + b"\x00"
        lines.append(payload.hex())
    code, results, _ = cli(monkeypatch, capsys, "\n".join(lines) + "\n")
    assert code == 0
    for case, result in zip(cases, results, strict=True):
        assert result["events"] == [as_cli_json(case["expected"]["block_stored_event"])]


def test_all_event_shapes_and_omitted_optionals(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = EventBatch(
        1.5,
        [
            BlockStored([1], None, [5], 1),
            BlockRemoved([b"\xab" * 8], None, 3),
        ],
        None,
    )
    code, results, _ = cli(monkeypatch, capsys, encode_batch(batch).hex() + "\n")
    assert code == 0
    assert results == [
        {
            "ts": 1.5,
            "data_parallel_rank": None,
            "events": [
                {
                    "type": "BlockStored",
                    "block_hashes": [1],
                    "parent_block_hash": None,
                    "token_ids": [5],
                    "block_size": 1,
                    "lora_id": None,
                    "medium": None,
                    "lora_name": None,
                },
                {
                    "type": "BlockRemoved",
                    "block_hashes": ["ab" * 8],
                    "medium": None,
                    "group_idx": 3,
                },
            ],
        }
    ]
    assert batch_to_json(EventBatch(2.0, [], 0), topic="t", seq=9) == {
        "ts": 2.0,
        "data_parallel_rank": 0,
        "seq": 9,
        "topic": "t",
        "events": [],
    }


def test_bad_lines_are_reported_and_processing_continues(
    vectors: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = vectors["wire_sessions"][1]["messages"][0]
    topic, seq, payload = msg["frames_hex"]
    lines = [
        payload,  # 1 ok
        "not-hex",  # 2
        "",  # 3 blank, skipped
        payload[:-2],  # 4 truncated
        f"{topic} {seq}",  # 5 two fields
        f"{topic} {seq} {payload} 00",  # 6 four fields
        f"{topic} {seq[:-2]} {payload}",  # 7 seven-byte seq
        f"fffe {seq} {payload}",  # 8 topic not UTF-8
        f"{topic} {seq} {payload[:10]}zz",  # 9 bad hex in payload
        "   ",  # 10 whitespace only, skipped
        "c1",  # 11 reserved msgpack byte
        "01",  # 12 not a batch
        f"{topic} {seq} {payload}",  # 13 ok
        f"{topic} {seq} -",  # 14 empty payload
        "0" * 3,  # 15 odd number of hex digits
    ]
    code, results, _ = cli(monkeypatch, capsys, "\n".join(lines) + "\n")
    assert code == 1
    errors = [(r["line"], r["error"]) for r in results if "error" in r]
    assert errors == [
        (2, "bad_hex"),
        (4, "not_msgpack"),
        (5, "frame_count"),
        (6, "frame_count"),
        (7, "bad_seq"),
        (8, "bad_topic"),
        (9, "bad_hex"),
        (11, "not_msgpack"),
        (12, "bad_batch"),
        (14, "not_msgpack"),
        (15, "bad_hex"),
    ]
    for result in results:
        if "error" in result:
            assert list(result) == ["line", "error", "detail"]
            assert isinstance(result["detail"], str) and result["detail"]
    good = [r for r in results if "error" not in r]
    assert len(good) == 2
    assert good[1]["seq"] == msg["seq"] and good[1]["topic"] == msg["topic"]
    assert good[0]["events"] == good[1]["events"] == as_cli_json(msg["decoded"][1])


def test_blank_lines_crlf_and_uppercase_exit_zero(
    vectors: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = vectors["wire_sessions"][0]["messages"][6]
    text = f"\n\n{msg['payload_hex'].upper()}\r\n  \n{frames_line(msg)}  \r\n\n"
    code, results, _ = cli(monkeypatch, capsys, text)
    assert code == 0
    assert len(results) == 2
    assert results[0]["events"] == results[1]["events"] == [{"type": "AllBlocksCleared"}]


def test_empty_input(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(monkeypatch, capsys, "") == (0, [], "")


def test_dropped_events_are_listed_and_fail_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = msgspec.msgpack.encode(
        [1.0, [{"type": "AllBlocksCleared"}, {"type": "Nope"}, ["BlockRemoved", [-1]]], 0]
    )
    code, results, _ = cli(monkeypatch, capsys, payload.hex() + "\n")
    assert code == 1
    assert results == [
        {
            "ts": 1.0,
            "data_parallel_rank": 0,
            "events": [{"type": "AllBlocksCleared"}],
            "errors": ["unknown_event_type", "bad_event"],
        }
    ]


def test_max_bytes_option(
    vectors: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    msg = vectors["wire_sessions"][0]["messages"][0]
    size = len(msg["payload_hex"]) // 2
    code, results, _ = cli(
        monkeypatch, capsys, frames_line(msg) + "\n", ["--max-bytes", str(size - 1)]
    )
    assert code == 1
    assert results[0]["line"] == 1 and results[0]["error"] == "too_large"
    code, results, _ = cli(monkeypatch, capsys, frames_line(msg) + "\n", ["--max-bytes", str(size)])
    assert code == 0 and results[0]["seq"] == 0


def test_non_utf8_input_bytes(
    vectors: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = vectors["wire_sessions"][0]["messages"][6]["payload_hex"].encode()
    raw = b"\xff\xfe93\n" + payload + b"\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = run(parser.parse_args([]))
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert results[0]["line"] == 1 and results[0]["error"] == "bad_hex"
    assert results[1]["events"] == [{"type": "AllBlocksCleared"}]


def test_untag_helper_agrees_with_cli_json(vectors: dict[str, Any]) -> None:
    """Sanity check of this file's as_cli_json against conftest.untag."""
    decoded = vectors["wire_sessions"][0]["messages"][8]["decoded"]

    def hexed(value: Any) -> Any:
        if isinstance(value, bytes):
            return value.hex()
        if isinstance(value, list):
            return [hexed(v) for v in value]
        if isinstance(value, dict):
            return {k: hexed(v) for k, v in value.items()}
        return value

    assert as_cli_json(decoded) == hexed(untag(decoded))
