"""A discrete, deterministic model of one vLLM v1 engine (scheduler + GPU block pool).

It reproduces what routing depends on: which blocks a pod holds (prefix caching with
vLLM's allocation, caching, freeing and eviction order), the KV events it publishes for
them (same shapes and order as vLLM's ``BlockPool``), how fast it admits and serves work
(continuous batching with a token budget and chunked prefill, recompute preemption), and
how long each step takes (:class:`~kvaware_scorer.sim.steptime.StepTimeModel`). It does not
run a model: generated tokens are pseudo-random ids derived from the request id.

The vLLM behaviour each rule follows is written next to it and in
``docs/simulator-engine.md``. In short, per :meth:`SimEngine.step`:

1. Running requests, in admission order, each get ``min(remaining, budget)`` tokens (1 for
   a decoding sequence). When blocks for them cannot be allocated, the most recently
   admitted running request is preempted (recompute) until they can, or the request
   itself was the one preempted (``Scheduler.schedule``, FCFS policy).
2. If nobody was preempted, waiting requests are admitted in FCFS order while
   ``len(running) < max_num_seqs`` and budget is left: longest cached prefix of full
   blocks (at most ``(num_tokens - 1) // block_size`` blocks, so the last token is always
   recomputed), then blocks for the chunk; the head of the queue blocks the rest when it
   does not fit (``get_computed_blocks`` + ``allocate_slots``).
3. Allocation touches the hit blocks (out of the free queue), takes new blocks from the
   free queue's front and evicts their cached hashes (one ``BlockRemoved`` each), then
   caches every block that is full up to ``num_computed + num_new`` tokens (one
   ``BlockStored`` per request per step). Blocks are cached at scheduling time, as vLLM
   does, so a request admitted later in the same step hits them.
4. The step runs: a request whose computed tokens reach its length samples a token;
   finished requests free their blocks in reverse order (tail first into the free queue,
   nothing emitted). The step's events go out as one :class:`EventBatch`.

Per-step Python work is proportional to the scheduled requests plus the blocks they
allocate, hit, cache or free; nothing scans the whole pool, except
:meth:`SimEngine.reset_prefix_cache` (only cached blocks) and the inspection helpers.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import takewhile
from operator import is_not
from typing import Any, Final, cast

import xxhash

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
)
from kvaware_scorer.sim.steptime import QWEN3_32B_2XH100_STEP, StepTimeModel
from kvaware_scorer.vllm_hash import (
    TAG_CACHE_SALT,
    TAG_LORA,
    VllmHashSettings,
    digest_function,
    event_hash_int,
    none_hash,
    serialize_block_input,
)

__all__ = [
    "HASH_ALGOS",
    "EngineConfig",
    "SimEngine",
    "SimRequest",
    "StepResult",
    "generated_tokens",
]

HASH_ALGOS: Final[tuple[str, ...]] = ("fast", "sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
"""Accepted ``EngineConfig.hash_algo`` values: ``fast`` plus vLLM's own algorithms."""

MEDIUM: Final = "GPU"
_NO_HASH: Final = -1  # engine hashes are unsigned, so -1 marks an uncached block
_DUE: Final = -2  # _Req.event_tick of a decoder whose work this tick is done
_is_block: Final = partial(is_not, None)  # C-level "value is not None" for takewhile

EventSink = Callable[[EventBatch], None]


