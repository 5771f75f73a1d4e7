"""The Redis-shared index: score latency and ingest rate, in memory vs Redis writer vs reader.

Starts its own ``redis-server`` (127.0.0.1, an ephemeral port, ``--save "" --appendonly
no``, a temporary directory; stopped at the end, whatever happens). With two or more CPUs
the server is pinned to one CPU and this process to another (``--no-pin`` to disable), so
the figures do not include the two fighting over a core.

Score (as ``bench_score.py``): the fleet of ``_common.build_fleet`` (64 pods, 4,096
blocks each by default: 262,144 (block, pod) entries) is applied to a ``PrefixIndex`` and,
with the same events, to a ``RedisPrefixIndex`` writer. The 8,192-token prompt (512
blocks) is held in full by 4 pods, in part by 12, not at all by 48. Timed per call after a
warm-up, ``keys`` + ``match`` with the 64 pod names, for:

- ``memory``: ``PrefixIndex``;
- ``redis_writer``: the writer's own ``match()`` (in memory; it only adds the mirroring);
- ``redis_reader``: ``RedisIndexReader`` (one pipelined round trip to Redis per score);
- ``redis_reader_all_pods``: the same with ``pods=None`` (the pod list read too);
- ``redis_ping``: one ``PING`` round trip on the reader's connection (the floor).

Ingest: ``_common.PodSim`` streams (64-block ``BlockStored`` payloads and 64-event
``BlockRemoved`` payloads, half and half once the pods are full), applied with
``index.apply()`` one batch at a time after an untimed fill, for ``memory`` and
``redis_writer`` (each batch is one ``MULTI``/``EXEC`` to Redis). Blocks/s.

Run ``python benchmarks/bench_redis.py [--quick]``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from _common import (
    BLOCK_SIZE,
    BLOCKS_PER_EVENT,
    MODEL,
    PodSim,
    build_fleet,
    environment,
    latency_stats,
    log,
    pin_process,
    random_tokens,
    time_loop,
)

from kvaware_scorer.index import PrefixIndex
from kvaware_scorer.redis_index import RedisIndexReader, RedisPrefixIndex, _pack

_READY_TIMEOUT_S = 10.0


@contextlib.contextmanager
def redis_server(cpu: int | None) -> Iterator[str]:
    """A private redis-server; yields its URL and always stops it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found on PATH (apt-get install -y redis-server)")
    workdir = tempfile.mkdtemp(prefix="kvaware-bench-redis-")
    proc: subprocess.Popen[bytes] | None = None
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
                "--logfile",
                os.path.join(workdir, "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if cpu is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(proc.pid, {cpu})
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"redis-server did not start (see {workdir}/redis.log)")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


def redis_info(reader: RedisIndexReader) -> dict[str, Any]:
    dbsize, info = reader._link.call([_pack(b"DBSIZE"), _pack(b"INFO", b"memory")])
    fields = dict(
        line.split(":", 1)
        for line in info.decode().splitlines()
        if ":" in line and not line.startswith("#")
    )
    return {"keys": dbsize, "used_memory_bytes": int(fields["used_memory"])}


