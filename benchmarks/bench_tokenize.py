"""Request tokenization cost, and what the exact and segment caches save.

Workload: one chat request of about 8k tokens (``--tokens``): a long system prompt (CPython
stdlib source, so the text is code-like and deterministic for a Python version) and three
earlier user/assistant turns, then a last user question. For each tokenizer (the shipped
``kvaware/tiny-chat`` and, when ``scripts/fetch_test_tokenizers.sh`` has fetched it, Qwen3's
real tokenizer) it measures, in milliseconds over ``--iterations`` calls:

- ``reference``: transformers' ``apply_chat_template(..., tokenize=True)``, i.e. what
  tokenization costs without this module (vLLM's own path);
- ``cold``: :meth:`RequestTokenizer.chat` with both caches emptied before each call;
- ``warm``: the same request again (exact-cache hit: render, digest, copy the ids);
- ``shared_prefix``: same system prompt and turns, a new last user question every call
  (exact miss; the segment cache serves everything but the new turn);
- ``shared_prefix_no_segment_cache``: the same with the segment cache disabled, i.e. what
  the segment cache saves.

Each case reports p50/p99/mean ms and tokens/s at the p50. ``load_s`` is the start-up cost
of :func:`load_tokenizer` once transformers is imported (the first load, import included,
is reported as ``first_load_with_transformers_import_s``). Prints one JSON object
on stdout; progress goes to stderr. Run ``python benchmarks/bench_tokenize.py [--quick]
[--iterations N] [--tokens N] [--qwen3-dir DIR]``. Timings vary a lot on shared VMs; compare
cases with each other rather than across machines.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvaware_scorer.tokenization import (
    CacheConfig,
    RequestTokenizer,
    TokenizerSpec,
    load_tokenizer,
    tiny_chat_spec,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers is imported lazily, after this
ROOT = Path(__file__).resolve().parent.parent
_T0 = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON report)."""
    sys.stderr.write(f"[{time.monotonic() - _T0:6.1f}s] {message}\n")
    sys.stderr.flush()


def stdlib_text(chars: int) -> str:
    """About ``chars`` characters of stdlib source (sorted files, deterministic)."""
    parts: list[str] = []
    total = 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    return "".join(parts)[:chars]


def build_chat(tokenizer: RequestTokenizer, target_tokens: int) -> list[dict[str, str]]:
    """System prompt sized so that the whole chat is about ``target_tokens`` tokens."""
    turns: list[dict[str, str]] = []
    corpus = stdlib_text(200_000)
    for i in range(3):
        turns.append(
            {"role": "user", "content": f"Question {i}: " + corpus[i * 900 : i * 900 + 1500]}
        )
        turns.append(
            {
                "role": "assistant",
                "content": f"Answer {i}: " + corpus[5000 + i * 700 : 5000 + i * 700 + 1500],
            }
        )
    last = {"role": "user", "content": "Now summarise the module above in three sentences."}
    base = len(tokenizer.chat([{"role": "system", "content": ""}, *turns, last]))
    chars = target_tokens * 3  # first guess, then corrections by the system prompt's ratio
    for _ in range(8):
        system = {"role": "system", "content": corpus[20_000 : 20_000 + chars]}
        messages = [system, *turns, last]
        n = len(tokenizer.chat(messages))
        if abs(n - target_tokens) <= target_tokens // 200:
            break
        chars_per_token = len(system["content"]) / max(1, n - base)
        chars = max(100, chars + int((target_tokens - n) * chars_per_token))
    tokenizer.clear_cache()
    return messages


def measure(fn: Callable[[int], Any], iterations: int) -> dict[str, float]:
    """p50/p99/mean/min ms of ``fn(i)`` over ``iterations`` calls (after one warm-up)."""
    fn(-1)
    samples: list[float] = []
    for i in range(iterations):
        start = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - start) * 1e3)
    ordered = sorted(samples)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]

    return {
        "p50_ms": round(pct(0.50), 3),
        "p99_ms": round(pct(0.99), 3),
        "mean_ms": round(sum(samples) / len(samples), 3),
        "min_ms": round(ordered[0], 3),
    }


def with_rate(stats: dict[str, float], tokens: int) -> dict[str, float]:
    """Add tokens/s at the p50 latency."""
    stats["tokens_per_s"] = round(tokens / (stats["p50_ms"] / 1e3)) if stats["p50_ms"] else 0.0
    return stats


