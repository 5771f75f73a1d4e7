"""Decode throughput of :func:`kvaware_scorer.wire.decode_payload` versus plain msgpack.

The payload is one batch holding one ``BlockStored`` of 64 blocks (16-token blocks,
uint64 hashes, ``extra_keys`` of 64 nils, ``group_idx`` 0), encoded in vLLM 0.33.0's
layout, i.e. what a GPU pool sends after a 1024-token prefill. It is decoded with:

- ``msgspec_generic``: ``msgspec.msgpack.decode`` into plain Python objects (the floor:
  no validation, no event objects);
- ``msgpack_generic``: ``msgpack.unpackb`` (only when the ``msgpack`` package is present);
- ``decode_payload``: the fast path (typed msgspec decode plus event dataclasses);
- ``decode_payload_legacy``: the same batch in the <= 0.23 array form;
- ``slow_path``: the event-by-event decode used for mixed or partly bad batches.

A second payload, ``block_removed``, holds N single-hash ``BlockRemoved`` events (what the
GPU pool sends when it evicts N blocks), the worst case for per-event overhead.

Run ``python benchmarks/bench_decode.py [--seconds S] [--blocks N] [--block-size T]``;
prints one JSON object with, per payload and decoder, microseconds per payload, blocks per
second and the ratio of its time to ``msgspec_generic``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from kvaware_scorer.events import BlockRemoved, BlockStored, EventBatch
from kvaware_scorer.wire import _decode_slow, decode_payload, encode_batch, encode_batch_legacy


def make_batch(blocks: int, block_size: int, seed: int = 0) -> EventBatch:
    """One batch with a single ``BlockStored`` as vLLM's GPU pool emits it."""
    rng = random.Random(seed)
    event = BlockStored(
        block_hashes=[rng.getrandbits(64) for _ in range(blocks)],
        parent_block_hash=rng.getrandbits(64),
        token_ids=[rng.randrange(150_000) for _ in range(blocks * block_size)],
        block_size=block_size,
        medium="GPU",
        extra_keys=[None] * blocks,
        group_idx=0,
    )
    return EventBatch(ts=1767225600.5, events=[event], data_parallel_rank=0)


def time_per_call(func: Callable[[], Any], seconds: float) -> float:
    """Best-of-5 mean seconds per call, each round running for about ``seconds / 5``."""
    func()
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            func()
        elapsed = time.perf_counter() - start
        if elapsed >= 0.02:
            break
        loops *= 2
    per_round = max(1, int(loops * (seconds / 5) / elapsed))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(per_round):
            func()
        best = min(best, (time.perf_counter() - start) / per_round)
    return best


def make_eviction_batch(blocks: int, seed: int = 1) -> EventBatch:
    """One batch of ``blocks`` single-hash ``BlockRemoved`` events (GPU-pool eviction)."""
    rng = random.Random(seed)
    events: list[Any] = [BlockRemoved([rng.getrandbits(64)], "GPU", 0) for _ in range(blocks)]
    return EventBatch(ts=1767225600.5, events=events, data_parallel_rank=0)


def bench(batch: EventBatch, blocks: int, seconds: float) -> dict[str, Any]:
    """Time every decoder on ``batch``; ``blocks`` is the number of blocks it carries."""
    payload = encode_batch(batch)
    legacy = encode_batch_legacy(batch)
    assert decode_payload(payload) == batch
    assert decode_payload(legacy) == batch
    assert _decode_slow(payload) == batch

    decoders: dict[str, Callable[[], Any]] = {
        "msgspec_generic": lambda: msgspec.msgpack.decode(payload),
    }
    try:
        import msgpack  # type: ignore[import-not-found]

        decoders["msgpack_generic"] = lambda: msgpack.unpackb(payload)
    except ImportError:
        pass
    decoders["decode_payload"] = lambda: decode_payload(payload)
    decoders["decode_payload_legacy"] = lambda: decode_payload(legacy)
    decoders["slow_path"] = lambda: _decode_slow(payload)

    results: dict[str, dict[str, float]] = {}
    for name, func in decoders.items():
        per_call = time_per_call(func, seconds)
        results[name] = {
            "us_per_payload": round(per_call * 1e6, 3),
            "blocks_per_s": round(blocks / per_call),
        }
    base = results["msgspec_generic"]["us_per_payload"]
    for entry in results.values():
        entry["ratio_to_msgspec_generic"] = round(entry["us_per_payload"] / base, 3)
    return {"bytes": len(payload), "legacy_bytes": len(legacy), "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per decoder")
    parser.add_argument("--blocks", type=int, default=64, help="blocks per batch")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block")
    args = parser.parse_args(argv)

    report = {
        "python": sys.version.split()[0],
        "msgspec": msgspec.__version__,
        "block_stored": {
            "blocks": args.blocks,
            "block_size": args.block_size,
            **bench(make_batch(args.blocks, args.block_size), args.blocks, args.seconds),
        },
        "block_removed": {
            "events": args.blocks,
            **bench(make_eviction_batch(args.blocks), args.blocks, args.seconds),
        },
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