def ingest(index: PrefixIndex, args: argparse.Namespace) -> dict[str, Any]:
    sims = [
        PodSim(random.Random(args.seed * 1000 + i), capacity=args.ingest_capacity)
        for i in range(args.ingest_pods)
    ]
    full = [False] * len(sims)
    k = 0
    for _ in range(10_000_000):  # fill until every pod has evicted once (untimed)
        if all(full):
            break
        i = k % len(sims)
        kind, batch = sims[i].next_batch()
        full[i] = full[i] or kind == "removed"
        index.apply(f"pod-{i}", batch.events, rank=0)
        k += 1
    batches = []
    for j in range(args.ingest_batches):
        i = (k + j) % len(sims)
        batches.append((f"pod-{i}", sims[i].next_batch()[1].events))
    counters_before = dict(getattr(index, "redis_counters", {}))
    gc.collect()
    clock = time.perf_counter
    start = clock()
    for pod, events in batches:
        index.apply(pod, events, rank=0)
    seconds = clock() - start
    blocks = len(batches) * BLOCKS_PER_EVENT
    out: dict[str, Any] = {
        "batches": len(batches),
        "blocks": blocks,
        "seconds": round(seconds, 3),
        "blocks_per_s": round(blocks / seconds) if seconds else None,
        "batches_per_s": round(len(batches) / seconds) if seconds else None,
        "index_keys": len(index),
    }
    if isinstance(index, RedisPrefixIndex):
        out["redis_counters_timed"] = {
            name: count - counters_before.get(name, 0)
            for name, count in index.redis_counters.items()
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small index, few iterations")
    parser.add_argument("--pods", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--blocks-per-pod", type=int, default=4096)
    parser.add_argument("--full-pods", type=int, default=4)
    parser.add_argument("--partial-pods", type=int, default=12)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ingest-pods", type=int, default=8)
    parser.add_argument("--ingest-capacity", type=int, default=8192)
    parser.add_argument("--ingest-batches", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pin", action="store_true", help="do not pin Redis and this process")
    args = parser.parse_args(argv)
    if args.quick:
        args.blocks_per_pod = min(args.blocks_per_pod, 1024)
        args.iterations = min(args.iterations, 300)
        args.warmup = min(args.warmup, 30)
        args.ingest_capacity = min(args.ingest_capacity, 2048)
        args.ingest_batches = min(args.ingest_batches, 500)

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = not args.no_pin and len(cpus) >= 2
    redis_cpu = cpus[0] if pin else None
    if pin:
        pin_process(set(cpus[1:]))

    pods = [f"pod-{i}" for i in range(args.pods)]
    tokens = random_tokens(random.Random(args.seed + 1), args.prompt_tokens)
    fleet_args: dict[str, Any] = {
        "pods": pods,
        "blocks_per_pod": args.blocks_per_pod,
        "prompt_tokens": tokens,
        "full_pods": args.full_pods,
        "partial_pods": args.partial_pods,
        "seed": args.seed,
    }
    with redis_server(redis_cpu) as url:
        memory = PrefixIndex(block_size=BLOCK_SIZE, default_model=MODEL)
        log(f"building the in-memory index: {args.pods} pods x {args.blocks_per_pod:,} blocks")
        fleet = build_fleet(memory, **fleet_args)
        writer = RedisPrefixIndex(
            redis_url=url, namespace="bench", block_size=BLOCK_SIZE, default_model=MODEL
        )
        reader: RedisIndexReader | None = None
        try:
            log("building the same index through the Redis writer")
            writer_fleet = build_fleet(writer, **fleet_args)
            reader = RedisIndexReader(redis_url=url, namespace="bench", block_size=BLOCK_SIZE)
            depths = fleet.pop("prompt_depth_by_pod")
            writer_fleet.pop("prompt_depth_by_pod")
            keys = memory.keys(tokens, MODEL)
            expected = memory.match(keys, pods)
            check = {
                "prompt_blocks": len(keys),
                "as_built": {p: m.matched_blocks for p, m in expected.items()}
                == {p: depths.get(p, 0) for p in pods},
                "writer_equals_memory": writer.match(keys, pods) == expected,
                "reader_equals_memory": reader.match(keys, pods) == expected,
                "reader_all_pods_equals_memory": reader.match(keys) == memory.match(keys),
            }
            if not all(v for k, v in check.items() if k != "prompt_blocks"):
                log(f"WARNING: results differ: {check}")
            info = redis_info(reader)
            ping = [_pack(b"PING")]
            assert reader is not None
            rd = reader

            def score_memory() -> None:
                memory.match(memory.keys(tokens, MODEL), pods)

            def score_writer() -> None:
                writer.match(writer.keys(tokens, MODEL), pods)

            def score_reader() -> None:
                rd.match(rd.keys(tokens, MODEL), pods)

            def score_reader_all() -> None:
                rd.match(rd.keys(tokens, MODEL))

            def keys_only() -> None:
                rd.keys(tokens, MODEL)

            def redis_ping() -> None:
                rd._link.call(ping)

            timings: dict[str, Any] = {}
            for name, func in (
                ("keys", keys_only),
                ("memory", score_memory),
                ("redis_writer", score_writer),
                ("redis_reader", score_reader),
                ("redis_reader_all_pods", score_reader_all),
                ("redis_ping", redis_ping),
            ):
                gc.collect()
                log(f"timing {name}: {args.warmup} warm-up + {args.iterations} calls")
                timings[name] = latency_stats(time_loop(func, args.iterations, args.warmup))
            reader_counters = dict(reader.counters)

            log("ingest: in memory")
            ingest_memory = ingest(PrefixIndex(block_size=BLOCK_SIZE, default_model=MODEL), args)
            log("ingest: through the Redis writer")
            ingest_writer_index = RedisPrefixIndex(
                redis_url=url, namespace="bench-ingest", block_size=BLOCK_SIZE, default_model=MODEL
            )
            try:
                ingest_writer = ingest(ingest_writer_index, args)
            finally:
                ingest_writer_index.close()
        finally:
            writer.close()
            if reader is not None:
                reader.close()

    try:
        import hiredis  # noqa: F401

        parser_name = "hiredis"
    except ImportError:
        parser_name = "python"
    import redis as redis_py

    report = {
        "benchmark": "redis",
        "params": {k: v for k, v in vars(args).items()},
        "environment": {
            **environment(),
            "redis_py": redis_py.__version__,
            "redis_reply_parser": parser_name,
            "redis_server": subprocess.run(
                ["redis-server", "--version"],
                check=False,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.split()[2],
            "pinned": {"redis_cpu": redis_cpu, "bench_cpus": cpus[1:]} if pin else None,
        },
        "fleet": fleet,
        "fleet_through_writer": writer_fleet,
        "redis_after_build": info,
        "match_check": check,
        "score_latency_us": timings,
        "reader_counters": reader_counters,
        "ingest": {"memory": ingest_memory, "redis_writer": ingest_writer},
        "unix_time": round(time.time()),
    }
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
