"""Ingest throughput: decode + apply vLLM-format payloads, as the listener does, on one core.

Each simulated pod (``_common.PodSim``) sends requests of 1-8 payloads, one ``BlockStored``
of 64 blocks each (16-token blocks, uint64 hashes, chained parents), half of them continuing
one of the pod's system prompts; once it holds ``--capacity`` blocks it evicts its oldest
requests tail first, in payloads of 64 single-hash ``BlockRemoved`` events (vLLM sends one
event per evicted block). So the index stays bounded and, in steady state, about half the
blocks are stores and half removals. Every payload carries 64 blocks.

Payloads are encoded once (``wire.encode_batch``, vLLM 0.33.0's map layout). Each pod is
first filled to capacity (untimed), then the timed payloads go through, single thread:

    batch = decode_payload(payload)
    index.apply(pod, batch.events, rank=batch.data_parallel_rank or 0)

Reported: blocks/s for decode+apply (all payloads, stores only, removals only), for
``decode_payload`` alone and for plain ``msgspec.msgpack.decode`` of the same payloads, and
the ratio. With ``--zmq`` (default) also the same streams end to end: ``EventPublisher``
(one per pod, in a spawned process) -> loopback TCP -> ``KVEventListener`` (bind mode), timed
from the last warm-up batch applied to the last batch applied (listener ``on_batch``).

Run ``python benchmarks/bench_ingest.py [--quick]``; prints one JSON object. Target:
decode+apply >= 500k blocks/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
from _common import (
    BLOCKS_PER_EVENT,
    MODEL,
    PodSim,
    environment,
    log,
    peak_rss_bytes,
    pin_process,
)

from kvaware_scorer.events import EventBatch
from kvaware_scorer.index import PrefixIndex
from kvaware_scorer.listener import KVEventListener
from kvaware_scorer.wire import decode_payload, encode_batch

TARGET_BLOCKS_PER_S = 500_000

Payload = tuple[str, str, bytes]  # (pod, "stored" | "removed", payload)


def pod_streams(pods: int, capacity: int, seed: int) -> list[PodSim]:
    return [PodSim(random.Random(seed * 1000 + i), capacity=capacity) for i in range(pods)]


def stream(sims: list[PodSim], timed: int) -> Iterator[tuple[str, str, EventBatch, bool]]:
    """(pod, kind, batch, is_warmup), round robin over the pods.

    The warm-up lasts until every pod has evicted once (it is full); ``timed`` batches
    follow it.
    """
    full = [False] * len(sims)
    k = 0
    while not all(full):
        i = k % len(sims)
        kind, batch = sims[i].next_batch()
        full[i] = full[i] or kind == "removed"
        yield f"pod-{i}", kind, batch, True
        k += 1
    for j in range(timed):
        i = (k + j) % len(sims)
        kind, batch = sims[i].next_batch()
        yield f"pod-{i}", kind, batch, False


def make_payloads(
    pods: int, capacity: int, seed: int, timed: int
) -> tuple[list[Payload], list[Payload]]:
    warm: list[Payload] = []
    rest: list[Payload] = []
    for pod, kind, batch, is_warm in stream(pod_streams(pods, capacity, seed), timed):
        (warm if is_warm else rest).append((pod, kind, encode_batch(batch)))
    return warm, rest


def apply_all(index: PrefixIndex, payloads: list[Payload]) -> None:
    for pod, _kind, payload in payloads:
        batch = decode_payload(payload)
        index.apply(pod, batch.events, rank=batch.data_parallel_rank or 0)


def timed_decode_apply(
    index: PrefixIndex, payloads: list[Payload]
) -> tuple[float, dict[str, float], dict[str, int]]:
    """Total seconds, seconds per payload kind and payloads per kind, one pass."""
    clock = time.perf_counter
    per_kind = {"stored": 0.0, "removed": 0.0}
    counts = {"stored": 0, "removed": 0}
    start = clock()
    for pod, kind, payload in payloads:
        t = clock()
        batch = decode_payload(payload)
        index.apply(pod, batch.events, rank=batch.data_parallel_rank or 0)
        per_kind[kind] += clock() - t
        counts[kind] += 1
    return clock() - start, per_kind, counts


def timed_decoder(func: Any, payloads: list[Payload]) -> float:
    clock = time.perf_counter
    start = clock()
    for _pod, _kind, payload in payloads:
        func(payload)
    return clock() - start


def rate(blocks: int, seconds: float) -> int:
    return round(blocks / seconds) if seconds > 0 else 0


# ---------------------------------------------------------------------------- zmq


class GatedIndex(PrefixIndex):
    """A PrefixIndex whose ``apply`` blocks until :meth:`open` (so a backlog can queue up)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = threading.Event()
        self.opened = False

    def open(self) -> None:
        self.opened = True
        self.gate.set()

    def apply(self, pod: str, events: Any, *, rank: int | None = None) -> None:
        if not self.opened:
            self.gate.wait()
        super().apply(pod, events, rank=rank)


