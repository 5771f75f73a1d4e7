"""``python -m examples.vllm_router --config FILE``: run the router until SIGTERM or SIGINT.

Exit status: 0 after a clean shutdown; 2 when the configuration is refused (the message
names the YAML path, or the tokenizer or plugin that cannot load); 1 when start-up fails
otherwise (a port in use) or the shutdown overran its bound. Backends that are down at
start-up are not an error: they are routed around until their health checks pass.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from kvaware_scorer.errors import ConfigError, KVAwareError

from .app import Router
from .settings import load_settings

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"
STOP_MARGIN_S = 5.0  # beyond router.shutdown_timeout_s, for the pipeline and the client


def build_parser() -> argparse.ArgumentParser:
    """The command line: the YAML file and the log level; everything else is in the YAML."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.vllm_router",
        description="KV-cache-aware OpenAI router for vLLM pods (kvaware-scorer example).",
    )
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="router YAML (default: %(default)s)"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        router = Router(load_settings(args.config))
    except ConfigError as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(serve(router))


async def serve(router: Router) -> int:
    """Start ``router``, wait for SIGTERM/SIGINT, stop it within a bound."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await router.start()
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except (KVAwareError, OSError) as exc:
            print(f"error: cannot start the router: {exc}", file=sys.stderr)
            return 1
        print(f"kvaware router listening on {router.url} (admin {router.admin_url})", flush=True)
        await stop.wait()
        logger.info("signal received; shutting down")
        bound = router.config.shutdown_timeout_s + STOP_MARGIN_S
        try:
            await asyncio.wait_for(router.stop(), bound)
        except asyncio.TimeoutError:
            logger.error("shutdown did not finish within %.1f s", bound)
            return 1
        return 0
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
