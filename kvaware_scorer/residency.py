"""Residency of request keys: which pod slots hold each key, on which tier.

``_entries`` maps a request key to an int (a bit mask of pod slots, one slot per
(pod, data-parallel rank)) when the key is held on GPU tiers only, or to a tuple
``(any_mask, gpu_mask, cpu_mask, speculative_mask, *other_tiers)`` when any other tier is
involved (trailing empty tiers are dropped). Values are immutable and replaced whole, so
a lock-free reader always sees a consistent value; masks are interned (bounded) to save
memory. Tiers are vLLM's ``medium`` names, lower-cased; new names get the next tier id.

A mixin of :class:`kvaware_scorer.index.PrefixIndex`, which owns the state and the lock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

GPU, CPU, SPECULATIVE = 0, 1, 2
BUILTIN_TIERS = ("gpu", "cpu", "speculative")
MAX_TIERS = 16
DEFAULT_TIER_WEIGHTS: Mapping[str, float] = {"gpu": 1.0, "cpu": 0.8}
DEFAULT_OTHER_TIER_WEIGHT = 0.5
_INTERN_LIMIT = 1 << 16

Residency = int | tuple[int, ...]


def weigh_prefix(
    bit: int,
    depth: int,
    special: Sequence[tuple[int, tuple[int, ...]]],
    weights: Sequence[float],
    names: Sequence[str],
) -> tuple[float, dict[str, int]]:
    """Tier-weighted length of a slot's ``depth``-block prefix, and blocks per tier.

    Blocks held as a plain GPU mask weigh the GPU weight; ``special`` lists the
    (position, tuple value) of the walked blocks stored as tuples, where the slot's best
    tier counts.
    """
    gpu_weight = weights[GPU]
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
    return weighted, {k: v for k, v in tiers.items() if v}


class ResidencyStore:
    """Mask arithmetic over ``_entries``; callers hold the index's write lock."""

    _entries: dict[int, Residency]
    _interned: dict[int, int]
    _tier_names: list[str]
    _tier_ids: dict[str, int]
    _weights: list[float]
    _named_weights: dict[str, float]
    _other_weight: float

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
