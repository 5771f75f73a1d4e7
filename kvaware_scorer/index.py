"""The prefix index: which pod holds which KV block, on which tier.

Three concerns, three modules: residency masks per request key
(:mod:`kvaware_scorer.residency`), applying vLLM's events through the dual-key bridge
(:mod:`kvaware_scorer.ingest`), and here the slots, capacity, speculation and the
lock-free longest-prefix match.

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
from dataclasses import dataclass
from itertools import islice
from typing import Any

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.ingest import EventApplier, HeldRec, _Slot, held_key
from kvaware_scorer.keys import KeyHasher
from kvaware_scorer.residency import (
    BUILTIN_TIERS,
    DEFAULT_OTHER_TIER_WEIGHT,
    DEFAULT_TIER_WEIGHTS,
    GPU,
    SPECULATIVE,
    Residency,
    weigh_prefix,
)

logger = logging.getLogger(__name__)

DEFAULT_POD_CAPACITY = 2_000_000
DEFAULT_MAX_ENTRIES = 20_000_000
DEFAULT_SPECULATIVE_TTL_S = 2.0
DEFAULT_MAX_ORPHAN_BLOCKS = 65_536
_EVICT_FRACTION = 16  # over capacity, evict 1/16 of the slot's blocks at once


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


class PrefixIndex(EventApplier):
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

    def _expire_if_due(self) -> None:
        if self._speculative:
            self._expire(self._clock())

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

    # ------------------------------------------------------------------ introspection

    def holds(self, pod: str, block_hash: int | bytes, *, rank: int = 0) -> bool:
        """Whether the slot (pod, rank) currently holds this engine hash on any tier."""
        slot = self._slots.get((pod, rank))
        return slot is not None and held_key(block_hash) in slot.held

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
