"""Request keys: kvaware-scorer's own chained 64-bit block keys.

The index is keyed by these, never by vLLM's engine hashes, so a deployment's vLLM hash
algorithm, ``PYTHONHASHSEED`` or version cannot break matching. A key is

    key_i = xxh3_64(block_token_bytes_i [+ 0xff + extras_i], seed=key_{i-1}) mod 2**60
    key_-1 = root = xxh3_64("kvaware\\0" + hash_seed + "\\0" + namespace) mod 2**60

where the token bytes are the block's token ids as little-endian uint32 and the
namespace is the model name, or the LoRA adapter name for an adapter's blocks.
Extras (only on blocks that have them) are, in this order: the ``cache_salt`` on block 0,
every multimodal item whose placeholder starts inside the block (identifier and offset
from the block start), and prompt-embedding digests. Chaining makes every later key
depend on them too, so two prompts that differ in an image or a salt never share a key
past that point. Both sides (events and requests) build extras with :func:`block_extras`.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from xxhash import xxh3_64_intdigest

from kvaware_scorer.errors import KVAwareError

_EXTRA_SEP = b"\xff"
# Keys keep the low 60 bits of the xxh3-64 digest: an int below 2**60 is a 32-byte object
# (a full 64-bit int takes 48 after allocator rounding), which matters at millions of keys;
# at 10M keys the chance of any collision is below 1e-4.
KEY_MASK = (1 << 60) - 1


@dataclass(frozen=True, slots=True)
class MultiModalItem:
    """A multimodal placeholder span in the prompt: tokens ``[offset, offset + length)``."""

    identifier: str
    offset: int
    length: int = 1


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes (the form the key hash reads)."""
    if isinstance(token_ids, array) and token_ids.typecode == "I":
        return token_ids.tobytes()
    try:
        return array("I", token_ids).tobytes()
    except (OverflowError, TypeError) as exc:
        raise KVAwareError(f"token ids must be integers in [0, 2**32): {exc}") from exc


def block_extras(
    num_blocks: int,
    block_size: int,
    *,
    cache_salt: str | None = None,
    mm_items: Iterable[MultiModalItem] = (),
    embed_digests: Sequence[bytes] | None = None,
) -> dict[int, bytes]:
    """Extras per block index, for the blocks that have any (most have none)."""
    parts: dict[int, list[bytes]] = {}
    if cache_salt and num_blocks:
        parts[0] = [b"s" + cache_salt.encode()]
    for item in sorted(mm_items, key=lambda m: (m.offset, m.identifier)):
        block, rel = divmod(item.offset, block_size)
        if 0 <= block < num_blocks:
            parts.setdefault(block, []).append(b"m%s\x00%d\x00" % (item.identifier.encode(), rel))
    if embed_digests:
        for block, digest in enumerate(embed_digests[:num_blocks]):
            parts.setdefault(block, []).append(b"e" + digest)
    return {block: b"".join(p) for block, p in parts.items()}


class KeyHasher:
    """Computes request keys for one index block size and hash seed.

    Thread-safe: the only state is a bounded cache of namespace roots.
    """

    _MAX_ROOTS = 4096

    def __init__(self, block_size: int = 16, hash_seed: str = "") -> None:
        if block_size <= 0:
            raise KVAwareError(f"block_size must be a positive integer, got {block_size!r}")
        self.block_size = block_size
        self.block_bytes = block_size * 4
        self.hash_seed = hash_seed
        self._roots: dict[str, int] = {}

    def root(self, namespace: str) -> int:
        """The parent of block 0 for a model (or LoRA adapter) namespace."""
        key = self._roots.get(namespace)
        if key is None:
            key = xxh3_64_intdigest(f"kvaware\0{self.hash_seed}\0{namespace}".encode()) & KEY_MASK
            if len(self._roots) < self._MAX_ROOTS:
                self._roots[namespace] = key
        return key

    def chain(
        self,
        parent: int,
        data: bytes,
        extras: dict[int, bytes] | None = None,
        first_block: int = 0,
    ) -> list[int]:
        """Keys of every full block in ``data`` (token bytes), chained from ``parent``.

        ``extras`` maps block index (counted from ``first_block``) to extra bytes.
        """
        bb = self.block_bytes
        end = len(data) - len(data) % bb
        out: list[int] = []
        append = out.append
        h = parent
        if not extras:
            for offset in range(0, end, bb):
                h = xxh3_64_intdigest(data[offset : offset + bb], h) & KEY_MASK
                append(h)
            return out
        block = first_block
        for offset in range(0, end, bb):
            extra = extras.get(block)
            chunk = data[offset : offset + bb]
            h = xxh3_64_intdigest(chunk + _EXTRA_SEP + extra if extra else chunk, h) & KEY_MASK
            append(h)
            block += 1
        return out

    def request_keys(
        self,
        token_ids: Sequence[int],
        namespace: str,
        *,
        cache_salt: str | None = None,
        mm_items: Iterable[MultiModalItem] = (),
        embed_digests: Sequence[bytes] | None = None,
    ) -> list[int]:
        """Keys of every full block of a prompt, from block 0 of ``namespace``."""
        data = token_bytes(token_ids)
        num_blocks = len(token_ids) // self.block_size
        extras = None
        if cache_salt or mm_items or embed_digests:
            extras = block_extras(
                num_blocks,
                self.block_size,
                cache_salt=cache_salt,
                mm_items=mm_items,
                embed_digests=embed_digests,
            )
        return self.chain(self.root(namespace), data, extras)
