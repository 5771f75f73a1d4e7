"""The ``kvaware-scorer`` console script: one subcommand per module in ``commands/``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help). Modules are imported only when used.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kvaware_scorer.commands.demo_cmd", "compare routing policies on a simulated fleet"),
    "bench": (
        "kvaware_scorer.commands.bench_cmd",
        "the demo's comparison with your own pipeline config as one policy",
    ),
    "hash": ("kvaware_scorer.commands.hash_cmd", "compute vLLM's block hashes for tokens"),
    "decode": ("kvaware_scorer.commands.decode_cmd", "decode KV-event messages given as hex"),
    "listen": ("kvaware_scorer.commands.listen_cmd", "print live KV events and index stats"),
    "selfcheck": (
        "kvaware_scorer.commands.selfcheck_cmd",
        "run publishers, listener, index and scoring end to end on loopback",
    ),
    "sim-engine": (
        "kvaware_scorer.commands.sim_engine_cmd",
        "run one simulated vLLM engine (HTTP + KV events) in real time",
    ),
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the command named in ``argv`` is imported (fast start-up)."""
    parser = argparse.ArgumentParser(
        prog="kvaware-scorer",
        description="KV-cache-aware routing for vLLM fleets.",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if name != chosen:
            continue
        module = importlib.import_module(module_name)
        command.description = module.__doc__
        command.formatter_class = argparse.RawDescriptionHelpFormatter
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
