"""vLLM 0.33.0 prefix-cache block hashing, re-implemented from the specification.

vLLM names every full block of a request by a hash that chains over the previous block's
raw digest (``shared/research/vllm-kv-events.md`` §6)::

    parent_0 = NONE_HASH = DIGEST(SERIALIZE(seed))
    h_i      = DIGEST(SERIALIZE((parent_i, tuple(tokens_of_block_i), extra_keys_i)))

with ``SERIALIZE`` = pickle protocol 5 (``sha256``, ``xxhash``) or canonical CBOR
(``sha256_cbor``, ``xxhash_cbor``) and ``DIGEST`` = SHA-256 (32 bytes) or XXH3-128
(16 bytes, canonical big-endian). KV events carry the last 8 bytes of a digest as an
unsigned big-endian int (:func:`event_hash_int`), or the digest itself.

This module is for diagnosis (:mod:`kvaware_scorer.hash_check`) and the ``hash`` command,
not for the routing hot path, but it avoids needless work: the root is computed once per
(algorithm, seed) and token slices are taken from one tuple.

Pickle memoises objects by identity, so the tag strings below are interned: a block that
overlaps two images then pickles ``"mm"`` once and refers back to it, as vLLM does.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
import pickle
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Final

import cbor2
import xxhash

from kvaware_scorer.errors import ConfigError

__all__ = [
    "DEFAULT_NONE_HASH_SEED",
    "HASH_ALGOS",
    "PICKLE_PROTOCOL",
    "LoraSpec",
    "MultiModalSpan",
    "VllmBlockHash",
    "VllmHashSettings",
    "block_hashes",
    "event_hash_int",
    "group_block_hashes",
    "none_hash",
    "none_hash_seed",
    "reported_block_hashes",
    "serialize_block_input",
    "to_event_extra_keys",
]

HASH_ALGOS: Final[tuple[str, ...]] = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
"""The values of vLLM's ``--prefix-caching-hash-algo`` this module reproduces."""

DEFAULT_NONE_HASH_SEED: Final = "vllm-none-hash"
"""Root seed of the sha256 algorithms when ``PYTHONHASHSEED`` is unset (vLLM >= 0.29)."""

PICKLE_PROTOCOL: Final = 5
"""Pinned: vLLM uses ``pickle.HIGHEST_PROTOCOL``, which is 5 on every Python it supports."""

# Interned so that pickle's identity memo behaves as with vLLM's constant tag strings.
TAG_LORA: Final = sys.intern("lora")
TAG_MM: Final = sys.intern("mm")
TAG_CACHE_SALT: Final = sys.intern("cache_salt")
TAG_PROMPT_EMBEDS: Final = sys.intern("prompt_embeds")

_UNREPRODUCIBLE_ALGOS: Final = frozenset({"xxhash", "xxhash_cbor"})

_Serializer = Callable[[object], bytes]
_Digester = Callable[[bytes], bytes]


def _pickle_dumps(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=PICKLE_PROTOCOL)


def _cbor_dumps(obj: object) -> bytes:
    data: bytes = cbor2.dumps(obj, canonical=True)
    return data


def _sha256_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _xxh3_128_digest(data: bytes) -> bytes:
    digest: bytes = xxhash.xxh3_128_digest(data)
    return digest


_ALGORITHMS: Final[dict[str, tuple[_Serializer, _Digester]]] = {
    "sha256": (_pickle_dumps, _sha256_digest),
    "sha256_cbor": (_cbor_dumps, _sha256_digest),
    "xxhash": (_pickle_dumps, _xxh3_128_digest),
    "xxhash_cbor": (_cbor_dumps, _xxh3_128_digest),
}


