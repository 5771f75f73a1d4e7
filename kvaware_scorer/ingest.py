"""Applying vLLM KV events to the index: the dual-key bridge, block sizes, extras,
duplicates, tiers, groups and orphans.

For each slot (pod, data-parallel rank), ``held`` maps an engine key (vLLM's hash, as a
canonical int) to what that engine block maps to: the request key in the common case, or
a :class:`_Held` record when block sizes differ, tiers other than GPU are involved, or
vLLM stored the same hash twice. It resolves ``BlockRemoved`` and the parent of the next
``BlockStored``, enumerates the slot for clears, and is the slot's LRU (insertion order,
refreshed on re-store). The decisions are explained in ``docs/design.md``.

A mixin of :class:`kvaware_scorer.index.PrefixIndex`, which owns the state and the lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.events import AllBlocksCleared, BlockHash, BlockStored, KVEvent, engine_key
from kvaware_scorer.keys import KeyHasher, token_bytes
from kvaware_scorer.residency import GPU, ResidencyStore

logger = logging.getLogger(__name__)

# vLLM KV-cache spec kinds whose blocks can be reused as a prefix.
PREFIX_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})
# (parent request key, token bytes of the unfinished index block, its extras by kind)
Tail = tuple[int, bytes, tuple[bytes, ...]]
_SALT, _MM, _TAIL = 0, 1, 2  # extras kinds, in the order keys.block_extras writes them
# Engine keys are held by their low 60 bits: an int below 2**60 is a 32-byte object, a
# full 64-bit one 36 bytes (48 after the allocator rounds it), and the chance of two of a
# pod's blocks sharing 60 bits is negligible (about 1e-6 at 1M blocks on one pod).
HELD_KEY_MASK = (1 << 60) - 1


def held_key(block_hash: BlockHash) -> int:
    """How a slot's ``held`` map keys an engine block hash (see ``HELD_KEY_MASK``)."""
    return engine_key(block_hash) & HELD_KEY_MASK


class _Held:
    """A slot's record of one engine block, when the one-int fast form is not enough."""

    __slots__ = ("counts", "keys", "tail")

    def __init__(self, keys: tuple[int, ...], tail: Tail | None) -> None:
        self.keys = keys  # request keys this engine block completed
        self.tail = tail  # (parent key, pending token bytes, pending extras) if mid-block
        self.counts: dict[int, int] = {}  # tier -> number of stores not yet removed


HeldRec = int | _Held


@dataclass(eq=False)
class _Slot:
    pod: str
    rank: int
    bit: int
    model: str
    capacity: int
    held: dict[int, HeldRec] = field(default_factory=dict)
    orphans: dict[int, list[tuple[BlockStored, int]]] = field(default_factory=dict)
    orphan_blocks: int = 0
    group: int | None = None  # the KV-cache group indexed for this slot, once seen
    skipped_groups: set[int] = field(default_factory=set)


