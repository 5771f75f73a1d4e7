"""Index memory: resident bytes per (block, pod) entry at 1M and 5M entries.

Each measurement runs in its own process (this script re-run with ``--child``) so RSS
figures never mix: it reads RSS (``/proc/self/statm``) after ``gc.collect()``, builds the
index, collects again and reads RSS again; the difference over the number of (block, pod)
entries is the figure. No tracemalloc (it would change what it measures).

The index is built the way the listener builds it: every ``BlockStored`` (at most 64
16-token blocks, chained parents, uint64 hashes) is encoded in vLLM's layout and decoded
with ``decode_payload`` for each pod that stores it, so every pod gets its own hash
objects, then applied with ``index.apply``. 64 pods, distinct conversations of 8-256
blocks. Two distributions:

- ``worst``: every block on exactly one pod (no sharing at all);
- ``shared``: every conversation on 2, 3 or 4 pods (3 on average), as when the same
  system prompts and documents are served by several replicas.

After the RSS reading the child also sizes the index's own structures with
``sys.getsizeof`` (dict tables, int objects rounded to pymalloc's 16-byte classes) to say
where the bytes go; that part reads private attributes and is only an attribution.

Run ``python benchmarks/bench_memory.py [--quick]``; prints one JSON object. Target:
<= 150 bytes per (block, pod) entry.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import time
from typing import Any

from _common import (
    BLOCK_SIZE,
    MODEL,
    Chain,
    environment,
    log,
    peak_rss_bytes,
    pod_blocks,
    rss_bytes,
)

from kvaware_scorer.events import EventBatch
from kvaware_scorer.index import PrefixIndex
from kvaware_scorer.wire import decode_payload, encode_batch

TARGET_BYTES_PER_ENTRY = 150
CASES = ("worst", "shared")


def build(
    index: PrefixIndex, case: str, entries: int, pods: int, seed: int, *, quiet: bool = False
) -> dict[str, Any]:
    rng = random.Random(seed)
    names = [f"pod-{i}" for i in range(pods)]
    done = events = 0
    next_report = entries // 10
    start = time.perf_counter()
    while done < entries:
        replicas = 1 if case == "worst" else rng.randint(2, 4)
        length = min(rng.randint(8, 256), -(-(entries - done) // replicas))
        chain = Chain.random(rng, length)
        targets = rng.sample(names, replicas)
        for event in chain.stored():
            payload = encode_batch(EventBatch(ts=time.time(), events=[event], data_parallel_rank=0))
            for pod in targets:
                batch = decode_payload(payload)
                index.apply(pod, batch.events, rank=batch.data_parallel_rank or 0)
                events += 1
        done += length * replicas
        if done >= next_report and not quiet:
            log(f"{case}: {done:,}/{entries:,} (block, pod) entries applied")
            next_report += entries // 10
    return {"apply_calls": events, "build_s": round(time.perf_counter() - start, 2)}


def _obj_bytes(size: int) -> int:
    """Bytes pymalloc hands out for a small object of ``size`` (16-byte size classes)."""
    return -(-size // 16) * 16 if size <= 512 else size


def breakdown(index: PrefixIndex) -> dict[str, Any]:
    """Approximate bytes of the index's main structures (reads private attributes)."""
    try:
        entries: dict[int, Any] = index._entries
        slots = list(index._slots.values())
        interned = index._interned
    except AttributeError as exc:  # the layout changed; the RSS figures still stand
        return {"unavailable": repr(exc)}
    canonical = {key: key for key in entries}
    out = {
        "entries_dict_table": sys.getsizeof(entries),
        "request_key_ints": sum(_obj_bytes(sys.getsizeof(k)) for k in entries),
        "held_dict_tables": sum(sys.getsizeof(s.held) for s in slots),
        "engine_key_ints": 0,
        "held_value_ints_not_shared_with_entries": 0,
        "held_records_other": 0,
        "non_int_residency_values": sum(
            _obj_bytes(sys.getsizeof(v)) for v in entries.values() if v.__class__ is not int
        ),
        "interned_masks": sys.getsizeof(interned)
        + sum(_obj_bytes(sys.getsizeof(m)) for m in interned),
    }
    for slot in slots:
        for ek, rec in slot.held.items():
            out["engine_key_ints"] += _obj_bytes(sys.getsizeof(ek))
            if rec.__class__ is int:
                if canonical.get(rec) is not rec:
                    out["held_value_ints_not_shared_with_entries"] += _obj_bytes(sys.getsizeof(rec))
            else:
                out["held_records_other"] += _obj_bytes(sys.getsizeof(rec))
    del canonical
    out["total"] = sum(out.values())
    return out


