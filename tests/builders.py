"""Test helpers: build typed events from the vectors' tagged JSON, without the wire decoder."""

from __future__ import annotations

from typing import Any

from conftest import untag

from kvaware_scorer.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


def event_from_json(raw: dict[str, Any]) -> KVEvent:
    fields = untag(raw)
    kind = fields.pop("type")
    if kind == "BlockStored":
        return BlockStored(**fields)
    if kind == "BlockRemoved":
        return BlockRemoved(**fields)
    assert kind == "AllBlocksCleared", kind
    return AllBlocksCleared()


def events_from_batch(batch_input: dict[str, Any]) -> list[KVEvent]:
    return [event_from_json(e) for e in batch_input["events"]]


def stored(
    hashes: list[int],
    tokens: list[int],
    *,
    parent: int | None = None,
    block_size: int = 16,
    medium: str | None = "GPU",
    **extra: Any,
) -> BlockStored:
    return BlockStored(
        block_hashes=list(hashes),
        parent_block_hash=parent,
        token_ids=list(tokens),
        block_size=block_size,
        medium=medium,
        **extra,
    )
