"""``kvaware-scorer bench --config my.yaml``: the demo's comparison with your own pipeline.

Your configuration (the ``kvaware:`` section of your router YAML, or the whole file) runs
as one more policy, ``config:<file name>``, next to the built-in ones, on the simulated
fleet with the same arrivals. Its listener, scraping and static endpoints are replaced by
the simulated fleet's; everything else (filters, scorers, weights, picker, index) is
yours. Test your weights here before touching production.
"""

from __future__ import annotations

import argparse
import sys

from kvaware_scorer.commands.demo_cmd import add_common, build, policy_factories
from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.sim.compare import format_table, run_comparison, write_outputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="your pipeline YAML")
    add_common(parser)


def run(args: argparse.Namespace) -> int:
    try:
        comparison = build(args)
        factories = policy_factories(args, comparison, config=args.config)
        factories[-1]()  # validate the user's config before the long run
        results = run_comparison(comparison, factories, progress=None if args.quiet else sys.stderr)
    except KVAwareError as exc:
        print(f"kvaware-scorer bench: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.output is not None:
        for path in write_outputs(results, args.output):
            print(f"wrote {path}")
    return 0
