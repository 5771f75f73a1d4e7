"""Run several policies on the same arrivals over a QPS ladder; table, JSON and plot.

``results.json`` layout: ``{"workload": {...}, "fleet": {...}, "qps": [...],
"policies": {name: {"hit_rate", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s",
"throughput_tok_s", "queue_mean", "queue_max", "load_imbalance", "by_qps": {qps: {...}}}},
"oracle_hit_rate": ..., "oracle_by_qps": {...}}``. The top-level figures of a policy are
those at the highest QPS of the ladder (the most loaded point), where routing matters most.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from kvaware_scorer.keys import KeyHasher
from kvaware_scorer.sim.engine import EngineConfig, SimRequest
from kvaware_scorer.sim.fleet import Policy, VirtualFleet
from kvaware_scorer.sim.workloads import RequestStream, WorkloadSpec


@dataclass(frozen=True)
class Comparison:
    workload: WorkloadSpec
    engine: EngineConfig
    num_engines: int
    qps: Sequence[float]
    duration_s: float
    seed: int = 0
    event_lag_s: float = 0.005
    warmup_s: float = 30.0  # arrivals before this are simulated but not measured


def scale_engine(config: EngineConfig, scale: float) -> EngineConfig:
    """A smaller engine that behaves like ``config`` in time, for a workload scaled by ``scale``.

    Token lengths shrink by ``scale``; so do KV capacity and the per-step token budget,
    while every step-time coefficient grows by ``1/scale``. A scaled request then takes as
    long as the full-size one (same prefill time, ``scale`` times fewer but longer decode
    steps), so queueing and cache pressure keep their shape with fewer tokens to simulate.
    The price: per-step latency (ITL, the TTFT floor) is ``1/scale`` times the real one.
    """
    if scale == 1.0:
        return config
    st = config.step_time
    return dataclasses.replace(
        config,
        num_gpu_blocks=max(1, round(config.num_gpu_blocks * scale)),
        # vLLM requires a budget of at least max_num_seqs tokens per step.
        max_num_batched_tokens=max(
            config.max_num_seqs, config.block_size, round(config.max_num_batched_tokens * scale)
        ),
        max_model_len=(
            None
            if config.max_model_len is None
            else max(config.block_size, round(config.max_model_len * scale))
        ),
        step_time=dataclasses.replace(
            st,
            base_s=st.base_s / scale,
            per_prefill_token_s=st.per_prefill_token_s / scale,
            per_decode_seq_s=st.per_decode_seq_s / scale,
            per_context_token_s=st.per_context_token_s / scale,
        ),
    )


def oracle_hit_rate(requests: Sequence[SimRequest], block_size: int, since_s: float = 0.0) -> float:
    """Hit rate with one infinite cache holding every block seen before (an upper bound
    for any routing over these engines). Like vLLM, a fully cached prompt still recomputes
    its last block."""
    hasher = KeyHasher(block_size)
    seen: set[int] = set()
    prompt = cached = 0
    for request in sorted(requests, key=lambda r: r.arrival_s):
        keys = hasher.request_keys(request.token_ids, "oracle")
        hit = 0
        for key in keys:
            if key not in seen:
                break
            hit += 1
        if hit and hit * block_size >= len(request.token_ids):
            hit -= 1
        if request.arrival_s >= since_s:
            prompt += len(request.token_ids)
            cached += hit * block_size
        seen.update(keys)
    return cached / prompt if prompt else 0.0


def run_comparison(
    comparison: Comparison,
    policies: Sequence[Callable[[], Policy]],
    *,
    progress: TextIO | None = sys.stderr,
) -> dict[str, Any]:
    """Every policy at every QPS, same arrivals per QPS. Returns the results mapping."""
    stream = RequestStream(comparison.workload, comparison.seed)
    results: dict[str, Any] = {
        "workload": asdict(comparison.workload),
        "fleet": {
            "engines": comparison.num_engines,
            "engine": _engine_dict(comparison.engine),
            "duration_s": comparison.duration_s,
            "warmup_s": comparison.warmup_s,
            "event_lag_s": comparison.event_lag_s,
        },
        "qps": list(comparison.qps),
        "policies": {},
        "oracle_by_qps": {},
    }
    total_runs = len(policies) * len(comparison.qps)
    run = 0
    started = time.monotonic()
    last_shown = [0.0]
    for qps in comparison.qps:
        warmup = comparison.warmup_s
        template = stream.requests(qps, warmup + comparison.duration_s)
        results["oracle_by_qps"][str(qps)] = oracle_hit_rate(
            template, comparison.engine.block_size, since_s=warmup
        )
        for make in policies:
            policy = make()
            requests = [_fresh(r) for r in template]
            fleet = VirtualFleet(
                comparison.engine,
                comparison.num_engines,
                policy,
                event_lag_s=comparison.event_lag_s,
            )

            def show(
                fraction: float, _run: int = run, _name: str = policy.name, _qps: float = qps
            ) -> None:
                now = time.monotonic()
                if progress is not None and now - last_shown[0] >= 0.25:
                    last_shown[0] = now
                    _bar(
                        progress, (_run + fraction) / total_runs, f"{_name} @ {_qps:g} qps", started
                    )

            summary = fleet.run(requests, progress=show).summary(since_s=warmup)
            entry = results["policies"].setdefault(policy.name, {"by_qps": {}})
            entry["by_qps"][str(qps)] = summary
            run += 1
    if progress is not None:
        _bar(progress, 1.0, "done", started)
        progress.write("\n")
    top = str(comparison.qps[-1])
    for entry in results["policies"].values():
        entry.update(entry["by_qps"][top])
    results["oracle_hit_rate"] = results["oracle_by_qps"][top]
    return results


def _fresh(request: SimRequest) -> SimRequest:
    return SimRequest(
        request.request_id,
        request.token_ids,
        request.max_tokens,
        request.arrival_s,
        request.lora_name,
        request.cache_salt,
    )


def _engine_dict(engine: EngineConfig) -> dict[str, Any]:
    out = asdict(engine)
    return {k: v for k, v in out.items() if not callable(v)}


def _bar(out: TextIO, fraction: float, label: str, started: float) -> None:
    width = 30
    filled = int(width * min(1.0, fraction))
    elapsed = time.monotonic() - started
    out.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:5.1f}% "
        f"{elapsed:5.1f}s  {label[:40]:40}"
    )
    out.flush()


def format_table(results: dict[str, Any]) -> str:
    """The comparison at every QPS, one block per QPS."""
    lines = []
    columns = (
        "hit_rate",
        "ttft_p50_s",
        "ttft_p90_s",
        "ttft_p99_s",
        "throughput_tok_s",
        "queue_mean",
        "queue_max",
        "load_imbalance",
    )
    header = (
        f"{'policy':14} {'hit':>6} {'TTFT p50':>9} {'p90':>9} {'p99':>9} {'out tok/s':>10} "
        f"{'queue':>6} {'qmax':>5} {'imbal':>6}"
    )
    for qps in results["qps"]:
        oracle = results["oracle_by_qps"][str(qps)]
        lines.append(f"QPS {qps:g}  (oracle hit rate {oracle:.3f})")
        lines.append(header)
        for name, entry in results["policies"].items():
            s = entry["by_qps"][str(qps)]
            values = [s[c] for c in columns]
            lines.append(
                f"{name:14} {values[0]:6.3f} {_s(values[1])} {_s(values[2])} {_s(values[3])} "
                f"{values[4]:10.0f} {values[5]:6.1f} {values[6]:5d} {values[7]:6.2f}"
            )
        lines.append("")
    return "\n".join(lines)


def _s(value: float) -> str:
    return f"{'n/a':>9}" if math.isnan(value) else f"{value:8.3f}s"


def write_outputs(results: dict[str, Any], directory: Path) -> list[Path]:
    """``results.json`` and ``results.png`` (TTFT p90 vs QPS per policy; hit rate per policy)."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "results.json"
    json_path.write_text(json.dumps(results, indent=2, allow_nan=True))
    png_path = directory / "results.png"
    _plot(results, png_path)
    return [json_path, png_path]


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    qps = results["qps"]
    for name, entry in results["policies"].items():
        ys = [entry["by_qps"][str(q)]["ttft_p90_s"] for q in qps]
        left.plot(qps, ys, marker="o", label=name)
    left.set_xlabel("QPS")
    left.set_ylabel("TTFT p90 (s)")
    left.set_yscale("log")
    left.set_title("TTFT p90 vs QPS")
    left.legend(fontsize=8)
    names = list(results["policies"])
    rates = [results["policies"][n]["hit_rate"] for n in names]
    right.bar(range(len(names)), rates, color="tab:blue")
    right.axhline(results["oracle_hit_rate"], color="tab:red", linestyle="--", label="oracle")
    right.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    right.set_ylabel("prefix-cache hit rate (tokens)")
    right.set_title(f"hit rate at {qps[-1]:g} QPS")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
