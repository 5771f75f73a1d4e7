"""Diagnose hash-settings mistakes by recomputing the hashes of sampled ``BlockStored`` events.

The most common deployment mistake is a scorer whose hash settings differ from the vLLM
pods' (another ``PYTHONHASHSEED``, ``--prefix-caching-hash-algo`` or block size): the
index then fills with hashes no prompt ever produces and every score is zero.
:class:`HashCheck` recomputes an event's hashes with the configured
:class:`~kvaware_scorer.vllm_hash.VllmHashSettings` and, when they differ, tries the
likely alternatives to name the setting that reproduces the event.

Only events that start at block 0 (``parent_block_hash`` is ``None``), carry their tokens
(``block_size > 0``) and have no multimodal extra keys can be recomputed. A LoRA event
also needs the adapter path, which events do not carry (vLLM >= 0.31 hashes it).

The alternatives search is bounded: at most 4 algorithms x 3 seeds x 3 hashing block
sizes (configured, the event's, 16) x 2 lookahead values, each first tried on the
event's first block only; the full event is recomputed only for a candidate that
reproduces that block. Callers sample and rate-limit the events they pass in.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.events import BlockHash, BlockStored
from kvaware_scorer.vllm_hash import (
    HASH_ALGOS,
    LoraSpec,
    VllmBlockHash,
    VllmHashSettings,
    block_hashes,
)

__all__ = ["HashCheck", "HashCheckResult"]

_T = TypeVar("_T")

_ALTERNATIVE_SEEDS: tuple[str | None, ...] = (None, "0")
"""Seeds tried besides the configured one (``None``: unset, i.e. "vllm-none-hash")."""

_DEFAULT_BLOCK_SIZE = 16
"""vLLM's default block size: also tried as the hashing granularity when it divides the
event's block size (hybrid models chain at a finer granularity than some groups report)."""


@dataclass(frozen=True, slots=True)
class HashCheckResult:
    """Outcome of one checked event.

    ``ok`` is true when the configured settings reproduce every block hash of the event;
    ``blocks_compared`` is the number of event hashes compared; ``hint`` (only when not
    ok) names the setting that reproduces the event, or says that none of the tried ones
    does; ``matched`` is the settings that reproduce it (the configured ones when ok, an
    alternative, or ``None``).
    """

    ok: bool
    blocks_compared: int
    hint: str | None = None
    matched: VllmHashSettings | None = None


@dataclass(frozen=True, slots=True)
class _Request:
    """What an event says about the request, in the form the hasher takes."""

    hashes: tuple[BlockHash, ...]
    tokens: tuple[int, ...]  # the event's tokens plus the last block's lookahead tokens
    block_size: int  # the reporting group's block size
    lookahead: int
    lora: LoraSpec | None
    cache_salt: str | None
    embeds_digests: tuple[bytes, ...] | None  # one per event block


def _same_hash(event_hash: BlockHash, computed: VllmBlockHash) -> bool:
    if event_hash.__class__ is int:
        return event_hash == computed.event_int
    return event_hash == computed.digest


def _parse_extra_keys(
    event: BlockStored, lora_name: str | None
) -> tuple[str | None, tuple[bytes, ...] | None] | None:
    """(salt, prompt-embeds digests) from the untagged extra keys; None if not checkable."""
    extra = event.extra_keys
    if extra is None:
        return None, None
    if not isinstance(extra, list) or len(extra) != len(event.block_hashes):
        return None
    salt: str | None = None
    digests: list[bytes] = []
    for index, entry in enumerate(extra):
        if entry is None:
            if lora_name is not None:
                return None  # every block of a LoRA request carries the adapter name
            continue
        if not isinstance(entry, (list, tuple)):
            return None
        items = list(entry)
        if lora_name is not None:
            if not items or items[0] != lora_name:
                return None
            items = items[1:]
        for item in items:
            if isinstance(item, (list, tuple)):
                return None  # multimodal: not checkable
            if isinstance(item, str) and index == 0 and salt is None:
                salt = item
            elif isinstance(item, bytes) and len(digests) == index:
                digests.append(item)
            else:
                return None
    if digests and len(digests) != len(extra):
        return None
    return salt, (tuple(digests) if digests else None)