def digest_function(hash_algo: str) -> Callable[[bytes], bytes]:
    """The digest (SHA-256 or XXH3-128) of one of vLLM's hash algorithms."""
    return _ALGORITHMS[hash_algo][1]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class VllmHashSettings:
    """How the vLLM pods hash blocks; validated on construction (:class:`ConfigError`).

    ``hash_algo`` is vLLM's ``--prefix-caching-hash-algo``; ``pythonhashseed`` the value of
    ``PYTHONHASHSEED`` in the vLLM pods, taken literally (``None`` = unset);
    ``block_size`` the hashing granularity in tokens (vLLM's ``hash_block_size``: the
    block size for ordinary models); ``num_hash_lookahead_tokens`` the EAGLE lookahead
    (0 unless speculative decoding with block drop is on).
    """

    hash_algo: str = "sha256"
    pythonhashseed: str | None = None
    block_size: int = 16
    num_hash_lookahead_tokens: int = 0

    def __post_init__(self) -> None:
        """Refuse settings vLLM does not have or cannot reproduce."""
        if not isinstance(self.hash_algo, str) or self.hash_algo not in _ALGORITHMS:
            raise ConfigError(
                f"hash_algo: unknown algorithm {self.hash_algo!r}; "
                f"allowed values: {', '.join(HASH_ALGOS)}"
            )
        if self.pythonhashseed is not None and not isinstance(self.pythonhashseed, str):
            raise ConfigError(
                "pythonhashseed: must be the PYTHONHASHSEED string of the vLLM pods, or "
                f"None when it is unset; got {self.pythonhashseed!r}"
            )
        if self.pythonhashseed is None and self.hash_algo in _UNREPRODUCIBLE_ALGOS:
            raise ConfigError(
                f"hash_algo={self.hash_algo!r} with PYTHONHASHSEED unset cannot be "
                "reproduced: vLLM then seeds its root hash randomly in every process. Set "
                "the same PYTHONHASHSEED in the vLLM pods and here (pythonhashseed), or run "
                "vLLM with --prefix-caching-hash-algo sha256 or sha256_cbor"
            )
        if not _is_int(self.block_size) or self.block_size <= 0:
            raise ConfigError(f"block_size: must be a positive integer, got {self.block_size!r}")
        lookahead = self.num_hash_lookahead_tokens
        if not _is_int(lookahead) or lookahead < 0:
            raise ConfigError(
                f"num_hash_lookahead_tokens: must be a non-negative integer, got {lookahead!r}"
            )

    def describe(self) -> str:
        """A short human-readable form, e.g. ``hash_algo='sha256', PYTHONHASHSEED unset``."""
        seed = (
            "PYTHONHASHSEED unset"
            if self.pythonhashseed is None
            else (f"PYTHONHASHSEED={self.pythonhashseed!r}")
        )
        text = f"hash_algo={self.hash_algo!r}, {seed}, block_size={self.block_size}"
        if self.num_hash_lookahead_tokens:
            text += f", num_hash_lookahead_tokens={self.num_hash_lookahead_tokens}"
        return text


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """A LoRA adapter as vLLM's ``LoRARequest`` names it; vLLM >= 0.31 hashes name and path."""

    name: str
    int_id: int
    path: str

    def __post_init__(self) -> None:
        """Check the field types (the hash depends on them being str)."""
        if not isinstance(self.name, str) or not isinstance(self.path, str):
            raise ValueError("lora: name and path must be strings")
        if not _is_int(self.int_id):
            raise ValueError(f"lora: int_id must be an integer, got {self.int_id!r}")


@dataclass(frozen=True, slots=True)
class MultiModalSpan:
    """One multimodal item: vLLM's item ``identifier`` and its placeholder token span."""

    identifier: str
    offset: int
    length: int

    def __post_init__(self) -> None:
        """Check the span (offset >= 0, length > 0)."""
        if not isinstance(self.identifier, str):
            raise ValueError(f"mm_features: identifier must be a string, got {self.identifier!r}")
        if not _is_int(self.offset) or self.offset < 0:
            raise ValueError(
                f"mm_features: offset must be a non-negative integer, got {self.offset!r}"
            )
        if not _is_int(self.length) or self.length <= 0:
            raise ValueError(f"mm_features: length must be a positive integer, got {self.length!r}")


@dataclass(frozen=True, slots=True)
class VllmBlockHash:
    """One full block's hash as vLLM computes it.

    ``digest`` is the raw hash (32 or 16 bytes, what events carry with
    ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``); ``event_int`` the default event form;
    ``hash_extra_keys`` the exact (tagged) extra-keys value that was hashed, including the
    lookahead tokens; ``event_extra_keys`` the untagged form ``BlockStored.extra_keys``
    carries for this block (tuples here, arrays on the wire, lists once decoded).
    """

    index: int
    digest: bytes
    event_int: int
    token_start: int
    token_end: int
    hash_extra_keys: tuple[Any, ...] | None
    event_extra_keys: tuple[Any, ...] | None
    lookahead_token_ids: tuple[int, ...] = ()

    @property
    def hex(self) -> str:
        """The digest as lowercase hex."""
        return self.digest.hex()