class EventApplier(ResidencyStore):
    """``apply()`` and what it needs; see the module docstring."""

    hasher: KeyHasher
    block_size: int
    max_entries: int
    max_orphan_blocks: int
    _lock: threading.Lock
    _reannounce: bool

    def _count(self, name: str, pod: str | None = None, n: int = 1) -> None:
        raise NotImplementedError

    def _slot(self, pod: str, rank: int) -> _Slot:
        raise NotImplementedError

    def _clear_slot(self, slot: _Slot) -> None:
        raise NotImplementedError

    def _expire_if_due(self) -> None:
        raise NotImplementedError

    def _enforce_capacity(self, slot: _Slot) -> None:
        raise NotImplementedError

    def _enforce_global_cap(self) -> None:
        raise NotImplementedError

    def apply(self, pod: str, events: Iterable[KVEvent], *, rank: int | None = None) -> None:
        """Apply one batch of events published by ``pod`` (data-parallel ``rank``)."""
        with self._lock:
            slot = self._slot(pod, rank or 0)
            stored_now: set[int] = set()
            for event in events:
                if event.__class__ is BlockStored:
                    self._stored(slot, event, stored_now)
                elif event.__class__ is AllBlocksCleared:
                    self._count("clears", pod)
                    self._clear_slot(slot)
                else:
                    self._removed(slot, event)
            self._expire_if_due()

    def _indexable_group(self, slot: _Slot, event: BlockStored) -> bool:
        group = event.group_idx or 0
        if slot.group == group:
            return True
        kind = event.kv_cache_spec_kind
        if group in slot.skipped_groups or (kind is not None and kind.lower() not in PREFIX_KINDS):
            slot.skipped_groups.add(group)
            return False
        if slot.group is None:
            slot.group = group
            return True
        return False

    def _stored(self, slot: _Slot, event: BlockStored, stored_now: set[int]) -> None:
        pod = slot.pod
        tier = self.tier_id(event.medium)
        hashes = event.block_hashes
        size = event.block_size
        if size == 0 or not event.token_ids:
            self._tier_update(slot, hashes, tier)
            return
        if len(event.token_ids) != len(hashes) * size:
            # Sliding-window / Mamba groups skip blocks: not a reusable prefix.
            if event.group_idx is not None:
                slot.skipped_groups.add(event.group_idx)
            self._count("skipped_sparse", pod, len(hashes))
            return
        if not self._indexable_group(slot, event):
            self._count("skipped_group", pod, len(hashes))
            return
        index_size = self.block_size
        if size % index_size and index_size % size:
            self._count("skipped_block_size", pod, len(hashes))
            logger.warning(
                "pod %s: engine block size %d and index block size %d do not divide each "
                "other; set index.block_size to a divisor or multiple of vLLM's block size",
                pod,
                size,
                index_size,
            )
            return
        parent = event.parent_block_hash
        if parent is None:
            state: Tail | None = (self.hasher.root(self._namespace(slot, event)), b"", ())
        else:
            state = self._resolve(slot, held_key(parent))
        held = slot.held
        self._reannounce = parent is None and all(held_key(h) in held for h in hashes)
        if state is None:
            self._park_orphan(slot, held_key(parent), event, tier)  # type: ignore[arg-type]
            return
        try:
            self._index_blocks(slot, event, tier, state, stored_now)
        except KVAwareError:  # token ids outside uint32: malformed input
            self._count("bad_tokens", pod, len(hashes))
            return
        if slot.orphans:
            self._reannounce = False
            self._adopt_orphans(slot, event, stored_now)
        if len(slot.held) > slot.capacity:
            self._enforce_capacity(slot)
        if len(self._entries) > self.max_entries:
            self._enforce_global_cap()

    def _namespace(self, slot: _Slot, event: BlockStored) -> str:
        if event.lora_name:
            return event.lora_name
        if event.lora_id:
            return f"lora-id:{event.lora_id}"
        return slot.model

    def _resolve(self, slot: _Slot, parent_ek: int) -> Tail | None:
        rec = slot.held.get(parent_ek)
        if rec is None:
            return None
        if rec.__class__ is int:
            return (rec, b"", ())
        held: _Held = rec  # type: ignore[assignment]
        if held.tail is not None:
            return held.tail
        return (held.keys[-1], b"", ())

    def _index_blocks(
        self,
        slot: _Slot,
        event: BlockStored,
        tier: int,
        state: Tail,
        stored_now: set[int],
    ) -> None:
        parent_key, pending, pending_extra = state
        size = event.block_size
        data = token_bytes(event.token_ids)
        extras = _event_extras(event, parent_is_root=event.parent_block_hash is None)
        hasher = self.hasher
        bit = slot.bit
        held = slot.held
        if size == self.block_size and not pending and extras is None and tier == GPU:
            keys = hasher.chain(parent_key, data)
            for h, key in zip(event.block_hashes, keys, strict=True):
                ek = held_key(h)
                old = held.get(ek)
                if old is None:
                    held[ek] = key
                    self._set(key, GPU, bit)
                else:
                    self._restore(slot, ek, old, (key,), None, GPU, stored_now)
                stored_now.add(ek)
            return
        # General path: block sizes differ, extras, or a non-GPU tier.
        step = size * 4
        index_size = self.block_size
        index_bytes = hasher.block_bytes
        for j, h in enumerate(event.block_hashes):
            chunk = pending + data[j * step : (j + 1) * step]
            parts: dict[int, list[bytes]] = {}
            if pending_extra:
                parts[0] = list(pending_extra)
            if extras is not None and extras[j]:
                start = len(pending) // 4
                for rel, kind, payload in extras[j]:
                    target, offset = divmod(start + rel, index_size)
                    slots = parts.setdefault(target, [b"", b"", b""])
                    if kind == _MM:
                        payload = b"m%s\x00%d\x00" % (payload, offset)
                    slots[kind] += payload
            keys = hasher.chain(parent_key, chunk, {b: b"".join(p) for b, p in parts.items()})
            done = len(keys) * index_bytes
            if keys:
                parent_key = keys[-1]
            pending = chunk[done:]
            carried = parts.get(len(keys)) if pending else None
            pending_extra = tuple(carried) if carried else ()
            tail = (parent_key, pending, pending_extra) if pending else None
            ek = held_key(h)
            old = held.get(ek)
            if old is None:
                if tier == GPU and tail is None and len(keys) == 1:
                    held[ek] = keys[0]
                else:
                    rec = _Held(tuple(keys), tail)
                    rec.counts[tier] = 1
                    held[ek] = rec
                for key in keys:
                    self._set(key, tier, bit)
            else:
                self._restore(slot, ek, old, tuple(keys), tail, tier, stored_now)
            stored_now.add(ek)

    def _restore(
        self,
        slot: _Slot,
        ek: int,
        old: HeldRec,
        keys: tuple[int, ...],
        tail: Tail | None,
        tier: int,
        stored_now: set[int],
    ) -> None:
        """A hash the slot already holds was stored again.

        vLLM stores a second physical copy when two requests cache the same prefix in one
        step, and when a cached prompt recomputes its last block (vLLM never serves the
        whole prompt from cache); each copy is removed separately, so it is counted. The
        exception is a re-announced cache hit (``kv_cache_report_mode="full"``): a store
        from block 0 (no parent) of hashes the pod already holds, in a later batch. That
        is not a new copy: refresh only. (A one-block prompt recomputed in a later step
        has the same shape; treating it as a refresh can only cause a miss, never a stale
        hit.)
        """
        held = slot.held
        copy = ek in stored_now or not self._reannounce
        if old.__class__ is int:
            if tier == GPU and not copy:
                del held[ek]  # refresh: most recently stored goes last
                held[ek] = old
                return
            rec = _Held((old,), None)
            rec.counts[GPU] = 1
        else:
            rec = old  # type: ignore[assignment]
        count = rec.counts.get(tier, 0)
        if count == 0 or copy:
            rec.counts[tier] = count + 1
            for key in keys or rec.keys:
                self._set(key, tier, slot.bit)
            if count:
                self._count("duplicate_stores", slot.pod)
        if keys and not rec.keys:
            rec.keys = keys
        if tail is not None and rec.tail is None:
            rec.tail = tail
        del held[ek]  # re-insert at the end: most recently stored
        held[ek] = rec

    def _tier_update(self, slot: _Slot, hashes: Sequence[Any], tier: int) -> None:
        """A token-less ``BlockStored`` (offload placeholder): known blocks gain a tier."""
        self._reannounce = True  # a placeholder for a tier already held only refreshes
        for h in hashes:
            ek = held_key(h)
            old = slot.held.get(ek)
            if old is None:
                self._count("placeholder_unknown", slot.pod)
                continue
            self._restore(slot, ek, old, (), None, tier, set())
            self._count("placeholder_applied", slot.pod)

    def _removed(self, slot: _Slot, event: Any) -> None:
        tier = self.tier_id(event.medium)
        held = slot.held
        for h in event.block_hashes:
            ek = held_key(h)
            rec = held.get(ek)
            if rec is None:
                self._count("remove_unknown", slot.pod)
                if slot.orphans:
                    self._forget_orphan_block(slot, ek)
                continue
            if rec.__class__ is int:
                if tier != GPU:
                    self._count("remove_unknown", slot.pod)
                    continue
                del held[ek]
                self._clear(rec, GPU, slot.bit)
                continue
            counts = rec.counts  # type: ignore[union-attr]
            count = counts.get(tier, 0)
            if count == 0:
                self._count("remove_unknown", slot.pod)
                continue
            if count > 1:
                counts[tier] = count - 1
                continue
            del counts[tier]
            for key in rec.keys:  # type: ignore[union-attr]
                self._clear(key, tier, slot.bit)
            if not counts:
                del held[ek]

    def _park_orphan(self, slot: _Slot, parent_ek: int, event: BlockStored, tier: int) -> None:
        """Keep a store whose parent is unknown until replay or a later event supplies it."""
        n = len(event.block_hashes)
        self._count("orphans", slot.pod, n)
        if n > self.max_orphan_blocks:
            self._count("orphans_dropped", slot.pod, n)
            return
        while slot.orphan_blocks + n > self.max_orphan_blocks and slot.orphans:
            oldest = next(iter(slot.orphans))
            for dropped, _tier in slot.orphans.pop(oldest):
                slot.orphan_blocks -= len(dropped.block_hashes)
                self._count("orphans_dropped", slot.pod, len(dropped.block_hashes))
        slot.orphans.setdefault(parent_ek, []).append((event, tier))
        slot.orphan_blocks += n

    def _forget_orphan_block(self, slot: _Slot, ek: int) -> None:
        """A parked store lost one of its blocks: adopting it later would make that block
        a stale entry, so the whole parked event is dropped (counted)."""
        for parent, waiting in list(slot.orphans.items()):
            kept = []
            for orphan, tier in waiting:
                if any(held_key(h) == ek for h in orphan.block_hashes):
                    slot.orphan_blocks -= len(orphan.block_hashes)
                    self._count("orphans_dropped", slot.pod, len(orphan.block_hashes))
                else:
                    kept.append((orphan, tier))
            if kept:
                slot.orphans[parent] = kept
            else:
                del slot.orphans[parent]

    def _adopt_orphans(self, slot: _Slot, event: BlockStored, stored_now: set[int]) -> None:
        todo = [held_key(h) for h in event.block_hashes]
        while todo and slot.orphans:
            waiting = slot.orphans.pop(todo.pop(), None)
            if not waiting:
                continue
            for orphan, tier in waiting:
                slot.orphan_blocks -= len(orphan.block_hashes)
                parent = held_key(orphan.parent_block_hash)  # type: ignore[arg-type]
                state = self._resolve(slot, parent)
                if state is None:
                    continue
                try:
                    self._index_blocks(slot, orphan, tier, state, stored_now)
                except KVAwareError:
                    self._count("bad_tokens", slot.pod, len(orphan.block_hashes))
                    continue
                self._count("orphans_resolved", slot.pod, len(orphan.block_hashes))
                todo.extend(held_key(h) for h in orphan.block_hashes)