def _request_from_event(
    event: BlockStored, lora_path: str | None, cache_salt: str | None
) -> _Request | None:
    if event.parent_block_hash is not None:
        return None
    hashes = event.block_hashes
    tokens = event.token_ids
    size = event.block_size
    if not hashes or not tokens or not isinstance(size, int) or size <= 0:
        return None
    if len(tokens) != len(hashes) * size:
        return None
    if any(not isinstance(h, (int, bytes)) or isinstance(h, bool) for h in hashes):
        return None
    if any(t.__class__ is not int for t in tokens):
        return None

    lora: LoraSpec | None = None
    if event.lora_name is not None or event.lora_id is not None:
        if not isinstance(lora_path, str) or not isinstance(event.lora_name, str):
            return None
        lora_id = event.lora_id
        if not isinstance(lora_id, int) or isinstance(lora_id, bool):
            lora_id = 0  # not hashed; kept for the record
        lora = LoraSpec(event.lora_name, lora_id, lora_path)

    parsed = _parse_extra_keys(event, None if lora is None else lora.name)
    if parsed is None:
        return None
    event_salt, digests = parsed

    lookahead = 0
    tail: list[int] = []
    look = event.lookahead_token_ids
    if look:
        if len(look) != len(hashes) or not isinstance(look[-1], list):
            return None
        lookahead = len(look[-1])
        if any(not isinstance(x, list) or len(x) != lookahead for x in look):
            return None
        tail = look[-1]
        if any(t.__class__ is not int for t in tail):
            return None

    return _Request(
        hashes=tuple(hashes),
        tokens=(*tokens, *tail),
        block_size=size,
        lookahead=lookahead,
        lora=lora,
        cache_salt=cache_salt if cache_salt is not None else event_salt,
        embeds_digests=digests,
    )


def _reproduces(settings: VllmHashSettings, request: _Request, num_blocks: int) -> bool:
    """Whether ``settings`` reproduce the first ``num_blocks`` hashes of the event."""
    fine_size = settings.block_size
    if request.block_size % fine_size:
        return False
    step = request.block_size // fine_size
    lookahead = settings.num_hash_lookahead_tokens
    digests = None
    if request.embeds_digests is not None:
        if step != 1:
            return False  # the event only carries the reported blocks' digests
        digests = {
            (i * fine_size, (i + 1) * fine_size + lookahead): d
            for i, d in enumerate(request.embeds_digests[:num_blocks])
        }
    needed = num_blocks * step
    tokens = request.tokens[: needed * fine_size + lookahead]
    try:
        fine = block_hashes(
            settings,
            tokens,
            lora=request.lora,
            cache_salt=request.cache_salt,
            prompt_embeds_digests=digests,
        )
    except ValueError:
        return False
    if len(fine) < needed:
        return False
    reported = fine[step - 1 :: step]
    return all(
        _same_hash(h, c)
        for h, c in zip(request.hashes[:num_blocks], reported[:num_blocks], strict=True)
    )


def _seed_text(seed: str | None) -> str:
    return "PYTHONHASHSEED unset" if seed is None else f"PYTHONHASHSEED={seed!r}"


def _describe(settings: VllmHashSettings, *, sizes: bool, lookahead: bool) -> str:
    text = f"hash_algo={settings.hash_algo!r} with {_seed_text(settings.pythonhashseed)}"
    if sizes:
        text += f" and block_size={settings.block_size}"
    if lookahead:
        text += f" and num_hash_lookahead_tokens={settings.num_hash_lookahead_tokens}"
    return text


def _unique(values: Sequence[_T]) -> tuple[_T, ...]:
    out: list[_T] = []
    for value in values:
        if value not in out:
            out.append(value)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _Tried:
    """The values the alternatives search combines, configured value first."""

    algos: tuple[str, ...]
    seeds: tuple[str | None, ...]
    sizes: tuple[int, ...]
    lookaheads: tuple[int, ...]