# --------------------------------------------------------------------------------------
# Configuration and public records
# --------------------------------------------------------------------------------------


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}: must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    """One simulated vLLM engine; validated on construction (:class:`ConfigError`).

    ``num_gpu_blocks`` is vLLM's figure (the "GPU KV cache size" divided by
    ``block_size``); block 0 is vLLM's reserved null block, so ``num_gpu_blocks - 1`` are
    usable. ``max_num_seqs`` and ``max_num_batched_tokens`` are vLLM's scheduler limits
    (the latter is the per-step token budget, chunked prefill on; it must be at least
    ``max_num_seqs``, as vLLM requires). ``hash_algo`` is ``"fast"`` (chained xxh3-64
    over the token bytes, opaque 64-bit ids) or one of vLLM's
    ``--prefix-caching-hash-algo`` values, which makes the engine hashes exactly vLLM's
    with ``pythonhashseed`` as ``PYTHONHASHSEED`` (about 1.5x the engine time).
    ``max_model_len`` bounds ``len(prompt) + max_tokens`` (``None``: what the usable
    blocks hold).
    """

    num_gpu_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    step_time: StepTimeModel = QWEN3_32B_2XH100_STEP
    model: str = "sim-model"
    hash_algo: str = "fast"
    pythonhashseed: str | None = "0"
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        """Check every field; the error names the field and what it must be."""
        _positive_int("num_gpu_blocks", self.num_gpu_blocks, 2)
        _positive_int("block_size", self.block_size)
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        if self.max_num_batched_tokens < self.max_num_seqs:
            # vLLM's SchedulerConfig refuses this too; it guarantees every running
            # sequence its decode token in every step.
            raise ConfigError(
                f"max_num_batched_tokens: ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs}), as vLLM requires"
            )
        if not isinstance(self.step_time, StepTimeModel):
            raise ConfigError(f"step_time: must be a StepTimeModel, got {self.step_time!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model: must be a non-empty string, got {self.model!r}")
        if self.pythonhashseed is not None and not isinstance(self.pythonhashseed, str):
            raise ConfigError(
                f"pythonhashseed: must be a string or None, got {self.pythonhashseed!r}"
            )
        if self.hash_algo not in HASH_ALGOS:
            raise ConfigError(
                f"hash_algo: unknown algorithm {self.hash_algo!r}; "
                f"allowed values: {', '.join(HASH_ALGOS)}"
            )
        if self.hash_algo != "fast":
            # Refuses what vLLM cannot reproduce (xxhash with PYTHONHASHSEED unset).
            VllmHashSettings(self.hash_algo, self.pythonhashseed, self.block_size)
        if self.max_model_len is not None:
            _positive_int("max_model_len", self.max_model_len)
            if self.max_model_len > self.usable_blocks * self.block_size:
                raise ConfigError(
                    f"max_model_len: {self.max_model_len} tokens do not fit in "
                    f"{self.usable_blocks} usable blocks of {self.block_size} tokens "
                    f"({self.usable_blocks * self.block_size} tokens); lower it or raise "
                    "num_gpu_blocks"
                )

    @property
    def usable_blocks(self) -> int:
        """Blocks requests can use: all but vLLM's null block."""
        return self.num_gpu_blocks - 1

    @property
    def kv_capacity_tokens(self) -> int:
        """vLLM's "GPU KV cache size" in tokens: ``num_gpu_blocks * block_size``."""
        return self.num_gpu_blocks * self.block_size

    @property
    def effective_max_model_len(self) -> int:
        """``max_model_len``, or what the usable blocks hold when it is unset."""
        if self.max_model_len is not None:
            return self.max_model_len
        return self.usable_blocks * self.block_size


@dataclass(eq=False)
class SimRequest:
    """A completion request with ``ignore_eos``: exactly ``max_tokens`` tokens are generated.

    The engine fills the fields after ``lora_path``. ``cached_tokens`` is the prefix-cache
    hit (whole blocks) at the first admission, as vLLM reports in
    ``usage.prompt_tokens_details.cached_tokens``; times are step boundaries in simulated
    seconds; ``output_token_ids`` is set when the request finishes (pseudo-random ids
    derived from ``request_id``, so a follow-up turn can send prompt + output).
    ``lora_path`` only matters to the vLLM-exact hash algorithms (vLLM >= 0.31 hashes the
    adapter path; default: the adapter name). Requests compare by identity.
    """

    request_id: str
    token_ids: list[int]
    max_tokens: int
    arrival_s: float
    lora_name: str | None = None
    cache_salt: str | None = None
    lora_path: str | None = None
    # filled by the engine:
    cached_tokens: int = 0
    scheduled_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    output_tokens: int = 0
    preemptions: int = 0
    output_token_ids: list[int] = field(default_factory=list)


@dataclass
class StepResult:
    """What one scheduler step did; ``duration_s`` comes from the step-time model."""

    start_s: float
    duration_s: float
    prefill_tokens: int
    decode_seqs: int
    first_tokens: list[SimRequest]
    finished: list[SimRequest]
    decode_context_tokens: int = 0
    scheduled_seqs: int = 0
    preempted: list[SimRequest] = field(default_factory=list)
    num_events: int = 0

    @property
    def end_s(self) -> float:
        """When the step ends (its event batch carries this timestamp)."""
        return self.start_s + self.duration_s