def _event_extras(
    event: BlockStored, *, parent_is_root: bool
) -> list[list[tuple[int, int, bytes]]] | None:
    """Per engine block, its extras as (token offset in the block, kind, payload).

    Built so that the bytes equal what :func:`kvaware_scorer.keys.block_extras` makes on
    the request side: the salt on block 0 of a chain, every multimodal item that starts
    in the block (its offset is made relative to the index block when placed), then
    prompt-embedding digests. Keys this project cannot reproduce from a request (legacy
    forms, unknown values) still go in, so such blocks never match a plain prompt.
    Returns None when the event has no extras at all (the common case).
    """
    raw = event.extra_keys
    if not raw or all(item is None for item in raw):
        return None
    out: list[list[tuple[int, int, bytes]]] = []
    for j, block_keys in enumerate(raw):
        parts: list[tuple[int, int, bytes]] = []
        salt_seen = False
        for position, item in enumerate(block_keys or ()):
            if isinstance(item, str):
                if position == 0 and item == event.lora_name:
                    continue  # the adapter is the namespace
                if j == 0 and parent_is_root and not salt_seen:
                    salt_seen = True
                    parts.append((0, _SALT, b"s" + item.encode()))
                else:
                    parts.append((0, _TAIL, b"x" + item.encode() + b"\x00"))
            elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], int):
                if item[1] >= 0:  # the item starts in this block
                    parts.append((item[1], _MM, str(item[0]).encode()))
            elif isinstance(item, bytes):
                parts.append((0, _TAIL, b"e" + item))
            else:
                parts.append((0, _TAIL, b"x" + repr(item).encode() + b"\x00"))
        out.append(parts)
    missing = len(event.block_hashes) - len(out)
    if missing > 0:  # a malformed event with fewer extra-key entries than hashes
        out.extend([] for _ in range(missing))
    return out
