"""Shared helpers for the benchmark scripts (not a benchmark itself).

The scripts import it as ``_common``: run them as files (``python benchmarks/NAME.py``),
which puts this directory on ``sys.path``.

Workload model (used by every benchmark that builds or streams events):

* Token ids are drawn uniformly from ``[0, 65536)`` (a 64k vocabulary), 16 per block.
* Engine block hashes are a content-addressed stand-in for vLLM's chained hash: a full-range
  uint64, ``xxh3_64(b"E" + block_token_bytes, seed=parent_hash)``, so the same prefix has the
  same engine hash on every pod (as with vLLM's fixed hash seed) and a different prefix never
  shares one.
* A ``BlockStored`` carries at most 64 blocks (a 1024-token prefill step) and names the last
  block of the previous event of the same request as its parent, as vLLM does.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from xxhash import xxh3_64_intdigest

from kvaware_scorer.events import BlockRemoved, BlockStored, EventBatch, KVEvent
from kvaware_scorer.index import PrefixIndex

BLOCK_SIZE = 16
BLOCKS_PER_EVENT = 64
MODEL = "bench-model"
ENGINE_ROOT = 0x5BD1E9955BD1E995  # parent of block 0 for the stand-in engine hash
_T0 = time.monotonic()
_LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# ---------------------------------------------------------------------------- reporting


def log(message: str) -> None:
    """Progress line on stderr (stdout carries only the JSON report)."""
    sys.stderr.write(f"[{time.monotonic() - _T0:7.1f}s] {message}\n")
    sys.stderr.flush()


def latency_stats(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50/p90/p99/p99.9/mean/min/max in microseconds (nearest-rank percentiles)."""
    ordered = sorted(samples_ns)
    n = len(ordered)
    if not n:
        return {"n": 0}

    def pct(q: float) -> float:
        rank = max(1, math.ceil(q * n - 1e-9))
        return round(ordered[min(n, rank) - 1] / 1000, 2)

    return {
        "n": n,
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "p999_us": pct(0.999),
        "mean_us": round(sum(ordered) / n / 1000, 2),
        "min_us": round(ordered[0] / 1000, 2),
        "max_us": round(ordered[-1] / 1000, 2),
    }


def time_loop(func: Callable[[], Any], iterations: int, warmup: int) -> list[int]:
    """Per-call wall time in ns of ``func`` over ``iterations`` calls after ``warmup``."""
    for _ in range(warmup):
        func()
    clock = time.perf_counter_ns
    samples = []
    append = samples.append
    for _ in range(iterations):
        start = clock()
        func()
        append(clock() - start)
    return samples


def rss_bytes() -> int:
    """Current resident set size of this process (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def pin_process(cpus: set[int]) -> bool:
    """Pin every existing thread of this process to ``cpus`` (threads made later inherit).

    ``os.sched_setaffinity(0, ...)`` moves only the calling thread on Linux, so each task
    in ``/proc/self/task`` is moved. Returns False where affinity is not supported.
    """
    if not hasattr(os, "sched_setaffinity"):
        return False
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        with contextlib.suppress(OSError):  # the thread exited meanwhile
            os.sched_setaffinity(tid, cpus)
    return True


def _git_state() -> dict[str, Any]:
    """Commit of the checkout and whether the package has uncommitted changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "kvaware_scorer"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_head": None}
    return {"git_head": head, "package_uncommitted_changes": bool(dirty)}


def environment() -> dict[str, Any]:
    import msgspec
    import xxhash
    import zmq

    return {
        "python": sys.version.split()[0],
        "msgspec": msgspec.__version__,
        "xxhash": xxhash.VERSION,
        "pyzmq": zmq.__version__,
        "cpus": os.cpu_count(),
        "switch_interval_s": sys.getswitchinterval(),
        # Other work on the machine skews latency figures; this shows whether there was any.
        "loadavg_1m_at_start": None if _LOAD_AT_START is None else round(_LOAD_AT_START, 2),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        **_git_state(),
    }


