"""Overload: KV events published much faster than the listener can apply them.

A spawned process runs ``--pods`` :class:`EventPublisher` s (XPUB bound on 127.0.0.1,
replay ROUTER, send high-water mark ``--pub-hwm``, replay buffer ``--buffer-steps``) and
publishes as fast as it can for ``--duration`` seconds: batches of ``--batch-blocks``
blocks (requests of 1-8 chained ``BlockStored`` events of 64 blocks from the root, or, once
a pod holds ``--pod-blocks`` blocks, single-hash ``BlockRemoved`` events for its oldest
blocks, as vLLM's eviction does). Token blocks come from a small pre-generated pool and
the engine hashes are random, so the producer costs far less per block than the
listener's decode + apply: the listener falls behind by construction.

This process runs a :class:`KVEventListener` in connect mode with a small
``--max-queued-messages`` (ZeroMQ RCVHWM per SUB socket) and replay on, feeding a
:class:`PrefixIndex` whose per-pod capacity is twice ``--pod-blocks``. What it shows:

* memory: RSS sampled every 0.25 s, idle versus peak during the overload and after;
  a ``--rss-limit-mb`` guard ends the overload early (reported) rather than exhaust the
  machine;
* drops: whatever ZeroMQ sheds shows up as counted gaps, repaired by replay or cleared
  (listener counters). The index is compared with each publisher's truth (the blocks it
  holds) twice: when the overload ends and the listener has gone quiet
  (``after_overload_quiet``: batches shed at the very end are invisible until the pod
  publishes again), and after light traffic resumes (10 small batches per pod over 1 s;
  ``after_light_traffic``: every gap seen and repaired). Precision = no stale entry,
  recall = what replay could repair;
* latency: the main thread scores a 2,048-token prompt (``index.keys`` + ``index.match``
  over every pod) back to back, idle, during the overload, while the listener catches
  up, and after, p50/p99; the cyclic GC's generation-2 pauses per phase are reported,
  since decoded batches buffered during replays make them longer.

Run ``.venv/bin/python benchmarks/bench_overload.py [--quick]``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from _common import environment, latency_stats, log, rss_bytes

from kvaware_scorer.events import BlockHash, BlockRemoved, BlockStored, EventBatch, KVEvent
from kvaware_scorer.index import PrefixIndex
from kvaware_scorer.listener import KVEventListener, PodSource

MODEL = "bench-model"
BLOCK = 16
EVENT_BLOCKS = 64
MB = 1024 * 1024


# ------------------------------------------------------------------------- child process


class _Producer:
    """One pod's event stream, shaped like an engine's: requests of 1-8 chained 64-block
    ``BlockStored`` events from the root; once the pod holds ``capacity`` blocks, batches of
    single-hash ``BlockRemoved`` for its oldest blocks (vLLM sends one event per block)."""

    def __init__(self, rng: random.Random, pool: list[list[int]], capacity: int) -> None:
        self.rng = rng
        self.pool = pool
        self.capacity = capacity
        self.live: deque[BlockHash] = deque()
        self.last: BlockHash | None = None
        self.request_left = 0

    def batch(self, blocks: int) -> EventBatch:
        events: list[KVEvent] = []
        getrandbits = self.rng.getrandbits
        if len(self.live) + blocks > self.capacity:
            for _ in range(min(blocks, len(self.live))):
                events.append(BlockRemoved([self.live.popleft()], "GPU"))
        else:
            for _ in range(blocks // EVENT_BLOCKS):
                if self.request_left <= 0:
                    self.request_left = 1 + getrandbits(3)  # a new request: 1-8 events
                    self.last = None
                self.request_left -= 1
                hashes: list[BlockHash] = [getrandbits(64) for _ in range(EVENT_BLOCKS)]
                tokens = self.pool[getrandbits(16) % len(self.pool)]
                events.append(BlockStored(hashes, self.last, tokens, BLOCK, medium="GPU"))
                self.live.extend(hashes)
                self.last = hashes[-1]
        return EventBatch(time.time(), events, 0)


def publisher_process(conn: Connection, opts: dict[str, Any]) -> None:
    """Child: publishers up, endpoints sent, then publish flat out for the duration;
    finally report each pod's truth and keep serving replays until told to stop."""
    from kvaware_scorer.publisher import EventPublisher

    rng = random.Random(opts["seed"])
    pool = [[rng.randrange(65536) for _ in range(EVENT_BLOCKS * BLOCK)] for _ in range(64)]
    pubs = []
    producers = []
    try:
        for _ in range(opts["pods"]):
            pub = EventPublisher(
                "tcp://127.0.0.1:0",
                bind=True,
                replay_endpoint="tcp://127.0.0.1:0",
                hwm=opts["pub_hwm"],
                buffer_steps=opts["buffer_steps"],
            )
            pub.start()
            pubs.append(pub)
            producers.append(_Producer(random.Random(rng.random()), pool, opts["pod_blocks"]))
        conn.send([(p.endpoint, p.replay_endpoint) for p in pubs])
        if not conn.poll(30) or conn.recv() != "go":
            return
        for pub in pubs:
            pub.wait_subscribed(10)
        deadline = time.monotonic() + opts["duration_s"]
        published = [0] * len(pubs)
        started = time.monotonic()
        while time.monotonic() < deadline:
            if conn.poll(0) and conn.recv() == "stop":  # the parent's RSS guard
                break
            for i, pub in enumerate(pubs):
                pub.publish(producers[i].batch(opts["batch_blocks"]))
                published[i] += 1
                if published[i] % 32 == 0:
                    pub.flush(10)  # bound our own queue: the publisher thread keeps up
        seconds = time.monotonic() - started
        for pub in pubs:
            pub.flush(10)
        conn.send(
            {
                "published_batches": published,
                "seconds": round(seconds, 2),
                "truth": [list(p.live) for p in producers],
            }
        )
        # Light traffic resumes when the parent says so: a few small batches per pod, at
        # a pace the listener sustains, so that a loss at the very end becomes visible.
        message = None
        while message not in ("resume", "exit") and conn.poll(opts["serve_s"]):
            message = conn.recv()  # a late "stop" from the RSS guard is ignored here
        if message == "resume":
            for _ in range(opts["resume_batches"]):
                for i, pub in enumerate(pubs):
                    pub.publish(producers[i].batch(EVENT_BLOCKS))
                time.sleep(0.1)
            for pub in pubs:
                pub.flush(10)
            conn.send({"truth": [list(p.live) for p in producers]})
            conn.poll(opts["serve_s"])  # keep answering replays until the parent is done
    finally:
        for pub in pubs:
            pub.stop()
        conn.close()


