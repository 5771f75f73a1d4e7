"""The prefix index: which pod holds which KV block, on which tier.

Layout (all plain dicts, chosen for lookup speed and bytes per entry):

* ``_entries``: request key -> residency. A block held only on GPU tiers is one int,
  a bit mask of pod slots (one slot per (pod, data-parallel rank)). Any other tier makes
  it a tuple ``(any_mask, gpu_mask, cpu_mask, speculative_mask, *other_tiers)``. Values
  are immutable and replaced whole, so a reader always sees a consistent value.
* per slot, ``held``: engine key (vLLM's hash, canonical int) -> what that engine block
  maps to (the request key, or a :class:`_Held` when block sizes differ, tiers other than
  GPU are involved, or vLLM stored the same hash twice). It resolves ``BlockRemoved`` and
  the parent of the next ``BlockStored`` (the dual-key bridge), enumerates the slot for
  clears, and is the slot's LRU (insertion order, refreshed on re-store).

Threads: one writer at a time (the listener's thread, and routers adding speculative
entries) serialised by ``_lock``; any number of readers (:meth:`PrefixIndex.match`) that
never take a lock. Readers rely on single dict operations being atomic, and on the
writer replacing the small snapshot maps (``_pod_masks``, ``_bit_owner``) whole.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.events import AllBlocksCleared, BlockStored, KVEvent, engine_key
from kvaware_scorer.keys import KeyHasher, token_bytes

logger = logging.getLogger(__name__)

GPU, CPU, SPECULATIVE = 0, 1, 2
BUILTIN_TIERS = ("gpu", "cpu", "speculative")
MAX_TIERS = 16
DEFAULT_TIER_WEIGHTS: Mapping[str, float] = {"gpu": 1.0, "cpu": 0.8}
DEFAULT_OTHER_TIER_WEIGHT = 0.5
DEFAULT_POD_CAPACITY = 2_000_000
DEFAULT_MAX_ENTRIES = 20_000_000
DEFAULT_SPECULATIVE_TTL_S = 2.0
DEFAULT_MAX_ORPHAN_BLOCKS = 65_536
# vLLM KV-cache spec kinds whose blocks can be reused as a prefix.
PREFIX_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})
_INTERN_LIMIT = 1 << 16
_EVICT_FRACTION = 16  # over capacity, evict 1/16 of the slot's blocks at once

Residency = int | tuple[int, ...]
# (parent request key, token bytes of the unfinished index block, its extras by kind)
Tail = tuple[int, bytes, tuple[bytes, ...]]
_SALT, _MM, _TAIL = 0, 1, 2  # extras kinds, in the order keys.block_extras writes them


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


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """How much of a request's prefix one pod holds."""

    pod: str
    matched_blocks: int
    total_blocks: int
    block_size: int
    weighted_blocks: float
    blocks_by_tier: Mapping[str, int]
    rank: int

    @property
    def matched_tokens(self) -> int:
        return self.matched_blocks * self.block_size

    @property
    def score(self) -> float:
        """Tier-weighted consecutive matched blocks / total blocks, in [0, 1]."""
        return self.weighted_blocks / self.total_blocks if self.total_blocks else 0.0


