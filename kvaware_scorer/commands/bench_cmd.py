"""``kvaware-scorer bench --config my.yaml``: the demo's comparison with your own pipeline.

Your configuration (the ``kvaware:`` section of your router YAML, or the whole file) runs
as one more policy, ``config:<file name>``, next to the built-in ones, on the simulated
fleet with the same arrivals. Its listener, scraping and static endpoints are replaced by
the simulated fleet's; everything else (filters, scorers, weights, picker, index) is
yours. Test your weights here before touching production.
"""

from __future__ import annotations

import argparse

from kvaware_scorer.commands.demo_cmd import add_common, run_comparison_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="your pipeline YAML")
    add_common(parser)


def run(args: argparse.Namespace) -> int:
    return run_comparison_command(args, "bench", config=args.config)
