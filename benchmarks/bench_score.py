"""Score latency: request keys + prefix match of an 8,192-token prompt over a 64-pod fleet.

The index is filled through ``PrefixIndex.apply()`` with ``BlockStored`` events of up to 64
blocks (see ``_common.build_fleet``): 64 pods, 16,384 blocks each (1,048,576 (block, pod)
entries), shared system prompts plus distinct conversations per pod. The scored prompt
(512 blocks) is held in full by 4 pods, in part by 12 (depths spread over the prompt) and
not at all by the other 48, so the match walks all 512 blocks.

Timed, per call, after a warm-up (``--iterations`` each):

- ``keys``: ``index.keys(tokens, model)`` (uint32 packing + 512 chained xxh3_64);
- ``match``: ``index.match(keys, pods)`` with the 64 pod names;
- ``score``: both, as a router scores one request;
- ``floor``: ``array('I', tokens).tobytes()`` + a chained xxh3_64 per block + one lookup per
  block in a dict of the index's size: the least a pure-Python scorer can do.

Run ``python benchmarks/bench_score.py [--quick]``; prints one JSON object (latencies in
microseconds, with the targets: score p50 <= 300 us and <= 3x floor p50).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from array import array
from typing import Any

from _common import (
    BLOCK_SIZE,
    MODEL,
    build_fleet,
    environment,
    latency_stats,
    log,
    random_tokens,
    time_loop,
)
from xxhash import xxh3_64_intdigest

from kvaware_scorer.index import PrefixIndex

TARGET_SCORE_P50_US = 300.0
TARGET_FLOOR_RATIO = 3.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small index, few iterations")
    parser.add_argument("--pods", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--blocks-per-pod", type=int, default=16_384)
    parser.add_argument("--full-pods", type=int, default=4)
    parser.add_argument("--partial-pods", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks_per_pod = min(args.blocks_per_pod, 2048)
        args.iterations = min(args.iterations, 500)
        args.warmup = min(args.warmup, 50)

    pods = [f"pod-{i}" for i in range(args.pods)]
    tokens = random_tokens(random.Random(args.seed + 1), args.prompt_tokens)
    index = PrefixIndex(block_size=BLOCK_SIZE, default_model=MODEL)
    log(f"building the index: {args.pods} pods x {args.blocks_per_pod:,} blocks")
    fleet = build_fleet(
        index,
        pods=pods,
        blocks_per_pod=args.blocks_per_pod,
        prompt_tokens=tokens,
        full_pods=args.full_pods,
        partial_pods=args.partial_pods,
        seed=args.seed,
    )
    log(
        f"index built: {fleet['block_pod_entries']:,} (block, pod) entries, "
        f"{fleet['distinct_keys']:,} keys, {fleet['build_s']} s"
    )

    keys = index.keys(tokens, MODEL)
    result = index.match(keys, pods)
    depths = fleet.pop("prompt_depth_by_pod")
    got = {pod: m.matched_blocks for pod, m in result.items()}
    expected = {pod: depths.get(pod, 0) for pod in pods}
    match_check = {
        "prompt_blocks": len(keys),
        "pods_full": sum(1 for d in got.values() if d == len(keys)),
        "pods_partial": sum(1 for d in got.values() if 0 < d < len(keys)),
        "pods_absent": sum(1 for d in got.values() if d == 0),
        "deepest_walk_blocks": max(got.values()),
        "as_built": got == expected,
    }
    if not match_check["as_built"]:
        log(f"WARNING: match differs from the built fleet: {match_check}")

    # The floor: same hashing and one dict lookup per block, against a dict of equal size
    # holding the prompt's keys (so every lookup hits, as in the index).
    rng = random.Random(args.seed + 2)
    floor_map: dict[int, int] = dict.fromkeys(keys, 1)
    while len(floor_map) < len(index):
        floor_map[rng.getrandbits(64)] = 1
    root = index.hasher.root(MODEL)
    step = BLOCK_SIZE * 4

    def floor() -> None:
        data = array("I", tokens).tobytes()
        get = floor_map.get
        h = root
        for offset in range(0, len(data) - len(data) % step, step):
            h = xxh3_64_intdigest(data[offset : offset + step], h)
            get(h)

    def keys_only() -> None:
        index.keys(tokens, MODEL)

    def match_only() -> None:
        index.match(keys, pods)

    def score() -> None:
        index.match(index.keys(tokens, MODEL), pods)

    timings: dict[str, Any] = {}
    for name, func in (("floor", floor), ("keys", keys_only), ("match", match_only)):
        gc.collect()
        log(f"timing {name}: {args.warmup} warm-up + {args.iterations} calls")
        timings[name] = latency_stats(time_loop(func, args.iterations, args.warmup))
    gc.collect()
    log(f"timing score: {args.warmup} warm-up + {args.iterations} calls")
    timings["score"] = latency_stats(time_loop(score, args.iterations, args.warmup))

    score_p50 = timings["score"]["p50_us"]
    ratio = round(score_p50 / timings["floor"]["p50_us"], 2)
    report = {
        "benchmark": "score",
        "params": {
            "quick": args.quick,
            "pods": args.pods,
            "prompt_tokens": args.prompt_tokens,
            "block_size": BLOCK_SIZE,
            "blocks_per_pod": args.blocks_per_pod,
            "full_pods": args.full_pods,
            "partial_pods": args.partial_pods,
            "iterations": args.iterations,
            "warmup": args.warmup,
            "seed": args.seed,
            "gc": "enabled (gc.collect() before each loop)",
        },
        "environment": environment(),
        "fleet": fleet,
        "match_check": match_check,
        "latency_us": timings,
        "floor_dict_size": len(floor_map),
        "score_p50_over_floor_p50": ratio,
        "targets": {
            "score_p50_us": {
                "target": f"<= {TARGET_SCORE_P50_US}",
                "measured": score_p50,
                "met": score_p50 <= TARGET_SCORE_P50_US,
            },
            "score_p50_over_floor_p50": {
                "target": f"<= {TARGET_FLOOR_RATIO}",
                "measured": ratio,
                "met": ratio <= TARGET_FLOOR_RATIO,
            },
        },
        "unix_time": round(time.time()),
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