# ---------------------------------------------------------------------------- workload


def random_tokens(rng: random.Random, n: int) -> list[int]:
    """``n`` token ids in [0, 65536), deterministic for a seeded ``rng``."""
    return array("H", rng.randbytes(2 * n)).tolist()


def engine_hashes(parent: int | None, token_ids: Sequence[int]) -> list[int]:
    """Stand-in vLLM block hashes (uint64, chained from ``parent``) of every full block."""
    data = array("I", token_ids).tobytes()
    step = BLOCK_SIZE * 4
    h = ENGINE_ROOT if parent is None else parent
    out = []
    for offset in range(0, len(data) - len(data) % step, step):
        h = xxh3_64_intdigest(b"E" + data[offset : offset + step], h)
        out.append(h)
    return out


class Chain:
    """A token sequence cut into blocks, continuing the engine block ``parent`` (None: root)."""

    __slots__ = ("hashes", "parent", "tokens")

    def __init__(self, tokens: list[int], parent: int | None = None) -> None:
        self.tokens = tokens
        self.parent = parent
        self.hashes = engine_hashes(parent, tokens)

    @classmethod
    def random(cls, rng: random.Random, blocks: int, parent: int | None = None) -> Chain:
        return cls(random_tokens(rng, blocks * BLOCK_SIZE), parent)

    def __len__(self) -> int:
        return len(self.hashes)

    def stored(self, lo: int = 0, hi: int | None = None) -> Iterator[BlockStored]:
        """``BlockStored`` events for blocks ``[lo, hi)``, at most 64 blocks each, chained."""
        hi = len(self.hashes) if hi is None else hi
        for start in range(lo, hi, BLOCKS_PER_EVENT):
            end = min(hi, start + BLOCKS_PER_EVENT)
            yield BlockStored(
                block_hashes=self.hashes[start:end],
                parent_block_hash=self.hashes[start - 1] if start else self.parent,
                token_ids=self.tokens[start * BLOCK_SIZE : end * BLOCK_SIZE],
                block_size=BLOCK_SIZE,
                medium="GPU",
            )


def pod_blocks(index: PrefixIndex) -> int:
    """Number of (block, pod) entries: blocks held, summed over every pod."""
    return sum(index.stats()["pod_blocks"].values())