def publisher_main(
    endpoint: str,
    pods: int,
    capacity: int,
    seed: int,
    timed: int,
    avoid_cpu: int | None,
    results: Any,
    release: Any,
    max_wait_s: float,
) -> None:
    """Child process: publish every pod's warm-up and timed batches, then wait (bounded)
    for ``release`` before closing, so batches still queued in ZeroMQ are delivered."""
    from kvaware_scorer.publisher import EventPublisher

    if avoid_cpu is not None and hasattr(os, "sched_getaffinity"):
        others = set(range(os.cpu_count() or 1)) - {avoid_cpu}
        if others:
            pin_process(others)
    publishers = [
        EventPublisher(endpoint, topic=f"kv@pod-{i}@{MODEL}", hwm=1_000_000, bind=False)
        for i in range(pods)
    ]
    try:
        for pub in publishers:
            pub.start()
        for pub in publishers:
            if not pub.wait_subscribed(10.0):
                raise RuntimeError("listener never subscribed")
        results.put(("ready", None))
        start = time.perf_counter()
        sent = warm = 0
        for pod, _kind, batch, is_warm in stream(pod_streams(pods, capacity, seed), timed):
            publishers[int(pod.split("-")[1])].publish(batch)
            sent += 1
            warm += is_warm
            if sent % 512 == 0:  # bound the publishers' queues (memory)
                for pub in publishers:
                    pub.flush(30.0)
        for pub in publishers:
            pub.flush(30.0)
        elapsed = time.perf_counter() - start
        results.put(("done", {"published": sent, "warm": warm, "publish_s": elapsed}))
        release.wait(max_wait_s)
    except Exception as exc:  # report, do not hang the parent
        results.put(("error", repr(exc)))
    finally:
        for pub in publishers:
            pub.stop()


