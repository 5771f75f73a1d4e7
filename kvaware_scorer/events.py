"""Typed KV events as vLLM publishes them (``vllm/distributed/kv_events.py``).

Field names are vLLM's. Block hashes keep the form they had on the wire: an unsigned
64-bit ``int`` (vLLM's default) or the raw digest ``bytes``
(``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``); :func:`engine_key` maps both to the one
canonical int the index uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BlockHash = int | bytes


def engine_key(block_hash: BlockHash) -> int:
    """Canonical engine key of a wire hash: the int itself, or the last 8 bytes big-endian."""
    if block_hash.__class__ is int:
        return block_hash
    return int.from_bytes(block_hash[-8:], "big")  # type: ignore[index]


@dataclass(slots=True)
class BlockStored:
    """Full blocks newly cached by one request, in prefix order."""

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[list[Any] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


@dataclass(slots=True)
class BlockRemoved:
    """Blocks evicted from a tier (the GPU pool sends one hash per event)."""

    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


@dataclass(slots=True)
class AllBlocksCleared:
    """The engine reset its prefix cache; everything known for the pod is gone."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True)
class EventBatch:
    """One decoded payload: ``[ts, events, data_parallel_rank]``.

    ``errors`` lists the reason of every event that was dropped while decoding; the
    good events of the batch are kept in ``events``.
    """

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None
    errors: list[str] = field(default_factory=list)