class HashCheck:
    """Checks sampled ``BlockStored`` events against the expected hash settings."""

    def __init__(self, settings: VllmHashSettings) -> None:
        """Check events against ``settings`` (the hash settings the scorer uses)."""
        self._settings = settings

    @property
    def settings(self) -> VllmHashSettings:
        """The expected settings."""
        return self._settings

    def check(
        self,
        event: BlockStored,
        *,
        lora_path: str | None = None,
        cache_salt: str | None = None,
    ) -> HashCheckResult | None:
        """Recompute ``event``'s hashes; ``None`` when the event cannot be recomputed.

        ``lora_path`` is the adapter path of the event's LoRA (required for LoRA events).
        ``cache_salt`` is the request's salt; when omitted, the salt is taken from the
        event's block-0 extra keys (vLLM >= 0.17 publishes it there).
        Event hashes may be ints (compared with the event-int form) or bytes (compared
        with the digest).
        """
        request = _request_from_event(event, lora_path, cache_salt)
        if request is None:
            return None
        count = len(request.hashes)
        if _reproduces(self._settings, request, count):
            return HashCheckResult(True, count, None, self._settings)
        matched, tried = self._search(request)
        return HashCheckResult(False, count, self._hint(request, matched, tried), matched)

    def _candidates(self, request: _Request) -> tuple[list[VllmHashSettings], _Tried]:
        cfg = self._settings
        tried = _Tried(
            algos=_unique([cfg.hash_algo, *HASH_ALGOS]),
            seeds=_unique([cfg.pythonhashseed, *_ALTERNATIVE_SEEDS]),
            sizes=tuple(
                size
                for size in _unique([cfg.block_size, request.block_size, _DEFAULT_BLOCK_SIZE])
                if request.block_size % size == 0
            ),
            lookaheads=_unique([cfg.num_hash_lookahead_tokens, request.lookahead]),
        )
        scored: list[tuple[int, VllmHashSettings]] = []
        for algo, seed, size, look in itertools.product(
            tried.algos, tried.seeds, tried.sizes, tried.lookaheads
        ):
            try:
                candidate = VllmHashSettings(algo, seed, size, look)
            except ConfigError:
                continue  # e.g. xxhash with the seed unset: not reproducible
            if candidate == cfg:
                continue
            diffs = (
                (algo != cfg.hash_algo)
                + (seed != cfg.pythonhashseed)
                + (size != cfg.block_size)
                + (look != cfg.num_hash_lookahead_tokens)
            )
            scored.append((diffs, candidate))
        scored.sort(key=lambda item: item[0])  # stable: fewest changed settings first
        return [candidate for _, candidate in scored], tried

    def _search(self, request: _Request) -> tuple[VllmHashSettings | None, _Tried]:
        candidates, tried = self._candidates(request)
        count = len(request.hashes)
        for candidate in candidates:
            if _reproduces(candidate, request, 1) and (
                count == 1 or _reproduces(candidate, request, count)
            ):
                return candidate, tried
        return None, tried

    def _hint(
        self,
        request: _Request,
        matched: VllmHashSettings | None,
        tried: _Tried,
    ) -> str:
        cfg = self._settings
        if matched is not None:
            sizes = matched.block_size != cfg.block_size
            look = matched.num_hash_lookahead_tokens != cfg.num_hash_lookahead_tokens
            text = (
                f"events match {_describe(matched, sizes=sizes, lookahead=look)}; "
                f"configured {_describe(cfg, sizes=sizes, lookahead=look)}"
            )
            if matched.block_size != request.block_size:
                text += (
                    f" (the event's KV-cache group reports block_size={request.block_size}; "
                    f"vLLM chains the hashes in steps of {matched.block_size})"
                )
            return text
        seeds = ", ".join("unset" if s is None else repr(s) for s in tried.seeds)
        return (
            "no tried setting reproduces the events; tried hash_algo "
            f"{', '.join(tried.algos)}; PYTHONHASHSEED {seeds}; "
            f"block_size {', '.join(str(s) for s in tried.sizes)}; "
            "num_hash_lookahead_tokens "
            f"{', '.join(str(s) for s in tried.lookaheads)}; configured "
            f"{_describe(cfg, sizes=True, lookahead=bool(cfg.num_hash_lookahead_tokens))}. "
            "Other causes: another PYTHONHASHSEED value in the pods, xxhash/xxhash_cbor "
            "with PYTHONHASHSEED unset (random per process), a different LoRA path or "
            "cache salt, or a vLLM release older than 0.31"
        )