def zmq_run(args: argparse.Namespace, pin_cpu: int | None, warm_n: int) -> dict[str, Any]:
    """Publisher process -> loopback -> listener; the listener drains a queued backlog."""
    index = GatedIndex(block_size=16, default_model=MODEL)
    total = warm_n + args.payloads
    state = {"batches": 0, "t_warm": 0.0, "t_last": 0.0}
    done = threading.Event()

    def on_batch(_pod: str, _rank: int, _seq: int, _batch: EventBatch) -> None:
        state["batches"] += 1
        n = state["batches"]
        if n == warm_n:
            state["t_warm"] = time.perf_counter()
        if n == total:
            state["t_last"] = time.perf_counter()
            done.set()

    listener = KVEventListener(index, bind=["tcp://127.0.0.1:0"], on_batch=on_batch)
    listener.start()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    release = ctx.Event()
    child = ctx.Process(
        target=publisher_main,
        args=(
            listener.bound_endpoints[0],
            args.pods,
            args.capacity,
            args.seed,
            args.payloads,
            pin_cpu,
            results,
            release,
            args.zmq_timeout + 30,
        ),
        daemon=True,
    )
    out: dict[str, Any] = {"endpoint": listener.bound_endpoints[0]}
    try:
        child.start()
        kind, info = results.get(timeout=30)
        if kind != "ready":
            raise RuntimeError(f"publisher failed: {info}")
        log(f"zmq: queueing {total:,} batches from {args.pods} publishers (index gated)")
        kind, info = results.get(timeout=args.zmq_timeout)
        if kind != "done":
            raise RuntimeError(f"publisher failed: {info}")
        out["publisher"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in info.items()}
        log("zmq: all published; opening the gate")
        opened = time.perf_counter()
        index.open()
        completed = done.wait(args.zmq_timeout)
        stats = listener.stats()
        out["listener"] = {
            k: stats[k]
            for k in ("batches", "events_applied", "decode_errors", "gaps", "cleared_on_gap")
        }
        out["completed"] = completed
        if completed:
            blocks = args.payloads * BLOCKS_PER_EVENT
            out["timed_blocks"] = blocks
            out["timed_s"] = round(state["t_last"] - state["t_warm"], 3)
            out["blocks_per_s"] = rate(blocks, state["t_last"] - state["t_warm"])
            out["all_blocks_per_s_incl_warmup"] = rate(
                total * BLOCKS_PER_EVENT, state["t_last"] - opened
            )
        out["index_entries"] = len(index)
    finally:
        index.open()
        release.set()
        listener.stop()
        child.join(10)
        if child.is_alive():
            child.terminate()
            child.join(5)
    return out


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer payloads, one repeat")
    parser.add_argument("--pods", type=int, default=8)
    parser.add_argument("--capacity", type=int, default=32_768, help="blocks per pod")
    parser.add_argument("--payloads", type=int, default=32_000, help="timed payloads")
    parser.add_argument("--repeats", type=int, default=3, help="best of N passes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: last)")
    parser.add_argument("--no-zmq", dest="zmq", action="store_false")
    parser.add_argument("--zmq-timeout", type=float, default=120.0)
    parser.add_argument("--profile", action="store_true", help="cProfile one pass (stderr)")
    args = parser.parse_args(argv)
    if args.quick:
        args.capacity = min(args.capacity, 4096)
        args.payloads = min(args.payloads, 4000)
        args.repeats = 1

    warm, timed = make_payloads(args.pods, args.capacity, args.seed, args.payloads)
    blocks = len(timed) * BLOCKS_PER_EVENT
    payload_bytes = sum(len(p) for _, _, p in timed)

    pin_cpu = None
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        pin_cpu = args.cpu if args.cpu is not None else cpus[-1]
        pin_process({pin_cpu})

    passes = []
    index = PrefixIndex(block_size=16, default_model=MODEL)
    for r in range(args.repeats):
        index = PrefixIndex(block_size=16, default_model=MODEL)
        apply_all(index, warm)
        gc.collect()
        total_s, per_kind, counts = timed_decode_apply(index, timed)
        passes.append((total_s, per_kind, counts))
        log(f"pass {r + 1}/{args.repeats}: decode+apply {rate(blocks, total_s):,} blocks/s")
    total_s, per_kind, counts = min(passes, key=lambda p: p[0])
    index_stats = index.stats()

    generic_s = min(timed_decoder(msgspec.msgpack.decode, timed) for _ in range(args.repeats))
    decode_s = min(timed_decoder(decode_payload, timed) for _ in range(args.repeats))
    log(f"generic decode {rate(blocks, generic_s):,} blocks/s")

    if args.profile:
        import cProfile
        import pstats

        index = PrefixIndex(block_size=16, default_model=MODEL)
        apply_all(index, warm)
        profiler = cProfile.Profile()
        profiler.runcall(apply_all, index, timed)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(15)

    decode_apply_bps = rate(blocks, total_s)
    report: dict[str, Any] = {
        "benchmark": "ingest",
        "params": {
            "quick": args.quick,
            "pods": args.pods,
            "capacity_blocks_per_pod": args.capacity,
            "block_size": 16,
            "blocks_per_payload": BLOCKS_PER_EVENT,
            "warmup_payloads": len(warm),
            "timed_payloads": len(timed),
            "repeats": args.repeats,
            "seed": args.seed,
            "pinned_cpu": pin_cpu,
        },
        "environment": environment(),
        "workload": {
            "timed_blocks": blocks,
            "stored_payloads": counts["stored"],
            "removed_payloads": counts["removed"],
            "mean_payload_bytes": round(payload_bytes / len(timed)),
            "index_distinct_keys_after": index_stats["entries"],
            "index_block_pod_entries_after": sum(index_stats["pod_blocks"].values()),
        },
        "decode_apply": {
            "seconds": round(total_s, 3),
            "blocks_per_s": decode_apply_bps,
            "stored_blocks_per_s": rate(counts["stored"] * BLOCKS_PER_EVENT, per_kind["stored"]),
            "removed_blocks_per_s": rate(counts["removed"] * BLOCKS_PER_EVENT, per_kind["removed"]),
            "us_per_payload": round(total_s / len(timed) * 1e6, 2),
            "all_passes_blocks_per_s": [rate(blocks, p[0]) for p in passes],
        },
        "decode_payload_only": {
            "seconds": round(decode_s, 3),
            "blocks_per_s": rate(blocks, decode_s),
        },
        "msgspec_generic_decode": {
            "seconds": round(generic_s, 3),
            "blocks_per_s": rate(blocks, generic_s),
        },
        "decode_apply_time_over_generic_decode_time": round(total_s / generic_s, 2),
        "targets": {
            "decode_apply_blocks_per_s": {
                "target": f">= {TARGET_BLOCKS_PER_S}",
                "measured": decode_apply_bps,
                "met": decode_apply_bps >= TARGET_BLOCKS_PER_S,
            }
        },
    }
    warm_n = len(warm)
    del warm, timed, index
    gc.collect()
    if args.zmq:
        if pin_cpu is not None:
            pin_process({pin_cpu})
        report["zmq_end_to_end"] = zmq_run(args, pin_cpu, warm_n)
        log(f"zmq: {report['zmq_end_to_end'].get('blocks_per_s', 0):,} blocks/s")
    report["peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