# ------------------------------------------------------------------------- parent


class Sampler:
    """RSS and listener/index figures every ``interval_s``, from the scoring loop."""

    def __init__(self, listener: KVEventListener, interval_s: float = 0.25) -> None:
        self.listener = listener
        self.interval_s = interval_s
        self.next_at = 0.0
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def maybe(self, phase: str) -> None:
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + self.interval_s
        stats = self.listener.stats()
        self.samples.append(
            {
                "t_s": round(now - self.t0, 2),
                "phase": phase,
                "rss_mb": round(rss_bytes() / MB, 1),
                "batches": stats["batches"],
                "gaps": stats["gaps"],
                "index_entries": stats["index"]["entries"],
            }
        )

    def rss_mb(self, phase: str) -> list[float]:
        return [s["rss_mb"] for s in self.samples if s["phase"] == phase]


PHASES = ("idle", "overload", "recovery", "resume", "after")


class GcPauses:
    """Durations of the cyclic collector's generation-2 runs, per phase (gc.callbacks)."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.started = 0.0
        self.pauses: dict[str, list[float]] = {}

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if event == "start":
            self.started = time.perf_counter()
        else:
            ms = (time.perf_counter() - self.started) * 1e3
            self.pauses.setdefault(self.phase, []).append(ms)

    def summary(self) -> dict[str, Any]:
        return {
            phase: {"n": len(ms), "max": round(max(ms), 1), "total": round(sum(ms), 1)}
            for phase, ms in self.pauses.items()
        }


GC = GcPauses()


class Quiet:
    """True once the listener has applied nothing for ``window_s`` (it caught up)."""

    def __init__(self, listener: KVEventListener, window_s: float = 1.0) -> None:
        self.listener = listener
        self.window_s = window_s
        self.batches = -1
        self.since = time.monotonic()

    def __call__(self) -> bool:
        batches = self.listener.stats()["batches"]
        now = time.monotonic()
        if batches != self.batches:
            self.batches, self.since = batches, now
        return now - self.since > self.window_s


def compare(index: PrefixIndex, pods: list[str], truths: list[list[int]]) -> dict[str, Any]:
    """Per pod: the index's blocks against the publisher's live blocks."""
    pod_blocks = index.stats()["pod_blocks"]
    rows: dict[str, Any] = {}
    for pod, truth in zip(pods, truths, strict=True):
        held = int(pod_blocks.get(pod, 0))
        both = sum(1 for h in truth if index.holds(pod, h))
        rows[pod] = {
            "truth": len(truth),
            "index": held,
            "both": both,
            "precision": round(both / held, 6) if held else 1.0,
            "recall": round(both / len(truth), 6) if truth else 1.0,
        }
    return rows


def score_window(
    score: Callable[[], Any],
    seconds: float,
    sampler: Sampler,
    phase: str,
    until: Callable[[], bool] | None = None,
) -> list[int]:
    """Back-to-back scores for ``seconds`` (or until ``until()``); ns per call."""
    gc.collect()
    GC.phase = phase
    samples: list[int] = []
    clock = time.perf_counter_ns
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        start = clock()
        score()
        samples.append(clock() - start)
        n += 1
        if n % 64 == 0:
            sampler.maybe(phase)
            if until is not None and until():
                break
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="KV-event overload: memory, drops, latency")
    parser.add_argument("--quick", action="store_true", help="5 s of overload, 2 pods")
    parser.add_argument("--pods", type=int, default=4)
    parser.add_argument("--duration", type=float, default=20.0, metavar="S")
    parser.add_argument("--batch-blocks", type=int, default=256)
    parser.add_argument("--pod-blocks", type=int, default=16_384)
    parser.add_argument("--max-queued-messages", type=int, default=16)
    parser.add_argument("--max-buffered-batches", type=int, default=10_000)
    parser.add_argument("--pub-hwm", type=int, default=100)
    parser.add_argument("--buffer-steps", type=int, default=2_000)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--recover-s", type=float, default=60.0, help="max wait to catch up")
    parser.add_argument("--rss-limit-mb", type=float, default=3000.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.pods, args.duration, args.idle_s = 2, 5.0, 1.5
    opts = {
        "pods": args.pods,
        "duration_s": args.duration,
        "batch_blocks": args.batch_blocks,
        "pod_blocks": args.pod_blocks,
        "pub_hwm": args.pub_hwm,
        "buffer_steps": args.buffer_steps,
        "seed": args.seed,
        "serve_s": args.recover_s + 30,
        "resume_batches": 10,
    }
    result: dict[str, Any] = {"benchmark": "overload", "parameters": vars(args)}
    index = PrefixIndex(block_size=BLOCK, default_model=MODEL, pod_capacity=2 * args.pod_blocks)
    listener = KVEventListener(
        index,
        max_queued_messages=args.max_queued_messages,
        max_buffered_batches=args.max_buffered_batches,
    )
    # The scored prompt lives on a pod of its own that the flood does not evict.
    rng = random.Random(args.seed + 1)
    prompt = [rng.randrange(65536) for _ in range(2048)]
    prompt_hashes: list[BlockHash] = [rng.getrandbits(64) for _ in range(len(prompt) // BLOCK)]
    index.apply("static", [BlockStored(prompt_hashes, None, prompt, BLOCK, medium="GPU")])
    pods = [f"pod-{i}" for i in range(args.pods)]

    def score() -> int:
        keys = index.keys(prompt, MODEL)
        return index.match(keys, [*pods, "static"])["static"].matched_blocks

    gc.callbacks.append(GC)
    ctx = multiprocessing.get_context("spawn")
    parent, child_conn = ctx.Pipe()
    child = ctx.Process(target=publisher_process, args=(child_conn, opts), daemon=True)
    listener.start()
    child.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the publisher process did not start")
        endpoints = parent.recv()
        for pod, (endpoint, replay) in zip(pods, endpoints, strict=True):
            listener.add_pod(PodSource(pod, endpoint, replay_endpoint=replay, model=MODEL))
        sampler = Sampler(listener)
        assert score() == len(prompt_hashes)
        log(f"idle scoring for {args.idle_s} s")
        idle = score_window(score, args.idle_s, sampler, "idle")
        parent.send("go")
        log(f"overload: {args.pods} pods x {args.batch_blocks}-block batches for {args.duration} s")
        rss_guard = {"hit": False}

        def over_limit() -> bool:
            if rss_bytes() / MB > args.rss_limit_mb and not rss_guard["hit"]:
                rss_guard["hit"] = True
                parent.send("stop")
                log("RSS limit reached: overload stopped early")
            return parent.poll(0)  # the child's report: publishing is over

        t_over = time.monotonic()
        loaded = score_window(score, args.duration + 30, sampler, "overload", until=over_limit)
        overload_s = time.monotonic() - t_over
        report = parent.recv() if parent.poll(30) else None
        if report is None:
            raise RuntimeError("the publisher process did not report")
        at_stop = listener.stats()
        log("publishers stopped; waiting for the listener to go quiet")
        t_rec = time.monotonic()
        quiet = Quiet(listener)
        recovery = score_window(score, args.recover_s, sampler, "recovery", until=quiet)
        recovery_s = time.monotonic() - t_rec - quiet.window_s
        after_overload = compare(index, pods, report["truth"])
        after_overload_stats = listener.stats()
        log("light traffic resumes (10 small batches per pod over 1 s)")
        parent.send("resume")
        resumed = score_window(score, 30, sampler, "resume", until=lambda: parent.poll(0))
        report2 = parent.recv() if parent.poll(30) else None
        if report2 is None:
            raise RuntimeError("the publisher process did not report after resuming")
        quiet = Quiet(listener)
        resumed += score_window(score, args.recover_s, sampler, "resume", until=quiet)
        after_resume = compare(index, pods, report2["truth"])
        after_idle = score_window(score, args.idle_s, sampler, "after")
        final = listener.stats()
        published_blocks = sum(report["published_batches"]) * args.batch_blocks
        counters = (
            "batches",
            "events_applied",
            "gaps",
            "replays",
            "replays_incomplete",
            "replay_timeouts",
            "cleared_on_gap",
            "buffer_drops",
            "decode_errors",
            "apply_errors",
        )
        rss = {phase: sampler.rss_mb(phase) for phase in PHASES}
        result.update(
            {
                "published": {
                    "batches": sum(report["published_batches"]),
                    "blocks": published_blocks,
                    "seconds": report["seconds"],
                    "blocks_per_s": round(published_blocks / report["seconds"]),
                },
                "applied_during_overload": {
                    "batches": at_stop["batches"],
                    "blocks_per_s_approx": round(
                        at_stop["batches"] * args.batch_blocks / max(overload_s, 1e-9)
                    ),
                },
                "listener_at_stop": {k: at_stop.get(k, 0) for k in counters},
                "listener_after_overload": {k: after_overload_stats.get(k, 0) for k in counters},
                "listener_final": {k: final.get(k, 0) for k in counters},
                "recovery_s": round(recovery_s, 2),
                "rss_mb": {
                    "idle": max(rss["idle"], default=None),
                    "overload_max": max(rss["overload"], default=None),
                    "overload_last": rss["overload"][-1] if rss["overload"] else None,
                    "recovery_max": max(rss["recovery"] + rss["resume"], default=None),
                    "after": rss["after"][-1] if rss["after"] else None,
                    "rss_limit_hit": rss_guard["hit"],
                },
                "index": {
                    "entries": final["index"]["entries"],
                    "pod_blocks": final["index"]["pod_blocks"],
                    "orphans_pending": final["index"]["orphans_pending"],
                },
                "truth_vs_index": {
                    "after_overload_quiet": after_overload,
                    "after_light_traffic": after_resume,
                },
                "score": {
                    "idle": latency_stats(idle),
                    "overload": latency_stats(loaded),
                    "recovery": latency_stats(recovery),
                    "light_traffic": latency_stats(resumed),
                    "after": latency_stats(after_idle),
                },
                "gc_gen2_pauses_ms": GC.summary(),
                "rss_timeline": sampler.samples[:: max(1, len(sampler.samples) // 60)],
            }
        )
        parent.send("exit")
    finally:
        listener.stop()
        child.join(15)
        if child.is_alive():
            child.terminate()
            child.join(5)
        parent.close()
    result["environment"] = environment()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