def event_hash_int(digest: bytes) -> int:
    """The event form of a digest: its last 8 bytes as an unsigned big-endian int."""
    return int.from_bytes(digest[-8:], "big")


def none_hash_seed(settings: VllmHashSettings) -> str:
    """The string vLLM serialises and digests to make the root hash."""
    if settings.pythonhashseed is not None:
        return settings.pythonhashseed
    return DEFAULT_NONE_HASH_SEED  # the settings refuse xxhash* with the seed unset


@lru_cache(maxsize=64)
def _none_hash(hash_algo: str, seed: str) -> bytes:
    serialize, digest = _ALGORITHMS[hash_algo]
    return digest(serialize(seed))


def none_hash(settings: VllmHashSettings) -> bytes:
    """The root ``NONE_HASH``: the parent of block 0 (cached per algorithm and seed)."""
    return _none_hash(settings.hash_algo, none_hash_seed(settings))


def serialize_block_input(
    hash_algo: str,
    parent: bytes,
    token_ids: Sequence[int],
    extra_keys: tuple[Any, ...] | None,
) -> bytes:
    """The exact bytes vLLM digests for one block: ``(parent, tuple(tokens), extra_keys)``.

    ``extra_keys`` must be built with interned tag strings (as :func:`block_hashes` does)
    for the pickle-based algorithms to match vLLM byte for byte.
    """
    if hash_algo not in _ALGORITHMS:
        raise ConfigError(
            f"hash_algo: unknown algorithm {hash_algo!r}; allowed values: {', '.join(HASH_ALGOS)}"
        )
    serialize = _ALGORITHMS[hash_algo][0]
    return serialize((parent, tuple(token_ids), extra_keys))