# --------------------------------------------------------------------------------------
# Requests and block hashing
# --------------------------------------------------------------------------------------


def generated_tokens(request_id: str, count: int) -> list[int]:
    """The ``count`` output token ids the engine generates for ``request_id``.

    Pseudo-random ids in ``[0, 65536)`` from SHAKE-128 of the request id: the same on
    every platform and run, and known in advance (a multi-turn workload can build the next
    turn's prompt from them).
    """
    digest = hashlib.shake_128(b"kvaware-sim-out\0" + request_id.encode()).digest(2 * count)
    data = array("H", digest)
    if sys.byteorder == "big":
        data.byteswap()
    return data.tolist()


class _Req:
    """Engine-side state of one request (vLLM's ``Request`` plus its block table).

    ``tokens`` holds the prompt and the generated tokens materialised so far; while the
    request decodes, its true length at tick ``T`` is ``base_n + T - base_tick`` and
    ``tokens`` catches up only when the request has work (a block boundary, preemption or
    the end), so a decode step costs nothing per sequence otherwise.
    """

    __slots__ = (
        "base_n",
        "base_tick",
        "blocks",
        "chain",
        "decoding",
        "event_tick",
        "extra_first",
        "extra_rest",
        "final_n",
        "hashes",
        "num_cached_blocks",
        "num_computed",
        "num_prompt",
        "out",
        "req",
        "seen",
        "seq",
        "tokens",
    )

    def __init__(self, req: SimRequest) -> None:
        self.req = req
        self.tokens: list[int] = list(req.token_ids)
        self.num_prompt = len(self.tokens)
        self.out: list[int] = []  # every output token, generated up front
        # n (tokens incl. the last sampled one) of the step that samples the last token
        self.final_n = self.num_prompt + req.max_tokens - 1
        self.hashes: list[int] = []  # engine hash of every full block of ``tokens``
        self.chain: int | bytes = 0  # hash-chain state after the last hashed block
        self.blocks: list[int] = []  # block table (physical block ids)
        self.num_computed = 0
        self.num_cached_blocks = 0  # leading blocks of the table already cached
        self.decoding = False
        self.event_tick = -1  # tick of this decoder's live bucket entry, -1 if none
        self.base_tick = 0
        self.base_n = 0
        self.seq = 0  # admission order (running order)
        self.seen = False  # admitted at least once (cached_tokens recorded)
        lora = req.lora_name or None
        salt = req.cache_salt or None
        self.extra_rest: list[Any] | None = [lora] if lora else None
        first = [k for k in (lora, salt) if k]
        self.extra_first: list[Any] | None = first or None


def _seq_of(st: _Req) -> int:
    return st.seq


class _FastHasher:
    """Chained xxh3-64 over little-endian uint32 token bytes, seeded with the parent hash.

    The root mixes the seed, the LoRA name and the cache salt, so different adapters and
    salts never share a block (vLLM puts the LoRA on every block's extra keys and the salt
    on block 0; either way every later hash differs through the chain).
    """

    def __init__(self, seed: str, block_size: int) -> None:
        self._seed = seed
        self._step = 4 * block_size
        self._block_size = block_size

    def root(self, lora: str | None, salt: str | None, lora_path: str | None) -> int:
        del lora_path  # the fast hash keys the adapter by name
        text = "kvaware-sim\0{}\0{}\0{}".format(
            self._seed, "L" + lora if lora else "-", "S" + salt if salt else "-"
        )
        return xxhash.xxh3_64_intdigest(text.encode())

    def extend(self, st: _Req, start: int, end: int) -> None:
        """Hash blocks ``[start, end)`` of ``st.tokens`` (``start`` = ``len(st.hashes)``)."""
        size = self._block_size
        try:
            data = array("I", st.tokens[start * size : end * size])
        except OverflowError:
            raise ValueError(
                f"request {st.req.request_id!r}: token ids must be in [0, 2**32)"
            ) from None
        if sys.byteorder == "big":
            data.byteswap()
        raw = data.tobytes()
        h = st.chain
        assert isinstance(h, int)
        out = st.hashes
        step = self._step
        digest = xxhash.xxh3_64_intdigest
        for off in range(0, len(raw), step):
            h = digest(raw[off : off + step], h)
            out.append(h)
        st.chain = h