def bench_one(spec: TokenizerSpec, target: int, iterations: int) -> dict[str, Any]:
    """All cases for one tokenizer."""
    started = time.perf_counter()
    tok = load_tokenizer(spec)
    load_s = time.perf_counter() - started
    nocache = load_tokenizer(spec, cache=CacheConfig(segment_entries=0))
    hf = sys.modules["transformers"].AutoTokenizer.from_pretrained(
        spec.source, local_files_only=True
    )
    messages = build_chat(tok, target)
    ids = tok.chat(messages)
    tokens = len(ids)
    assert ids == list(
        hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    ), "parity"
    log(f"{spec.model}: {tokens} tokens, mode {tok.mode}, loaded in {load_s:.2f} s")
    out: dict[str, Any] = {
        "load_s": round(load_s, 3),
        "mode": tok.mode,
        "vocab_size": tok.vocab_size,
        "request_tokens": tokens,
        "system_prompt_chars": len(messages[0]["content"]),
        "messages": len(messages),
    }

    out["reference"] = with_rate(
        measure(
            lambda _: hf.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            ),
            iterations,
        ),
        tokens,
    )

    def cold(_: int) -> None:
        tok.clear_cache()
        tok.chat(messages)

    out["cold"] = with_rate(measure(cold, iterations), tokens)
    tok.chat(messages)
    out["warm"] = with_rate(measure(lambda _: tok.chat(messages), iterations), tokens)

    def shared(target_tok: RequestTokenizer) -> Callable[[int], None]:
        def run(i: int) -> None:
            question = {"role": "user", "content": f"New question number {i}: what does it do?"}
            target_tok.chat([*messages[:-1], question])

        return run

    for name, target_tok in (("shared_prefix", tok), ("shared_prefix_no_segment_cache", nocache)):
        target_tok.clear_cache()
        target_tok.chat(messages)  # the prefix has been seen once
        before = target_tok.stats()
        stats = with_rate(measure(shared(target_tok), iterations), tokens)
        after = target_tok.stats()
        calls = iterations + 1
        stats["segment_hit_rate"] = round(
            (after["segment_hits"] - before["segment_hits"])
            / max(
                1,
                after["segment_hits"]
                + after["segment_misses"]
                - before["segment_hits"]
                - before["segment_misses"],
            ),
            3,
        )
        stats["ids_encoded_per_call"] = round(
            (after["tokens_encoded"] - before["tokens_encoded"]) / calls, 1
        )
        out[name] = stats
    out["speedup_warm_vs_cold"] = round(out["cold"]["p50_ms"] / out["warm"]["p50_ms"], 1)
    out["speedup_shared_prefix_vs_cold"] = round(
        out["cold"]["p50_ms"] / out["shared_prefix"]["p50_ms"], 1
    )
    out["stats"] = {k: v for k, v in tok.stats().items() if k != "errors"}
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=8192, help="target request size")
    parser.add_argument("--quick", action="store_true", help="10 iterations (smoke run)")
    parser.add_argument(
        "--qwen3-dir",
        type=Path,
        default=Path(os.environ.get("KVAWARE_TOKENIZER_CACHE", str(ROOT / ".cache" / "tokenizers")))
        / "qwen3",
    )
    args = parser.parse_args(argv)
    iterations = 10 if args.quick else args.iterations

    started = time.perf_counter()
    load_tokenizer(tiny_chat_spec())  # first load: includes importing transformers
    first_load_s = time.perf_counter() - started
    transformers = sys.modules["transformers"]
    import tokenizers

    report: dict[str, Any] = {
        "benchmark": "tokenize",
        "python": platform.python_version(),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "cpus": os.cpu_count(),
        "iterations": iterations,
        "target_tokens": args.tokens,
        "first_load_with_transformers_import_s": round(first_load_s, 3),
    }
    report["tiny-chat"] = bench_one(tiny_chat_spec(), args.tokens, iterations)
    if (args.qwen3_dir / "tokenizer.json").is_file():
        report["qwen3"] = bench_one(
            TokenizerSpec("Qwen/Qwen3-8B", str(args.qwen3_dir)), args.tokens, iterations
        )
    else:
        report["qwen3"] = {
            "skipped": f"no tokenizer.json in {args.qwen3_dir}; "
            "run scripts/fetch_test_tokenizers.sh"
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
