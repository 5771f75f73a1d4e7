"""``kvaware-scorer demo``: what KV-aware routing buys, on a simulated fleet, in about a minute.

Runs 8 simulated vLLM pods (no GPU, no network) under a shared-prefix workload shaped like
llm-d's published benchmark (groups of prompts sharing a long system prompt), on a ladder
of request rates, once per routing policy with the same arrivals: random, round-robin,
least-load, approximate (router-side history), precise (KV events), precise+load and
prefill-cost. Prints the comparison table; with ``--output DIR`` also writes
``DIR/results.json`` and ``DIR/results.png``.

The engines follow vLLM v1's prefix caching and continuous batching; their KV events go
through the real wire encoder, decoder and index. See docs/simulator.md.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.sim.compare import (
    Comparison,
    format_table,
    run_comparison,
    scale_engine,
    write_outputs,
)
from kvaware_scorer.sim.fleet import Policy
from kvaware_scorer.sim.policies import BUILTIN_POLICIES, make_policy, user_policy
from kvaware_scorer.sim.profiles import PROFILES, engine_from_yaml, profile
from kvaware_scorer.sim.workloads import WORKLOADS, workload

DEMO_QPS = "6,9,12"


def add_common(parser: argparse.ArgumentParser, *, default_workload: str = "shared-prefix") -> None:
    parser.add_argument(
        "--output", type=Path, default=None, help="write results.json and results.png here"
    )
    parser.add_argument("--workload", default=default_workload, choices=sorted(WORKLOADS))
    parser.add_argument(
        "--qps", default=DEMO_QPS, help=f"comma-separated request rates ({DEMO_QPS})"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=60.0,
        help="seconds of measured arrivals per rate, after 30 s of warm-up (60)",
    )
    parser.add_argument("--pods", type=int, default=8, help="simulated pods (8)")
    parser.add_argument(
        "--profile",
        default="qwen3-32b-2xh100",
        choices=sorted(PROFILES),
        help="engine profile (qwen3-32b-2xh100)",
    )
    parser.add_argument(
        "--engine-config",
        type=Path,
        default=None,
        help="YAML with engine settings (profile, num_gpu_blocks, step_time, ...)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=0.25,
        help="token-length scale of the workload and KV capacity (0.25)",
    )
    parser.add_argument(
        "--policies",
        default=",".join(BUILTIN_POLICIES),
        help="comma-separated policies to compare (all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)


def build(args: argparse.Namespace, extra: list[tuple[str, str]] | None = None) -> Comparison:
    try:
        qps = [float(q) for q in str(args.qps).split(",") if q.strip()]
    except ValueError:
        raise KVAwareError(
            f"--qps {args.qps!r}: give comma-separated numbers, e.g. 6,12,18"
        ) from None
    if not qps or any(q <= 0 for q in qps):
        raise KVAwareError("--qps needs at least one positive rate")
    if args.pods < 1:
        raise KVAwareError("--pods must be at least 1")
    if not 0 < args.scale <= 4:
        raise KVAwareError("--scale must be in (0, 4]")
    if args.duration <= 0:
        raise KVAwareError("--duration must be positive")
    base = (
        engine_from_yaml(args.engine_config, args.profile)
        if args.engine_config is not None
        else profile(args.profile)
    )
    engine = scale_engine(base, args.scale)
    spec = workload(args.workload, scale=args.scale)
    return Comparison(spec, engine, args.pods, sorted(qps), args.duration, seed=args.seed)


def policy_factories(
    args: argparse.Namespace, comparison: Comparison, config: str | None = None
) -> list[Callable[[], Policy]]:
    names = [n.strip() for n in str(args.policies).split(",") if n.strip()]
    unknown = [n for n in names if n not in BUILTIN_POLICIES]
    if unknown:
        raise KVAwareError(
            f"--policies: unknown {', '.join(unknown)}; allowed: {', '.join(BUILTIN_POLICIES)}"
        )
    model = comparison.workload.model
    block = comparison.engine.block_size
    factories: list[Callable[[], Policy]] = [
        functools.partial(make_policy, n, seed=args.seed, model=model, block_size=block)
        for n in names
    ]
    if config is not None:
        factories.append(
            functools.partial(user_policy, f"config:{Path(config).stem}", config, model=model)
        )
    return factories


def run(args: argparse.Namespace) -> int:
    return run_comparison_command(args, "demo")


def run_comparison_command(
    args: argparse.Namespace, command: str, config: str | None = None
) -> int:
    """Build, run and report a comparison (``demo``; ``bench`` adds the user's config)."""
    try:
        comparison = build(args)
        factories = policy_factories(args, comparison, config=config)
        if config is not None:
            factories[-1]()  # validate the user's config before the long run
        results = run_comparison(comparison, factories, progress=None if args.quiet else sys.stderr)
    except KVAwareError as exc:
        print(f"kvaware-scorer {command}: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.output is not None:
        for path in write_outputs(results, args.output):
            print(f"wrote {path}")
    return 0