class _VllmHasher:
    """vLLM 0.33.0's block hashes (``kvaware_scorer.vllm_hash``), computed incrementally."""

    def __init__(self, settings: VllmHashSettings) -> None:
        self._algo = settings.hash_algo
        self._root = none_hash(settings)
        self._block_size = settings.block_size
        self._digest: Callable[[bytes], bytes] = digest_function(settings.hash_algo)

    def root(self, lora: str | None, salt: str | None, lora_path: str | None) -> bytes:
        return self._root

    def extend(self, st: _Req, start: int, end: int) -> None:
        """Hash blocks ``[start, end)`` as vLLM does: LoRA on every block, salt on block 0."""
        size = self._block_size
        req = st.req
        lora_key: tuple[str, ...] | None = None
        if req.lora_name:
            lora_key = (TAG_LORA, req.lora_name, req.lora_path or req.lora_name)
        salt_key: tuple[str, ...] | None = None
        if req.cache_salt:
            salt_key = (TAG_CACHE_SALT, req.cache_salt)
        parent = st.chain
        assert isinstance(parent, bytes)
        tokens = st.tokens
        for index in range(start, end):
            keys: list[tuple[str, ...]] = []
            if lora_key is not None:
                keys.append(lora_key)
            if index == 0 and salt_key is not None:
                keys.append(salt_key)
            block = tokens[index * size : (index + 1) * size]
            parent = self._digest(
                serialize_block_input(self._algo, parent, block, tuple(keys) if keys else None)
            )
            st.hashes.append(event_hash_int(parent))
        st.chain = parent


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------