def child(case: str, entries: int, pods: int, seed: int) -> dict[str, Any]:
    index = PrefixIndex(block_size=BLOCK_SIZE, default_model=MODEL)
    # Warm the code paths and allocator with a throwaway index, so the first-use costs
    # (imports, caches) are not charged to the entries.
    scratch = PrefixIndex(block_size=BLOCK_SIZE, default_model=MODEL)
    build(scratch, case, 2048, 4, seed + 1, quiet=True)
    del scratch
    gc.collect()
    before = rss_bytes()
    built = build(index, case, entries, pods, seed)
    gc.collect()
    after = rss_bytes()
    n = pod_blocks(index)
    keys = len(index)
    result = {
        "case": case,
        "target_entries": entries,
        "block_pod_entries": n,
        "distinct_keys": keys,
        "pods_per_block": round(n / keys, 2),
        "rss_before_mb": round(before / 2**20, 1),
        "rss_after_mb": round(after / 2**20, 1),
        "index_rss_mb": round((after - before) / 2**20, 1),
        "bytes_per_entry": round((after - before) / n, 1),
        "bytes_per_distinct_key": round((after - before) / keys, 1),
        **built,
    }
    log(f"{case} {entries:,}: {result['bytes_per_entry']} B per (block, pod) entry; sizing")
    sizes = breakdown(index)
    if "total" in sizes:
        sizes = {k: round(v / n, 1) for k, v in sizes.items()}
        sizes["allocator_and_other"] = round(result["bytes_per_entry"] - sizes["total"], 1)
    result["breakdown_bytes_per_entry"] = sizes
    result["peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k and 250k entries")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--pods", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="per measurement, s")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "ENTRIES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        case, entries = args.child[0], int(args.child[1])
        out = child(case, entries, args.pods, args.seed)
        sys.stdout.write(json.dumps(out) + "\n")
        return 0

    if args.quick:
        args.sizes = [100_000, 250_000]
    results = []
    for case in args.cases:
        for size in args.sizes:
            log(f"measuring {case} at {size:,} entries in a new process")
            cmd = [sys.executable, __file__, "--child", case, str(size)]
            cmd += ["--pods", str(args.pods), "--seed", str(args.seed)]
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout, check=True
            )
            results.append(json.loads(proc.stdout))
    worst = max(r["bytes_per_entry"] for r in results)
    report = {
        "benchmark": "memory",
        "params": {
            "quick": args.quick,
            "sizes": args.sizes,
            "cases": args.cases,
            "pods": args.pods,
            "block_size": BLOCK_SIZE,
            "seed": args.seed,
        },
        "environment": environment(),
        "results": results,
        "targets": {
            "bytes_per_entry": {
                "target": f"<= {TARGET_BYTES_PER_ENTRY}",
                "measured": {
                    f"{r['case']}@{r['target_entries']}": r["bytes_per_entry"] for r in results
                },
                "met": {
                    f"{r['case']}@{r['target_entries']}": r["bytes_per_entry"]
                    <= TARGET_BYTES_PER_ENTRY
                    for r in results
                },
                "all_met": worst <= TARGET_BYTES_PER_ENTRY,
            }
        },
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