def build_fleet(
    index: PrefixIndex,
    *,
    pods: Sequence[str],
    blocks_per_pod: int,
    prompt_tokens: list[int],
    full_pods: int,
    partial_pods: int,
    seed: int = 0,
    system_prompts: int = 32,
    system_prompts_per_pod: int = 8,
) -> dict[str, Any]:
    """Fill ``index`` through ``apply()`` with a realistic fleet, and place the scored prompt.

    Every pod holds ``system_prompts_per_pod`` of ``system_prompts`` shared system prompts
    (16-128 blocks each, the same engine hashes and request keys on every pod holding one)
    and then distinct conversations (8-256 blocks, 80 % of them continuing one of the pod's
    system prompts, the rest from the root) until it holds ``blocks_per_pod`` blocks. The
    scored prompt (a distinct document from the root) is held in full by the first
    ``full_pods`` pods, in part by the next ``partial_pods`` (depths spread evenly over
    1..n-1 blocks), and not at all by the rest. Returns what was built.
    """
    rng = random.Random(seed)
    prompt = Chain(prompt_tokens)
    n = len(prompt)
    systems = [Chain.random(rng, rng.randint(16, 128)) for _ in range(system_prompts)]
    depths: dict[str, int] = {}
    stored_events = stored_blocks = 0
    start = time.perf_counter()
    for i, pod in enumerate(pods):
        events: list[BlockStored] = []
        held = 0
        if i < full_pods:
            depth = n
        elif i < full_pods + partial_pods:
            depth = max(1, round(n * (i - full_pods + 1) / (partial_pods + 1)))
        else:
            depth = 0
        depths[pod] = depth
        if depth:
            events.extend(prompt.stored(0, depth))
            held += depth
        mine = rng.sample(systems, min(system_prompts_per_pod, len(systems)))
        for system in mine:
            events.extend(system.stored())
            held += len(system)
        for event in events:
            index.apply(pod, [event], rank=0)
        stored_events += len(events)
        while held < blocks_per_pod:
            length = min(rng.randint(8, 256), blocks_per_pod - held)
            parent = rng.choice(mine).hashes[-1] if rng.random() < 0.8 else None
            for event in Chain.random(rng, length, parent).stored():
                index.apply(pod, [event], rank=0)
                stored_events += 1
            held += length
        stored_blocks += held
        if (i + 1) % 8 == 0 or i + 1 == len(pods):
            log(f"fleet: {i + 1}/{len(pods)} pods, {stored_blocks:,} blocks applied")
    seconds = time.perf_counter() - start
    entries = pod_blocks(index)
    return {
        "pods": len(pods),
        "blocks_per_pod": blocks_per_pod,
        "stored_events": stored_events,
        "stored_blocks": stored_blocks,
        "block_pod_entries": entries,
        "distinct_keys": len(index),
        "build_s": round(seconds, 2),
        "build_blocks_per_s": round(stored_blocks / seconds) if seconds else None,
        "prompt_depth_by_pod": {p: d for p, d in depths.items() if d},
    }


class PodSim:
    """One simulated vLLM engine's KV-event stream: requests stored, oldest evicted.

    At start it stores ``system_prompts`` 64-block system prompts it never evicts. Each
    request is 1..``max_request_events`` events of 64 blocks (one payload each), half of
    them continuing a system prompt. Once the pod holds more than ``capacity`` blocks
    (0: never), the oldest requests are evicted tail first, as vLLM's free queue does,
    in payloads of exactly 64 single-hash ``BlockRemoved`` events (so every payload,
    stored or removed, carries 64 blocks).
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        capacity: int = 0,
        system_prompts: int = 4,
        max_request_events: int = 8,
    ) -> None:
        self.rng = rng
        self.capacity = capacity
        self.max_request_events = max_request_events
        self.systems = [Chain.random(rng, BLOCKS_PER_EVENT) for _ in range(system_prompts)]
        self.resident: deque[list[int]] = deque()
        self.held = 0
        self.pending: deque[tuple[str, list[KVEvent]]] = deque(
            ("stored", [event]) for chain in self.systems for event in chain.stored()
        )
        self.held += sum(len(c) for c in self.systems)

    def _request(self) -> None:
        rng = self.rng
        blocks = BLOCKS_PER_EVENT * rng.randint(1, self.max_request_events)
        parent = rng.choice(self.systems).hashes[-1] if rng.random() < 0.5 else None
        chain = Chain.random(rng, blocks, parent)
        for event in chain.stored():
            self.pending.append(("stored", [event]))
        self.resident.append(chain.hashes)
        self.held += blocks
        while self.capacity and self.held > self.capacity and self.resident:
            victim = self.resident.popleft()
            self.held -= len(victim)
            tail_first = victim[::-1]
            for lo in range(0, len(tail_first), BLOCKS_PER_EVENT):
                removed: list[KVEvent] = [
                    BlockRemoved([h], "GPU") for h in tail_first[lo : lo + BLOCKS_PER_EVENT]
                ]
                self.pending.append(("removed", removed))

    def next_batch(self) -> tuple[str, EventBatch]:
        """The next payload's batch: ``("stored" | "removed", batch)``, 64 blocks each."""
        if not self.pending:
            self._request()
        kind, events = self.pending.popleft()
        return kind, EventBatch(ts=time.time(), events=events, data_parallel_rank=0)