class SimEngine:
    """One simulated vLLM v1 engine; see the module docstring for the rules."""

    def __init__(
        self, name: str, config: EngineConfig, *, event_sink: EventSink | None = None
    ) -> None:
        if not isinstance(config, EngineConfig):
            raise ConfigError(f"config: must be an EngineConfig, got {config!r}")
        self.name = name
        self.config = config
        self.event_sink = event_sink
        self._B = config.block_size
        self._budget = config.max_num_batched_tokens
        self._max_seqs = config.max_num_seqs
        self._max_len = config.effective_max_model_len
        self._usable = config.usable_blocks
        self._step_time = config.step_time.step_time
        self._hasher: _FastHasher | _VllmHasher
        if config.hash_algo == "fast":
            seed = config.pythonhashseed if config.pythonhashseed is not None else ""
            self._hasher = _FastHasher(seed, config.block_size)
        else:
            self._hasher = _VllmHasher(
                VllmHashSettings(config.hash_algo, config.pythonhashseed, config.block_size)
            )
        # Block pool (vLLM BlockPool). Block 0 is the null block and never handed out.
        n = config.num_gpu_blocks
        self._hash: list[int] = [_NO_HASH] * n  # cached hash per block
        self._ref: list[int] = [0] * n
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, n))
        # vLLM's BlockHashToBlockMap, split for speed: hash -> the block a lookup returns
        # (the oldest copy), and hash -> the younger copies in insertion order.
        self._cached: dict[int, int] = {}
        self._dups: dict[int, dict[int, None]] = {}
        self._events: list[KVEvent] = []
        # Scheduler.
        self._waiting: deque[_Req] = deque()
        self._running: dict[_Req, None] = {}  # admission order
        self._prefilling: list[_Req] = []  # running requests not decoding yet
        self._buckets: dict[int, list[_Req]] = {}  # tick -> decoders with work then
        self._tick = 0  # steps run so far
        self._n_dec = 0  # decoding requests
        self._ctx_sum = 0  # their context tokens this tick
        self._next_seq = 0
        self._live: set[str] = set()
        self._now = 0.0
        # Counters.
        self._steps = 0
        self._busy_s = 0.0
        self._added = 0
        self._finished = 0
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._queries = 0
        self._hits = 0
        self._prefill_tokens = 0
        self._decode_tokens = 0
        self._preemptions = 0
        self._evictions = 0
        self._blocks_stored = 0
        self._duplicate_stores = 0
        self._cached_blocks = 0
        self._batches = 0
        self._num_events = 0
        self._resets = 0

    # ------------------------------------------------------------------ requests

    def add_request(self, request: SimRequest) -> None:
        """Queue a request (FCFS). Raises ``ValueError`` for a request vLLM would refuse."""
        rid = request.request_id
        if rid in self._live:
            raise ValueError(f"request {rid!r} is already in engine {self.name!r}")
        if not request.token_ids:
            raise ValueError(f"request {rid!r}: the prompt is empty")
        if isinstance(request.max_tokens, bool) or not isinstance(request.max_tokens, int):
            raise ValueError(f"request {rid!r}: max_tokens must be an int")
        if request.max_tokens < 1:
            raise ValueError(f"request {rid!r}: max_tokens must be >= 1, got {request.max_tokens}")
        total = len(request.token_ids) + request.max_tokens
        if total > self._max_len:
            raise ValueError(
                f"request {rid!r}: prompt ({len(request.token_ids)}) + max_tokens "
                f"({request.max_tokens}) = {total} tokens exceeds max_model_len {self._max_len}"
            )
        st = _Req(request)
        st.chain = self._hasher.root(request.lora_name, request.cache_salt, request.lora_path)
        self._hasher.extend(st, 0, st.num_prompt // self._B)
        st.out = generated_tokens(rid, request.max_tokens)
        self._live.add(rid)
        self._waiting.append(st)
        self._added += 1

    def has_work(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        """Requests in the waiting queue (``vllm:num_requests_waiting``)."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Requests in the running set (``vllm:num_requests_running``)."""
        return len(self._running)

    @property
    def kv_usage(self) -> float:
        """Used blocks / usable blocks in [0, 1] (``vllm:kv_cache_usage_perc``)."""
        return (self._usable - len(self._free)) / self._usable

    @property
    def now_s(self) -> float:
        """End of the last step (simulated seconds)."""
        return self._now

    # ------------------------------------------------------------------ block pool

    def _find_hits(self, st: _Req) -> list[int]:
        """vLLM ``find_longest_cache_hit``: cached prefix of at most ``(n - 1) // B`` blocks."""
        limit = (len(st.tokens) - 1) // self._B
        found: list[int] = list(
            takewhile(_is_block, map(self._cached.get, st.hashes[:limit]))  # type: ignore[arg-type]
        )
        return found

    def _allocate(self, st: _Req, num_new: int, hits: Sequence[int]) -> bool:
        """vLLM ``allocate_slots``: touch hits, allocate, cache; False if blocks are short.

        New blocks come from the free queue's front (``get_new_blocks``); a block that
        still holds a cached hash is evicted first, one ``BlockRemoved`` per block, in
        that order (``_maybe_evict_cached_block``).
        """
        size = self._B
        blocks = st.blocks
        ref = self._ref
        free = self._free
        nh = len(hits)
        need = st.num_computed + nh * size + num_new
        num_new_blocks = -(-need // size) - nh - len(blocks)
        evictable = 0
        if nh:
            for b in hits:
                if not ref[b]:
                    evictable += 1
        if num_new_blocks + evictable > len(free):
            return False
        if nh:
            for b in hits:
                if not ref[b]:
                    del free[b]
                ref[b] += 1
            blocks.extend(hits)
            st.num_cached_blocks = nh
        if num_new_blocks > 0:
            hashes = self._hash
            cached = self._cached
            dups = self._dups
            popitem = free.popitem
            append = self._events.append
            evicted = 0
            for _ in range(num_new_blocks):
                b = popitem(last=False)[0]
                h = hashes[b]
                if h != _NO_HASH:
                    if dups and h in dups:
                        self._drop_copy(h, b)
                    else:
                        del cached[h]
                    hashes[b] = _NO_HASH
                    append(BlockRemoved([h], MEDIUM, 0))
                    evicted += 1
                ref[b] = 1
                blocks.append(b)
            if evicted:
                self._evictions += evicted
                self._cached_blocks -= evicted
        ntok = len(st.tokens)
        self._cache_blocks(st, need if need < ntok else ntok)
        return True

    def _drop_copy(self, h: int, b: int) -> None:
        """Remove block ``b`` from hash ``h``'s copies (vLLM ``BlockHashToBlockMap.pop``)."""
        extra = self._dups[h]
        if self._cached[h] == b:
            nxt = next(iter(extra))
            del extra[nxt]
            self._cached[h] = nxt
        else:
            del extra[b]
        if not extra:
            del self._dups[h]

    def _cache_blocks(self, st: _Req, num_tokens: int) -> None:
        """vLLM ``cache_full_blocks``: hash the newly full blocks, one ``BlockStored``."""
        size = self._B
        full = num_tokens // size
        start = st.num_cached_blocks
        if full <= start:
            return
        new_hashes = st.hashes[start:full]
        hashes = self._hash
        cached = self._cached
        setdefault = cached.setdefault
        for b, h in zip(st.blocks[start:full], new_hashes, strict=True):
            hashes[b] = h
            if setdefault(h, b) != b:
                self._duplicate_stores += 1
                self._dups.setdefault(h, {})[b] = None
        n = full - start
        self._blocks_stored += n
        self._cached_blocks += n
        rest = st.extra_rest
        if rest is None and st.extra_first is None:
            extra: list[list[Any] | None] = [None] * n
        else:
            extra = [rest] * n
            if start == 0:
                extra[0] = st.extra_first
        self._events.append(
            BlockStored(
                cast("list[BlockHash]", new_hashes),
                st.hashes[start - 1] if start else None,
                st.tokens[start * size : full * size],
                size,
                None,
                MEDIUM,
                st.req.lora_name or None,
                extra,
                0,
            )
        )
        st.num_cached_blocks = full

    def _free_blocks(self, st: _Req) -> None:
        """vLLM ``free``: tail blocks first into the free queue; they stay cached."""
        ref = self._ref
        free = self._free
        for b in reversed(st.blocks):
            ref[b] -= 1
            if not ref[b]:
                free[b] = None
        st.blocks = []
        st.num_cached_blocks = 0

    # ------------------------------------------------------------------ decoders

    def _materialize(self, st: _Req, n: int) -> None:
        """Bring ``st.tokens`` (and the hashes of its full blocks) up to ``n`` tokens."""
        have = len(st.tokens)
        if have < n:
            p = st.num_prompt
            st.tokens.extend(st.out[have - p : n - p])
        full = n // self._B
        if len(st.hashes) < full:
            self._hasher.extend(st, len(st.hashes), full)

    def _schedule(self, st: _Req, tick: int, n: int) -> None:
        """Bucket a decoder at its next tick >= ``tick`` with work: a block fills (n % B
        == 0: cache it), a new block is needed (n % B == 1) or the last token is sampled."""
        size = self._B
        at = tick + min(-n % size, (1 - n) % size, st.final_n - n)
        st.event_tick = at
        bucket = self._buckets.get(at)
        if bucket is None:
            self._buckets[at] = [st]
        else:
            bucket.append(st)

    def _stop_decoding(self, st: _Req, n: int) -> None:
        st.decoding = False
        st.event_tick = -1
        self._n_dec -= 1
        self._ctx_sum -= n

    def _preempt(self, st: _Req, preempted: list[SimRequest]) -> None:
        """Recompute preemption: free the blocks, back to the front of the waiting queue."""
        if st.decoding:
            n = st.base_n + self._tick - st.base_tick
            self._materialize(st, n)
            st.req.output_tokens = n - st.num_prompt
            self._stop_decoding(st, n)
        else:
            self._prefilling.remove(st)
        self._free_blocks(st)
        st.num_computed = 0
        st.req.preemptions += 1
        self._preemptions += 1
        self._waiting.appendleft(st)
        preempted.append(st.req)

    def _allocate_running(self, st: _Req, num_new: int, preempted: list[SimRequest]) -> bool:
        """Allocate for a running request, preempting the newest until it fits (vLLM's
        ``self.running.pop()`` loop); False when ``st`` itself had to go."""
        running = self._running
        while not self._allocate(st, num_new, ()):
            victim = next(reversed(running))
            del running[victim]
            self._preempt(victim, preempted)
            if victim is st:
                return False
        return True

    def _finish(self, st: _Req, end: float, finished: list[SimRequest]) -> None:
        req = st.req
        req.output_tokens = req.max_tokens
        req.finished_s = end
        req.output_token_ids = st.out
        finished.append(req)
        self._free_blocks(st)
        del self._running[st]
        self._live.discard(req.request_id)
        self._finished += 1

    # ------------------------------------------------------------------ the step

    def step(self, now_s: float) -> StepResult:
        """Run one scheduler step starting at ``now_s``; publish its events, if any."""
        size = self._B
        tick = self._tick
        budget = self._budget
        running = self._running
        preempted: list[SimRequest] = []
        chunks: list[tuple[_Req, int]] = []  # prefill chunks scheduled, in order
        due_done: list[_Req] = []  # decoders that had work this tick
        stopped = False

        # 1. Running requests in admission order (vLLM Scheduler.schedule, FCFS). All
        # decoders come before the (at most one) request still prefilling, and the budget
        # (>= max_num_seqs) always covers them, so they all run; only those at a block
        # boundary or at their last token need work now.
        due = self._buckets.pop(tick, None)
        if due:
            if len(due) > 1:
                due.sort(key=_seq_of)
            for st in due:
                if st.event_tick != tick:
                    continue  # stale (preempted since) or a duplicate entry
                st.event_tick = _DUE
                n = st.base_n + tick - st.base_tick
                self._materialize(st, n)
                st.num_computed = n - 1
                if (n > len(st.blocks) * size or n // size > st.num_cached_blocks) and (
                    not self._allocate_running(st, 1, preempted)
                ):
                    stopped = True
                    break
                due_done.append(st)
        budget -= self._n_dec
        if not stopped:
            for st in list(self._prefilling):
                if budget <= 0:
                    break
                if st.decoding or st not in running:
                    continue
                num_new = min(len(st.tokens) - st.num_computed, budget)
                if not self._allocate_running(st, num_new, preempted):
                    break
                chunks.append((st, num_new))
                budget -= num_new

        # 2. Waiting requests, FCFS, only when nothing was preempted in this step.
        if not preempted:
            waiting = self._waiting
            max_seqs = self._max_seqs
            while waiting and budget > 0 and len(running) < max_seqs:
                st = waiting[0]
                hits = self._find_hits(st)
                hit_tokens = len(hits) * size
                num_new = min(len(st.tokens) - hit_tokens, budget)
                if not self._allocate(st, num_new, hits):
                    break
                waiting.popleft()
                running[st] = None
                self._prefilling.append(st)
                st.seq = self._next_seq
                self._next_seq += 1
                st.num_computed = hit_tokens
                self._queries += len(st.tokens)
                self._hits += hit_tokens
                if not st.seen:
                    st.seen = True
                    st.req.cached_tokens = hit_tokens
                    st.req.scheduled_s = now_s
                    self._prompt_tokens += st.num_prompt
                    self._cached_tokens += hit_tokens
                chunks.append((st, num_new))
                budget -= num_new

        # 3. Execute the step.
        decode_seqs = self._n_dec
        context = self._ctx_sum
        prefill_tokens = 0
        for _, num_new in chunks:
            prefill_tokens += num_new
        work = decode_seqs > 0 or bool(chunks)
        duration = self._step_time(prefill_tokens, decode_seqs, context) if work else 0.0
        end = now_s + duration
        first_tokens: list[SimRequest] = []
        finished: list[SimRequest] = []
        # Every decoder sampled one token.
        self._ctx_sum += decode_seqs
        self._tick = nxt = tick + 1
        for st in due_done:
            if st.event_tick != _DUE:
                continue  # preempted later in this step
            n = st.base_n + tick - st.base_tick
            if n == st.final_n:
                self._materialize(st, n + 1)
                self._stop_decoding(st, n + 1)
                self._finish(st, end, finished)
            else:
                self._schedule(st, nxt, n + 1)
        # Prefill chunks that reached the end sample their first (or next) token.
        for st, num_new in chunks:
            st.num_computed += num_new
            tokens = st.tokens
            n = len(tokens)
            if st.num_computed < n:
                continue
            req = st.req
            k = n - st.num_prompt  # outputs so far
            tokens.append(st.out[k])
            req.output_tokens = k + 1
            if req.first_token_s is None:
                req.first_token_s = end
                first_tokens.append(req)
            self._prefilling.remove(st)
            if k + 1 >= req.max_tokens:
                self._finish(st, end, finished)
                continue
            st.decoding = True
            st.base_tick = nxt
            st.base_n = n + 1
            self._n_dec += 1
            self._ctx_sum += n + 1
            self._schedule(st, nxt, n + 1)

        self._steps += 1
        self._busy_s += duration
        self._prefill_tokens += prefill_tokens
        self._decode_tokens += decode_seqs
        self._now = end
        num_events = len(self._events)
        if num_events:
            self._publish(end)
        return StepResult(
            now_s,
            duration,
            prefill_tokens,
            decode_seqs,
            first_tokens,
            finished,
            context,
            decode_seqs + len(chunks),
            preempted,
            num_events,
        )

    def _publish(self, ts: float) -> None:
        events = self._events
        self._events = []
        self._batches += 1
        self._num_events += len(events)
        if self.event_sink is not None:
            self.event_sink(EventBatch(ts, events, 0))

    # ------------------------------------------------------------------ cache control

    def reset_prefix_cache(self, now_s: float | None = None) -> bool:
        """vLLM ``reset_prefix_cache``: only when no block is in use; emits AllBlocksCleared.

        The event is published at once as its own batch (timestamp ``now_s``, default the
        end of the last step), so an idle engine's reset reaches the index.
        """
        if len(self._free) != self._usable:
            return False
        hashes = self._hash
        for b in self._cached.values():
            hashes[b] = _NO_HASH
        for extra in self._dups.values():
            for b in extra:
                hashes[b] = _NO_HASH
        self._cached = {}
        self._dups = {}
        self._cached_blocks = 0
        self._resets += 1
        self._events.append(AllBlocksCleared())
        self._publish(self._now if now_s is None else now_s)
        return True

    # ------------------------------------------------------------------ inspection

    def block_hashes(
        self,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        lora_path: str | None = None,
    ) -> list[int]:
        """This engine's hashes of every full block of ``token_ids`` (as events carry them)."""
        st = _Req(SimRequest("", list(token_ids), 1, 0.0, lora_name, cache_salt, lora_path))
        st.chain = self._hasher.root(lora_name, cache_salt, lora_path)
        self._hasher.extend(st, 0, len(st.tokens) // self._B)
        return st.hashes

    def cached_prefix_blocks(
        self,
        token_ids: Sequence[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        lora_path: str | None = None,
    ) -> int:
        """Longest prefix of full blocks of ``token_ids`` cached now (no last-token cap)."""
        cached = self._cached
        count = 0
        for h in self.block_hashes(
            token_ids, lora_name=lora_name, cache_salt=cache_salt, lora_path=lora_path
        ):
            if h not in cached:
                break
            count += 1
        return count

    def cached_block_hashes(self) -> set[int]:
        """Engine hashes cached now (a hash held by several blocks appears once)."""
        return set(self._cached)

    def cached_hash_counts(self) -> dict[int, int]:
        """Engine hash -> number of physical blocks holding it."""
        dups = self._dups
        return {h: 1 + len(dups.get(h, ())) for h in self._cached}

    def stats(self) -> dict[str, Any]:
        """Counters since start (token counts are tokens; blocks are blocks)."""
        return {
            "steps": self._steps,
            "busy_s": self._busy_s,
            "requests_added": self._added,
            "requests_finished": self._finished,
            "prompt_tokens": self._prompt_tokens,
            "cached_tokens": self._cached_tokens,
            "hit_rate": self._cached_tokens / self._prompt_tokens if self._prompt_tokens else 0.0,
            "prefix_cache_queries": self._queries,
            "prefix_cache_hits": self._hits,
            "prefill_tokens": self._prefill_tokens,
            "decode_tokens": self._decode_tokens,
            "preemptions": self._preemptions,
            "evictions": self._evictions,
            "blocks_stored": self._blocks_stored,
            "duplicate_stores": self._duplicate_stores,
            "cached_blocks": self._cached_blocks,
            "cached_hashes": len(self._cached),
            "event_batches": self._batches,
            "events": self._num_events,
            "resets": self._resets,
            "num_running": len(self._running),
            "num_waiting": len(self._waiting),
            "kv_usage": self.kv_usage,
        }
