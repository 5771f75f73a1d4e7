"""``kvaware-scorer decode``: decode vLLM KV-event messages written as hex, one per line.

Input is read from standard input, one message per line, in one of two forms:

``PAYLOAD``
    the hex of a msgpack payload (frame 2 of a message) alone;
``TOPIC SEQ PAYLOAD``
    the hex of the three frames ``[topic, seq, payload]``, separated by single spaces.
    An empty frame (the default topic is empty) is written ``-`` or left empty, so
    ``- 0000000000000000 93...`` and `` 0000000000000000 93...`` (a leading space) are
    the same message.

Hex digits may be upper or lower case. Trailing whitespace (including ``\\r``) is
ignored; lines that are blank are skipped. A line with two, or more than three,
space-separated fields is an error (``frame_count``).

Output, on standard output, is one JSON object per input line. For a decoded batch:
``ts``, ``data_parallel_rank``, then ``seq`` and ``topic`` when frames were given, then
``events``; each event has ``type`` and its fields under vLLM's names, required fields
always (``null`` when unset) and optional fields only when set. Int hashes are JSON
integers (they may exceed 2**53), byte strings are lowercase hex strings (also inside
``extra_keys``). When some events of a batch were dropped, the object also has
``errors``, the list of their reasons, and the line counts as failed.

A line that cannot be decoded prints ``{"line": N, "error": REASON, "detail": MESSAGE}``
(``N`` counts from 1, blank lines included) and processing continues. ``REASON`` is a
:class:`~kvaware_scorer.errors.WireError` reason, or ``bad_hex`` (a field is not hex),
or ``too_deep`` (nesting too deep to print). The exit status is 1 when any line failed,
else 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

import msgspec

from kvaware_scorer.errors import WireError
from kvaware_scorer.events import EventBatch
from kvaware_scorer.wire import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    decode_frames,
    decode_payload,
    event_to_map,
)

__all__ = ["add_arguments", "batch_to_json", "run"]


class _LineError(Exception):
    """A line-level failure that is not a wire error (bad hex, unprintable value)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``decode`` options to ``parser``."""
    parser.description = "Decode vLLM KV-event payloads or frames given as hex lines on stdin."
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_PAYLOAD_BYTES,
        metavar="N",
        help="largest payload accepted, in bytes (default: %(default)s)",
    )


def _jsonable(value: Any) -> Any:
    """``value`` with bytes as lowercase hex, recursively; other types JSON can hold."""
    cls = type(value)
    if cls is bytes:
        return value.hex()
    if cls is list or cls is tuple:
        return [_jsonable(v) for v in value]
    if cls is dict:
        return {
            (k.hex() if type(k) is bytes else k if type(k) is str else str(k)): _jsonable(v)
            for k, v in value.items()
        }
    if value is None or cls in (int, float, str, bool):
        return value
    if cls is msgspec.msgpack.Ext:
        return {"ext": value.code, "data": bytes(value.data).hex()}
    return str(value)


def batch_to_json(
    batch: EventBatch, *, topic: str | None = None, seq: int | None = None
) -> dict[str, Any]:
    """The JSON object ``decode`` prints for a batch (``topic``/``seq`` when frames were given)."""
    out: dict[str, Any] = {"ts": batch.ts, "data_parallel_rank": batch.data_parallel_rank}
    if seq is not None:
        out["seq"] = seq
    if topic is not None:
        out["topic"] = topic
    out["events"] = [_jsonable(event_to_map(event)) for event in batch.events]
    if batch.errors:
        out["errors"] = list(batch.errors)
    return out


def _unhex(field: str, name: str) -> bytes:
    if field in ("", "-"):
        return b""
    try:
        return bytes.fromhex(field)
    except ValueError as exc:
        raise _LineError("bad_hex", f"{name} is not hex: {exc}") from None


def _decode_line(text: str, max_bytes: int) -> dict[str, Any]:
    fields = text.split(" ")
    if len(fields) == 1:
        batch = decode_payload(_unhex(fields[0], "payload"), max_bytes=max_bytes)
        return batch_to_json(batch)
    if len(fields) == 3:
        frames = [
            _unhex(f, name) for f, name in zip(fields, ("topic", "seq", "payload"), strict=True)
        ]
        message = decode_frames(frames, max_bytes=max_bytes)
        return batch_to_json(message.batch, topic=message.topic, seq=message.seq)
    raise WireError(
        "frame_count",
        f"expected a payload or 3 space-separated frames, got {len(fields)} fields",
    )


def _lines() -> Iterator[str | None]:
    """Lines of stdin as text; ``None`` for a line that is not ASCII/UTF-8."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:
        yield from sys.stdin
        return
    for line in raw:
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            yield None


def run(args: argparse.Namespace) -> int:
    """Decode every line of stdin; print one JSON object per line. Returns the exit status."""
    max_bytes: int = getattr(args, "max_bytes", DEFAULT_MAX_PAYLOAD_BYTES)
    failed = False
    out = sys.stdout
    for number, line in enumerate(_lines(), start=1):
        try:
            if line is None:
                raise _LineError("bad_hex", "line is not UTF-8 text")
            text = line.rstrip()
            if not text.strip():
                continue
            result = _decode_line(text, max_bytes)
            if "errors" in result:
                failed = True
            rendered = json.dumps(result)
        except (WireError, _LineError) as exc:
            failed = True
            rendered = json.dumps({"line": number, "error": exc.reason, "detail": str(exc)})
        except RecursionError:
            failed = True
            rendered = json.dumps(
                {"line": number, "error": "too_deep", "detail": "value nested too deeply to print"}
            )
        out.write(rendered + "\n")
        out.flush()
    return 1 if failed else 0