class PrefixIndex:
    """Request-key prefix index over a fleet of pods; see the module docstring."""

    def __init__(
        self,
        *,
        block_size: int = 16,
        hash_seed: str = "",
        tier_weights: Mapping[str, float] | None = None,
        other_tier_weight: float = DEFAULT_OTHER_TIER_WEIGHT,
        pod_capacity: int = DEFAULT_POD_CAPACITY,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        speculative_ttl_s: float = DEFAULT_SPECULATIVE_TTL_S,
        max_orphan_blocks: int = DEFAULT_MAX_ORPHAN_BLOCKS,
        default_model: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if pod_capacity <= 0 or max_entries <= 0:
            raise ConfigError("index pod_capacity and max_entries must be positive integers")
        if speculative_ttl_s < 0:
            raise ConfigError("index speculative_ttl_s must be >= 0 (0 disables speculation)")
        self.hasher = KeyHasher(block_size, hash_seed)
        self.block_size = block_size
        weights = dict(DEFAULT_TIER_WEIGHTS if tier_weights is None else tier_weights)
        for name, weight in weights.items():
            if not 0.0 <= weight <= 1.0:
                raise ConfigError(f"tier weight for {name!r} must be in [0, 1], got {weight!r}")
        self._other_weight = other_tier_weight
        self._tier_names: list[str] = list(BUILTIN_TIERS)
        self._tier_ids: dict[str, int] = {name: i for i, name in enumerate(BUILTIN_TIERS)}
        spec_weight = weights.pop("speculative", weights.get("gpu", 1.0))
        self._weights: list[float] = [
            weights.get("gpu", 1.0),
            weights.get("cpu", other_tier_weight),
            spec_weight,
        ]
        self._named_weights = weights
        self.pod_capacity = pod_capacity
        self.max_entries = max_entries
        self.speculative_ttl_s = speculative_ttl_s
        self.max_orphan_blocks = max_orphan_blocks
        self.default_model = default_model
        self._clock = clock

        self._lock = threading.Lock()
        self._entries: dict[int, Residency] = {}
        self._interned: dict[int, int] = {}
        self._slots: dict[tuple[str, int], _Slot] = {}
        self._free_bits: list[int] = []
        self._next_bit = 0
        self._pod_capacity: dict[str, int] = {}
        self._pod_models: dict[str, str] = {}
        # Reader snapshots, replaced whole by the writer.
        self._pod_masks: dict[str, int] = {}
        self._bit_owner: dict[int, tuple[str, int]] = {}
        self._speculative: deque[tuple[float, int, tuple[int, ...]]] = deque()
        self._spec_keys = 0
        self._reannounce = False  # the BlockStored being applied re-announces held blocks
        self.counters: dict[str, int] = {}
        self.pod_counters: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------ counters

    def _count(self, name: str, pod: str | None = None, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
        if pod is not None:
            per_pod = self.pod_counters.setdefault(pod, {})
            per_pod[name] = per_pod.get(name, 0) + n

    # ------------------------------------------------------------------ tiers

    def tier_id(self, medium: str | None) -> int:
        """Tier index for a vLLM ``medium`` (case-insensitive; None means GPU)."""
        if medium is None:
            return GPU
        name = medium.lower()
        tier = self._tier_ids.get(name)
        if tier is None:
            if len(self._tier_names) >= MAX_TIERS:
                name = "other"
                tier = self._tier_ids.get(name)
            if tier is None:
                tier = len(self._tier_names)
                self._tier_names.append(name)
                self._weights.append(self._named_weights.get(name, self._other_weight))
                self._tier_ids[name] = tier
        return tier

    def _intern(self, mask: int) -> int:
        known = self._interned.get(mask)
        if known is not None:
            return known
        if len(self._interned) < _INTERN_LIMIT:
            self._interned[mask] = mask
        return mask

    def _set(self, key: int, tier: int, bit: int) -> None:
        entries = self._entries
        old = entries.get(key)
        if tier == GPU and (old is None or old.__class__ is int):
            entries[key] = self._intern((old or 0) | bit)
            return
        masks = self._unpack(old)
        while len(masks) <= tier:
            masks.append(0)
        masks[tier] |= bit
        if tier != SPECULATIVE and masks[SPECULATIVE] & bit:
            masks[SPECULATIVE] &= ~bit  # a real store confirms the speculation
        self._store(key, masks)

    def _clear(self, key: int, tier: int, bit: int) -> None:
        entries = self._entries
        old = entries.get(key)
        if old is None:
            return
        if old.__class__ is int:
            if tier != GPU:
                return
            left = old & ~bit
            if left:
                entries[key] = self._intern(left)
            else:
                del entries[key]
            return
        masks = self._unpack(old)
        if tier < len(masks):
            masks[tier] &= ~bit
            self._store(key, masks)

    def _clear_all_tiers(self, key: int, bit: int) -> None:
        old = self._entries.get(key)
        if old is None:
            return
        masks = [bit] if old.__class__ is int else self._unpack(old)
        for tier in range(len(masks)):
            self._clear(key, tier, bit)

    @staticmethod
    def _unpack(value: Residency | None) -> list[int]:
        if value is None:
            return [0, 0, 0]
        if value.__class__ is int:
            return [value, 0, 0]
        masks = list(value[1:])  # type: ignore[index]
        while len(masks) < 3:  # stored tuples drop their trailing empty tiers
            masks.append(0)
        return masks

    def _store(self, key: int, masks: list[int]) -> None:
        while masks and not masks[-1]:
            masks.pop()
        if not masks:
            self._entries.pop(key, None)
        elif len(masks) == 1:
            self._entries[key] = self._intern(masks[0])
        else:
            any_mask = 0
            for mask in masks:
                any_mask |= mask
            self._entries[key] = (any_mask, *masks)

    # ------------------------------------------------------------------ slots

    def _slot(self, pod: str, rank: int) -> _Slot:
        slot = self._slots.get((pod, rank))
        if slot is None:
            bit_index = self._free_bits.pop() if self._free_bits else self._next_bit
            if bit_index == self._next_bit:
                self._next_bit += 1
            slot = _Slot(
                pod=pod,
                rank=rank,
                bit=1 << bit_index,
                model=self._pod_models.get(pod, self.default_model),
                capacity=self._pod_capacity.get(pod, self.pod_capacity),
            )
            self._slots[(pod, rank)] = slot
            self._publish_snapshots()
        return slot

    def _publish_snapshots(self) -> None:
        masks: dict[str, int] = {}
        owners: dict[int, tuple[str, int]] = {}
        for (pod, rank), slot in self._slots.items():
            masks[pod] = masks.get(pod, 0) | slot.bit
            owners[slot.bit] = (pod, rank)
        self._pod_masks = masks
        self._bit_owner = owners

    def set_pod(self, pod: str, *, model: str | None = None, capacity: int | None = None) -> None:
        """Record a pod's served model (its default namespace) and block capacity.

        The capacity is the pod's ``num_gpu_blocks`` plus any offload tier it should
        keep; over it, the pod's oldest entries are evicted.
        """
        with self._lock:
            if model is not None:
                self._pod_models[pod] = model
            if capacity is not None:
                if capacity <= 0:
                    raise ConfigError(f"capacity for pod {pod!r} must be positive")
                self._pod_capacity[pod] = capacity
            for (name, _rank), slot in self._slots.items():
                if name == pod:
                    if model is not None:
                        slot.model = model
                    if capacity is not None:
                        slot.capacity = capacity
                        self._enforce_capacity(slot)

    def pods(self) -> list[str]:
        return sorted(self._pod_masks)

    # ------------------------------------------------------------------ writes

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
            if self._speculative:
                self._expire(self._clock())

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
            state = self._resolve(slot, engine_key(parent))
        held = slot.held
        self._reannounce = parent is None and all(engine_key(h) in held for h in hashes)
        if state is None:
            self._park_orphan(slot, engine_key(parent), event, tier)  # type: ignore[arg-type]
            return
        self._index_blocks(slot, event, tier, state, stored_now)
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
                ek = engine_key(h)
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
            ek = engine_key(h)
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
            ek = engine_key(h)
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
            ek = engine_key(h)
            rec = held.get(ek)
            if rec is None:
                self._count("remove_unknown", slot.pod)
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

    def _adopt_orphans(self, slot: _Slot, event: BlockStored, stored_now: set[int]) -> None:
        todo = [engine_key(h) for h in event.block_hashes]
        while todo and slot.orphans:
            waiting = slot.orphans.pop(todo.pop(), None)
            if not waiting:
                continue
            for orphan, tier in waiting:
                slot.orphan_blocks -= len(orphan.block_hashes)
                parent = engine_key(orphan.parent_block_hash)  # type: ignore[arg-type]
                state = self._resolve(slot, parent)
                if state is None:
                    continue
                self._index_blocks(slot, orphan, tier, state, stored_now)
                self._count("orphans_resolved", slot.pod, len(orphan.block_hashes))
                todo.extend(engine_key(h) for h in orphan.block_hashes)

    def _drop_held(self, slot: _Slot, ek: int, rec: HeldRec) -> None:
        if rec.__class__ is int:
            self._clear(rec, GPU, slot.bit)
            return
        for tier in rec.counts:  # type: ignore[union-attr]
            for key in rec.keys:  # type: ignore[union-attr]
                self._clear(key, tier, slot.bit)

    def _enforce_capacity(self, slot: _Slot) -> None:
        excess = len(slot.held) - slot.capacity
        if excess <= 0:
            return
        self._evict_oldest(slot, max(excess, slot.capacity // _EVICT_FRACTION))

    def _evict_oldest(self, slot: _Slot, n: int) -> None:
        held = slot.held
        victims = list(islice(held, n))
        for ek in victims:
            self._drop_held(slot, ek, held.pop(ek))
        self._count("evicted_capacity", slot.pod, len(victims))

    def _enforce_global_cap(self) -> None:
        while len(self._entries) > self.max_entries:
            biggest = max(self._slots.values(), key=lambda s: len(s.held))
            if not biggest.held:
                break
            self._evict_oldest(biggest, max(1, len(biggest.held) // _EVICT_FRACTION))

    def _clear_slot(self, slot: _Slot) -> None:
        for ek, rec in slot.held.items():
            self._drop_held(slot, ek, rec)
        slot.held = {}
        slot.orphans = {}
        slot.orphan_blocks = 0
        if self._speculative:
            kept: deque[tuple[float, int, tuple[int, ...]]] = deque()
            for item in self._speculative:
                if item[1] == slot.bit:
                    self._spec_keys -= len(item[2])
                    for key in item[2]:
                        self._clear(key, SPECULATIVE, slot.bit)
                else:
                    kept.append(item)
            self._speculative = kept

    def clear_pod(self, pod: str, rank: int | None = None) -> None:
        """Forget everything ``pod`` holds (one rank, or all of them)."""
        with self._lock:
            for (name, slot_rank), slot in list(self._slots.items()):
                if name == pod and (rank is None or rank == slot_rank):
                    self._clear_slot(slot)

    def remove_pod(self, pod: str) -> None:
        """Drop a pod that left the fleet: its entries, slots and bits."""
        with self._lock:
            for key, slot in list(self._slots.items()):
                if key[0] == pod:
                    self._clear_slot(slot)
                    del self._slots[key]
                    self._free_bits.append(slot.bit.bit_length() - 1)
            self._pod_models.pop(pod, None)
            self._pod_capacity.pop(pod, None)
            self._publish_snapshots()

    # ------------------------------------------------------------------ speculation

    def add_speculative(self, pod: str, keys: Sequence[int], *, rank: int = 0) -> None:
        """Record that ``keys`` were just routed to ``pod``; they score as GPU-resident
        until a ``BlockStored`` confirms them or ``speculative_ttl_s`` lapses."""
        if not keys or self.speculative_ttl_s <= 0:
            return
        now = self._clock()
        with self._lock:
            self._expire(now)
            slot = self._slot(pod, rank)
            bit = slot.bit
            added = []
            for key in keys:
                value = self._entries.get(key)
                present = 0 if value is None else value if isinstance(value, int) else value[0]
                if not present & bit:
                    self._set(key, SPECULATIVE, bit)
                    added.append(key)
            if added:
                self._speculative.append((now + self.speculative_ttl_s, bit, tuple(added)))
                self._spec_keys += len(added)
                self._count("speculative_added", pod, len(added))

    def expire_speculative(self) -> None:
        """Drop lapsed speculative entries (the listener calls this periodically)."""
        if self._speculative:
            with self._lock:
                self._expire(self._clock())

    def _expire(self, now: float) -> None:
        queue = self._speculative
        while queue and queue[0][0] <= now:
            _deadline, bit, keys = queue.popleft()
            self._spec_keys -= len(keys)
            for key in keys:
                self._clear(key, SPECULATIVE, bit)

    # ------------------------------------------------------------------ reads

    def keys(
        self,
        token_ids: Sequence[int],
        model: str,
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        mm_items: Iterable[Any] = (),
    ) -> list[int]:
        """Request keys of a prompt, in the namespace of ``lora_name`` or ``model``."""
        return self.hasher.request_keys(
            token_ids, lora_name or model, cache_salt=cache_salt, mm_items=mm_items
        )

    def match(
        self, keys: Sequence[int], pods: Iterable[str] | None = None
    ) -> dict[str, PrefixMatch]:
        """Longest cached prefix per pod, from block 0; lock-free.

        A pod drops out at its first missing block. Each block counts the best tier weight
        the pod holds it on. Pods with several data-parallel ranks report their best rank.
        """
        pod_masks = self._pod_masks
        if pods is None:
            candidates = 0
            for mask in pod_masks.values():
                candidates |= mask
            wanted: Iterable[str] = pod_masks
        else:
            wanted = list(pods)
            candidates = 0
            for pod in wanted:
                candidates |= pod_masks.get(pod, 0)
        total = len(keys)
        drops: list[tuple[int, int]] = []
        special: list[tuple[int, tuple[int, ...]]] = []
        alive = candidates
        get = self._entries.get
        depth = 0
        for key in keys:
            if not alive:
                break
            value = get(key)
            if value is None:
                break
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
        if alive:
            drops.append((depth, alive))
        return self._results(wanted, total, drops, special)

    def _results(
        self,
        wanted: Iterable[str],
        total: int,
        drops: list[tuple[int, int]],
        special: list[tuple[int, tuple[int, ...]]],
    ) -> dict[str, PrefixMatch]:
        owners = self._bit_owner
        weights = self._weights
        names = self._tier_names
        gpu_weight = weights[GPU]
        results: dict[str, PrefixMatch] = {}
        for depth, dropped_mask in drops:
            if not depth:
                continue
            left = dropped_mask
            while left:
                bit = left & -left
                left ^= bit
                owner = owners.get(bit)
                if owner is None:
                    continue
                pod, rank = owner
                weighted = gpu_weight * depth
                tiers: dict[str, int] = {"gpu": depth}
                for at, value in special:
                    if at >= depth:
                        break
                    best = -1
                    for tier in range(len(value) - 1):
                        if value[tier + 1] & bit and (best < 0 or weights[tier] > weights[best]):
                            best = tier
                    if best != GPU:
                        weighted += weights[best] - gpu_weight
                        tiers["gpu"] -= 1
                        tiers[names[best]] = tiers.get(names[best], 0) + 1
                current = results.get(pod)
                if current is None or weighted > current.weighted_blocks:
                    results[pod] = PrefixMatch(
                        pod,
                        depth,
                        total,
                        self.block_size,
                        weighted,
                        {k: v for k, v in tiers.items() if v},
                        rank,
                    )
        for pod in wanted:
            if pod not in results:
                results[pod] = PrefixMatch(pod, 0, total, self.block_size, 0.0, {}, 0)
        return results

    # ------------------------------------------------------------------ introspection

    def holds(self, pod: str, block_hash: int | bytes, *, rank: int = 0) -> bool:
        """Whether the slot (pod, rank) currently holds this engine hash on any tier."""
        slot = self._slots.get((pod, rank))
        return slot is not None and engine_key(block_hash) in slot.held

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, Any]:
        """Entry counts and counters; safe to call from any thread."""
        per_pod: dict[str, int] = {}
        for (pod, _rank), slot in list(self._slots.items()):
            per_pod[pod] = per_pod.get(pod, 0) + len(slot.held)
        return {
            "entries": len(self._entries),
            "pod_blocks": per_pod,
            "speculative_keys": self._spec_keys,
            "orphans_pending": sum(s.orphan_blocks for s in list(self._slots.values())),
            "counters": dict(self.counters),
        }


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
    return out
