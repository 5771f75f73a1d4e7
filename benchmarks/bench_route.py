"""End-to-end ``Pipeline.route()`` for an 8k-token chat request over 64 pods.

The pipeline is the real one (kv-prefix 3 + kv-usage 2 + queue 2, max-score picker, the
shipped ``kvaware/tiny-chat`` tokenizer). Its index holds the request's chat prefix in full
on 4 pods and in part on 12, fed through ``PrefixIndex.apply`` with the token ids the
tokenizer produces, plus unrelated blocks on every pod. Timed, per route (``--iterations``):

- ``cold``: the tokenizer's caches are emptied before each route (full render + encode);
- ``warm``: the same request again (exact tokenization cache hit);
- ``shared_prefix``: the same long system prompt and history, a new last question each time
  (the segment cache re-encodes only the new part).

Each figure: route latency p50/p99 (ms) and the share of it spent tokenizing. Target: warm
p50 <= 1 ms. Run ``python benchmarks/bench_route.py [--quick]``; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

from _common import environment, log

from kvaware_scorer.events import BlockStored
from kvaware_scorer.pipeline import Pipeline
from kvaware_scorer.tokenization import TINY_CHAT_DIR, TINY_CHAT_MODEL
from kvaware_scorer.types import Endpoint, RoutingRequest

TARGET_WARM_P50_MS = 1.0
WORDS = (
    "route",
    "cache",
    "prefix",
    "token",
    "block",
    "pod",
    "score",
    "event",
    "model",
    "request",
    "latency",
    "queue",
    "engine",
    "shared",
    "system",
    "prompt",
)


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + str(rng.randrange(100)) for _ in range(words))


def _messages(rng: random.Random, system_words: int, question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": _text(random.Random(1), system_words)},
        {"role": "user", "content": "first question " + _text(random.Random(2), 40)},
        {"role": "assistant", "content": "an answer " + _text(random.Random(3), 60)},
        {"role": "user", "content": question},
    ]


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _measure(
    pipeline: Pipeline, make: Any, iterations: int, before: Any = None
) -> dict[str, float]:
    totals: list[float] = []
    tokenize: list[float] = []
    for i in range(iterations):
        if before is not None:
            before()
        request = make(i)
        started = time.perf_counter()
        decision = pipeline.route(request)
        totals.append((time.perf_counter() - started) * 1e3)
        tokenize.append(decision.timings_ms["tokenize"])
    return {
        "p50_ms": round(_pct(totals, 50), 4),
        "p99_ms": round(_pct(totals, 99), 4),
        "mean_ms": round(sum(totals) / len(totals), 4),
        "tokenize_share": round(sum(tokenize) / sum(totals), 4),
        "tokenize_p50_ms": round(_pct(tokenize, 50), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pods", type=int, default=64)
    parser.add_argument(
        "--system-words", type=int, default=2300, help="sizes the prompt (~8k tokens)"
    )
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    if args.quick:
        args.iterations = 40
    rng = random.Random(0)
    config = {
        "listener": {"enabled": False},
        "load": {"scrape": False},
        "tokenizers": [{"model": TINY_CHAT_MODEL, "source": str(TINY_CHAT_DIR)}],
        "scorers": [
            {"type": "kv-prefix", "weight": 3},
            {"type": "kv-usage", "weight": 2},
            {"type": "queue", "weight": 2},
        ],
    }
    pipeline = Pipeline(config)
    pods = [Endpoint(f"pod-{i}", models=frozenset({TINY_CHAT_MODEL})) for i in range(args.pods)]
    pipeline.set_endpoints(pods)
    pipeline.start()
    tokenizer = pipeline.tokenizers[TINY_CHAT_MODEL]
    question = "the last question " + _text(rng, 30)
    base = RoutingRequest(
        model=TINY_CHAT_MODEL, messages=_messages(rng, args.system_words, question)
    )
    pipeline.prepare(base)
    tokens = base.token_ids or []
    log(f"request: {len(tokens)} tokens, {len(tokens) // 16} blocks; {args.pods} pods")
    # The prefix on 4 pods in full, on 12 in part; unrelated blocks everywhere.
    for i, pod in enumerate(pods):
        depth = len(tokens) // 16 if i < 4 else (len(tokens) // 16) * (i - 3) // 13 if i < 16 else 0
        prefix = tokens[: depth * 16]
        hashes = [rng.getrandbits(64) for _ in range(depth)]
        if hashes:
            pipeline.index.apply(pod.id, [BlockStored(hashes, None, prefix, 16, medium="GPU")])
        noise = [rng.randrange(8000) for _ in range(16 * 512)]
        pipeline.index.apply(
            pod.id,
            [BlockStored([rng.getrandbits(64) for _ in range(512)], None, noise, 16, medium="GPU")],
        )
        pipeline.load.scraped(pod.id, {"waiting": float(i % 5), "running": 8.0, "kv_usage": 0.5})

    def same(_: int) -> RoutingRequest:
        return RoutingRequest(model=TINY_CHAT_MODEL, messages=base.messages)

    def new_question(i: int) -> RoutingRequest:
        messages = list(base.messages or [])
        messages[-1] = {"role": "user", "content": f"question {i} " + _text(random.Random(i), 30)}
        return RoutingRequest(model=TINY_CHAT_MODEL, messages=messages)

    log("cold")
    cold = _measure(pipeline, same, max(10, args.iterations // 5), before=tokenizer.clear_cache)
    log("warm")
    same(0)
    warm = _measure(pipeline, same, args.iterations)
    log("shared prefix")
    shared = _measure(pipeline, new_question, args.iterations)
    decision = pipeline.route(same(0))
    pipeline.stop()
    report = {
        "benchmark": "route",
        "environment": environment(),
        "pods": args.pods,
        "prompt_tokens": len(tokens),
        "scorers": "kv-prefix 3 + kv-usage 2 + queue 2",
        "chosen": decision.endpoint.id,
        "predicted_cached_tokens": decision.predicted_cached_tokens,
        "cold": cold,
        "warm": warm,
        "shared_prefix": shared,
        "target_warm_p50_ms": TARGET_WARM_P50_MS,
        "warm_target_met": warm["p50_ms"] <= TARGET_WARM_P50_MS,
        "tokenizer_stats": tokenizer.stats(),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
