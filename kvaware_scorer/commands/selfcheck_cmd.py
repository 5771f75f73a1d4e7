"""``kvaware-scorer selfcheck``: the whole engine end to end on loopback, in seconds.

Starts a listener bound on an ephemeral 127.0.0.1 port and three publishers that send
vLLM-format KV events (the bytes vLLM 0.33 sends) for a shared system prompt, then scores
a new request against the fleet and prints, per pod, the matched prefix and score. It
then drops a batch on one pod and checks that the gap is detected and that pod's
entries are cleared. Exit status 0 when every check holds. Needs no GPU and no network.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from kvaware_scorer.events import BlockHash, BlockStored, EventBatch
from kvaware_scorer.index import PrefixIndex
from kvaware_scorer.listener import KVEventListener
from kvaware_scorer.publisher import EventPublisher

MODEL = "demo-model"
BLOCK = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="token generator seed (0)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for events")


def _store(tokens: list[int], hashes: list[int], lo: int, hi: int) -> EventBatch:
    block_hashes: list[BlockHash] = list(hashes[lo:hi])
    event = BlockStored(
        block_hashes=block_hashes,
        parent_block_hash=hashes[lo - 1] if lo else None,
        token_ids=tokens[lo * BLOCK : hi * BLOCK],
        block_size=BLOCK,
        medium="GPU",
        group_idx=0,
    )
    return EventBatch(ts=time.time(), events=[event])


def _wait(condition: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    system = [rng.randrange(32_000) for _ in range(64 * BLOCK)]  # 1,024-token system prompt
    question = [rng.randrange(32_000) for _ in range(8 * BLOCK)]
    other = [rng.randrange(32_000) for _ in range(48 * BLOCK)]
    index = PrefixIndex(block_size=BLOCK, default_model=MODEL)
    listener = KVEventListener(index, bind=["tcp://127.0.0.1:0"])
    listener.start()
    pubs: dict[str, EventPublisher] = {}
    checks: list[tuple[str, bool]] = []
    try:
        for pod in ("pod-0", "pod-1", "pod-2"):
            pub = EventPublisher(listener.bound_endpoints[0], topic=f"kv@{pod}@{MODEL}")
            pub.start()
            pubs[pod] = pub
        checks.append(
            ("publishers subscribed", all(p.wait_subscribed(args.timeout) for p in pubs.values()))
        )
        hashes = [rng.getrandbits(64) for _ in range(128)]
        other_hashes = [rng.getrandbits(64) for _ in range(48)]
        pubs["pod-0"].publish(_store(system, hashes, 0, 64))  # the whole system prompt
        pubs["pod-1"].publish(_store(other, other_hashes, 0, 48))  # another tenant's prompt
        pubs["pod-2"].publish(_store(system, hashes, 0, 16))  # the first 256 tokens only
        checks.append(
            ("events applied", _wait(lambda: listener.stats()["batches"] == 3, args.timeout))
        )

        keys = index.keys(system + question, MODEL)
        started = time.perf_counter()
        results = index.match(keys)
        elapsed_us = (time.perf_counter() - started) * 1e6
        print(
            f"request: {len(system + question)} tokens, {len(keys)} blocks; "
            f"scored {len(results)} pods in {elapsed_us:.0f} us"
        )
        print(f"{'pod':8} {'matched blocks':>14} {'matched tokens':>14} {'score':>6}")
        for pod in sorted(results):
            r = results[pod]
            print(f"{pod:8} {r.matched_blocks:>14} {r.matched_tokens:>14} {r.score:>6.3f}")
        best = max(results.values(), key=lambda r: r.score)
        checks.append(
            ("pod-0 holds the longest prefix", best.pod == "pod-0" and best.matched_blocks == 64)
        )
        checks.append(("pod-2 holds 16 blocks", results["pod-2"].matched_blocks == 16))
        checks.append(("pod-1 holds none of it", results["pod-1"].matched_blocks == 0))

        pubs["pod-2"].publish(_store(system, hashes, 16, 32), deliver=False)  # lost in transit
        pubs["pod-2"].publish(_store(system, hashes, 32, 48))
        gap_seen = _wait(lambda: listener.stats()["cleared_on_gap"] == 1, args.timeout)
        after = index.match(keys)["pod-2"].matched_blocks
        checks.append(("a sequence gap clears the pod (no stale entries)", gap_seen and after == 0))
        stats = listener.stats()
        print(
            f"listener: {stats['batches']} batches, {stats['events_applied']} events, "
            f"{stats['gaps']} gap, {stats['decode_errors']} decode errors; "
            f"index: {len(index)} keys"
        )
    finally:
        for pub in pubs.values():
            pub.stop()
        listener.stop()
    for name, ok in checks:
        print(f"[{'ok' if ok else 'FAILED'}] {name}")
    failed = [name for name, ok in checks if not ok]
    if failed:
        print(f"selfcheck failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("selfcheck passed")
    return 0