def to_event_extra_keys(extra_keys: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """Untag hash extra keys into the form ``BlockStored.extra_keys`` carries.

    ``("lora", name, path)`` becomes ``name``, ``("mm", identifier, offset)`` becomes
    ``(identifier, offset)``, ``("cache_salt", salt)`` becomes ``salt`` and
    ``("prompt_embeds", digest)`` becomes ``digest``. Lookahead tokens are not part of
    the input (they travel in ``lookahead_token_ids``).
    """
    if extra_keys is None:
        return None
    out: list[Any] = []
    for key in extra_keys:
        tag = key[0]
        if tag == TAG_LORA:
            out.append(key[1])
        elif tag == TAG_MM:
            out.append((key[1], key[2]))
        elif tag in (TAG_CACHE_SALT, TAG_PROMPT_EMBEDS):
            out.append(key[1])
        else:
            raise ValueError(f"unknown extra-key tag {tag!r}")
    return tuple(out)


def _token_tuple(token_ids: Iterable[int]) -> tuple[int, ...]:
    tokens = tuple(token_ids)
    for token in tokens:
        if token.__class__ is not int:
            # numpy ints and the like: pickle would write them as objects, not BININT.
            return tuple(operator.index(t) for t in tokens)
    return tokens


def block_hashes(
    settings: VllmHashSettings,
    token_ids: Iterable[int],
    *,
    lora: LoraSpec | None = None,
    cache_salt: str | None = None,
    mm_features: Iterable[MultiModalSpan] = (),
    prompt_embeds_digests: Mapping[tuple[int, int], bytes] | None = None,
) -> list[VllmBlockHash]:
    """Hash every full block of ``token_ids`` exactly as vLLM 0.33.0 does.

    Only full blocks are hashed: ``(len(token_ids) - L) // block_size`` of them, where
    ``L`` is ``settings.num_hash_lookahead_tokens``. Extra keys, in vLLM's order:
    ``("lora", name, path)`` on every block of a LoRA request; ``("mm", identifier,
    offset - block_start)`` for each item whose span overlaps the block (with lookahead,
    the window ``[start, end + L)``); ``("cache_salt", salt)`` on block 0 when the salt is
    non-empty; ``("prompt_embeds", digest)`` on every block when ``prompt_embeds_digests``
    is given. That mapping is keyed by the ``(start, end)`` token span the digest covers
    (``end`` includes the lookahead window), as the vectors' ``"start-end"`` keys are.
    With lookahead, the hashed extra keys are ``(E, *tokens[end:end + L])``.

    ``mm_features`` must be in prompt order (sorted by offset), as vLLM keeps them.
    Raises ``ValueError`` for malformed inputs.
    """
    serialize, digest_of = _ALGORITHMS[settings.hash_algo]
    tokens = _token_tuple(token_ids)
    size = settings.block_size
    lookahead = settings.num_hash_lookahead_tokens
    spans = tuple(mm_features)
    for before, after in itertools.pairwise(spans):
        if after.offset < before.offset:
            raise ValueError("mm_features: items must be in prompt order (sorted by offset)")
    if cache_salt is not None and not isinstance(cache_salt, str):
        raise ValueError(f"cache_salt: must be a string, got {cache_salt!r}")

    num_blocks = max(0, (len(tokens) - lookahead) // size)
    lora_key = None if lora is None else (TAG_LORA, lora.name, lora.path)
    parent = none_hash(settings)
    out: list[VllmBlockHash] = []
    for index in range(num_blocks):
        start = index * size
        end = start + size
        window_end = end + lookahead
        keys: list[tuple[Any, ...]] = []
        if lora_key is not None:
            keys.append(lora_key)
        for span in spans:
            if span.offset >= window_end:
                break
            if span.offset + span.length > start:
                keys.append((TAG_MM, span.identifier, span.offset - start))
        if index == 0 and cache_salt:
            keys.append((TAG_CACHE_SALT, cache_salt))
        if prompt_embeds_digests is not None:
            embeds_digest = prompt_embeds_digests.get((start, window_end))
            if not isinstance(embeds_digest, bytes):
                raise ValueError(
                    f"prompt_embeds: no digest (bytes) for the block span {start}-{window_end}"
                )
            keys.append((TAG_PROMPT_EMBEDS, embeds_digest))
        extra = tuple(keys) if keys else None
        lookahead_tokens = tokens[end:window_end]
        hashed_extra = (extra, *lookahead_tokens) if lookahead else extra
        digest = digest_of(serialize((parent, tokens[start:end], hashed_extra)))
        out.append(
            VllmBlockHash(
                index=index,
                digest=digest,
                event_int=int.from_bytes(digest[-8:], "big"),
                token_start=start,
                token_end=end,
                hash_extra_keys=hashed_extra,
                event_extra_keys=to_event_extra_keys(extra),
                lookahead_token_ids=lookahead_tokens,
            )
        )
        parent = digest
    return out


def reported_block_hashes(
    fine_hashes: Sequence[VllmBlockHash], *, hash_block_size: int, block_size: int
) -> list[VllmBlockHash]:
    """What a KV-cache group with ``block_size = k * hash_block_size`` reports.

    vLLM chains hashes at ``hash_block_size`` (hybrid models, ``prefix_match_unit``); a
    group with bigger blocks reports the chain hash at each of its block boundaries: every
    k-th fine hash. The results keep the fine block's digest and extra keys, with the
    token range and index of the group's block. Trailing fine blocks that do not fill a
    group block are dropped.
    """
    if not _is_int(hash_block_size) or hash_block_size <= 0:
        raise ConfigError(f"hash_block_size: must be a positive integer, got {hash_block_size!r}")
    if not _is_int(block_size) or block_size <= 0 or block_size % hash_block_size:
        raise ConfigError(
            f"block_size: must be a positive multiple of hash_block_size={hash_block_size}, "
            f"got {block_size!r}"
        )
    step = block_size // hash_block_size
    return [
        replace(fine, index=index, token_start=fine.token_end - block_size)
        for index, fine in enumerate(fine_hashes[step - 1 :: step])
    ]


def group_block_hashes(
    settings: VllmHashSettings,
    token_ids: Iterable[int],
    *,
    group_block_size: int,
    lora: LoraSpec | None = None,
    cache_salt: str | None = None,
    mm_features: Iterable[MultiModalSpan] = (),
    prompt_embeds_digests: Mapping[tuple[int, int], bytes] | None = None,
) -> list[VllmBlockHash]:
    """Hash at ``settings.block_size`` and report at ``group_block_size`` (a multiple of it)."""
    fine = block_hashes(
        settings,
        token_ids,
        lora=lora,
        cache_salt=cache_salt,
        mm_features=mm_features,
        prompt_embeds_digests=prompt_embeds_digests,
    )
    return reported_block_hashes(
        fine, hash_block_size=settings.block_size, block_size=group_block_size
    )
