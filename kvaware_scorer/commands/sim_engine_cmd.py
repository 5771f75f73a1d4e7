"""``kvaware-scorer sim-engine``: one simulated vLLM engine (HTTP + KV events) in real time.

Serves vLLM's OpenAI API (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health``, ``/metrics``) for one simulated engine advancing in wall-clock time, and
publishes its KV events over ZeroMQ in vLLM's wire format (topic ``kv@<pod>@<model>``,
with a replay endpoint). Fault-injection endpoints live under ``/admin/`` (loopback
clients only). Prompts are tokenized with the shipped tiny-chat tokenizer unless
``--tokenizer`` names another (a directory, or a model id in the local Hugging Face
cache).

Once listening it prints one JSON line on standard output:
``{"ready": {"pod", "url", "model", "kv_events", "replay", "topic", "pid"}}``.
SIGTERM or SIGINT shuts it down (exit 0); a bad argument exits 2 with one error line on
standard error. See ``docs/simulator-realtime.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn

from kvaware_scorer.errors import ConfigError, KVAwareError
from kvaware_scorer.sim.engine import HASH_ALGOS, EngineConfig

logger = logging.getLogger(__name__)

PROG = "kvaware-scorer sim-engine"


def _argument_error(message: str) -> NoReturn:
    """argparse's ``error`` for this command: one line on stderr, exit 2."""
    sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's flags."""
    # Argument errors are one line on stderr (exit 2), not argparse's usage block.
    parser.error = _argument_error  # type: ignore[method-assign]
    parser.add_argument("--pod", required=True, help="pod name (in the KV-event topic)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP listen address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="HTTP port (0: a free port)")
    parser.add_argument(
        "--model", default=None, help="served model name (default kvaware/tiny-chat)"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="tokenizer directory or cached model id (default: the shipped tiny-chat)",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME[=PATH]",
        help="serve a LoRA adapter as an extra model (repeatable)",
    )
    parser.add_argument(
        "--profile", default="qwen3-32b-2xh100", help="engine profile (qwen3-32b-2xh100)"
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=0.05,
        help="scale KV capacity, token budget and max_model_len; step times by 1/scale (0.05)",
    )
    parser.add_argument(
        "--num-gpu-blocks", type=int, default=None, metavar="N", help="override KV blocks"
    )
    parser.add_argument(
        "--speed", type=float, default=1.0, help="run this many times faster than modelled"
    )
    parser.add_argument(
        "--hash-algo",
        default="fast",
        choices=HASH_ALGOS,
        help="engine block hashes: fast, or vLLM's exact algorithm (slower)",
    )
    parser.add_argument(
        "--kv-events",
        default="tcp://127.0.0.1:0",
        metavar="ENDPOINT",
        help="KV-event publisher endpoint (tcp://127.0.0.1:0: bind a free port)",
    )
    parser.add_argument(
        "--kv-events-connect",
        action="store_true",
        help="connect the publisher to --kv-events (a scorer that binds) instead of binding",
    )
    parser.add_argument(
        "--replay",
        default="tcp://127.0.0.1:0",
        metavar="ENDPOINT",
        help="replay (ROUTER) endpoint, always bound (tcp://127.0.0.1:0)",
    )
    parser.add_argument("--no-replay", action="store_true", help="no replay endpoint")
    parser.add_argument("--no-kv-events", action="store_true", help="publish no KV events")
    parser.add_argument(
        "--exit-on-eof",
        action="store_true",
        help="shut down when standard input closes (so the engine never outlives its parent)",
    )


@dataclass(frozen=True)
class _Settings:
    pod: str
    host: str
    port: int
    config: EngineConfig
    speed: float
    kv_events: str | None
    replay: str | None
    kv_events_bind: bool


def engine_config(
    profile_name: str,
    scale: float,
    model: str,
    *,
    num_gpu_blocks: int | None = None,
    hash_algo: str = "fast",
) -> EngineConfig:
    """The engine of ``--profile`` scaled by ``--scale``, serving ``model``.

    ``num_gpu_blocks`` overrides the scaled capacity (and caps ``max_model_len`` to what
    the blocks hold). Raises :class:`ConfigError`.
    """
    from kvaware_scorer.sim.compare import scale_engine
    from kvaware_scorer.sim.profiles import profile

    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"--scale must be a finite number > 0, got {scale}")
    config = scale_engine(profile(profile_name), scale)
    overrides: dict[str, Any] = {"model": model, "hash_algo": hash_algo}
    if num_gpu_blocks is not None:
        if num_gpu_blocks < 2:
            raise ConfigError(f"--num-gpu-blocks must be >= 2, got {num_gpu_blocks}")
        overrides["num_gpu_blocks"] = num_gpu_blocks
        if config.max_model_len is not None:
            overrides["max_model_len"] = min(
                config.max_model_len, (num_gpu_blocks - 1) * config.block_size
            )
    return dataclasses.replace(config, **overrides)


def _settings(args: argparse.Namespace, model: str) -> _Settings:
    pod = str(args.pod)
    if not pod or "@" in pod:
        raise ConfigError(f"--pod {pod!r}: must be non-empty and contain no '@'")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if not (math.isfinite(args.speed) and args.speed > 0):
        raise ConfigError(f"--speed must be a finite number > 0, got {args.speed}")
    config = engine_config(
        args.profile,
        args.scale,
        model,
        num_gpu_blocks=args.num_gpu_blocks,
        hash_algo=args.hash_algo,
    )
    kv_events = None if args.no_kv_events else str(args.kv_events)
    replay = None if args.no_kv_events or args.no_replay else str(args.replay)
    for flag, endpoint in (("--kv-events", kv_events), ("--replay", replay)):
        if endpoint is not None and "://" not in endpoint:
            raise ConfigError(f"{flag} {endpoint!r}: use tcp://HOST:PORT (or ipc://, inproc://)")
    return _Settings(
        pod,
        args.host,
        args.port,
        config,
        args.speed,
        kv_events,
        replay,
        not args.kv_events_connect,
    )


def _exit_now(signum: int, frame: FrameType | None) -> None:
    """Before the event loop runs, a termination signal just ends the process (exit 0)."""
    del frame
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    """Start the engine, print the ready line, serve until SIGTERM/SIGINT."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_now)
    from kvaware_scorer.sim.server import LoraAdapter, SimServer
    from kvaware_scorer.tokenization import (
        TINY_CHAT_DIR,
        TINY_CHAT_MODEL,
        TokenizerSpec,
        load_tokenizer,
    )

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = args.model or TINY_CHAT_MODEL
    try:
        settings = _settings(args, model)
        loras = [LoraAdapter.parse(text) for text in args.lora]
        source = args.tokenizer or str(TINY_CHAT_DIR)
        tokenizer = load_tokenizer(
            TokenizerSpec(model=model, source=source), require_chat_template=False
        )
        server = SimServer(
            settings.pod,
            settings.config,
            tokenizer,
            loras=loras,
            speed=settings.speed,
            kv_events=settings.kv_events,
            replay=settings.replay,
            kv_events_bind=settings.kv_events_bind,
        )
    except (ConfigError, KVAwareError) as exc:
        sys.stderr.write(f"{PROG}: error: {_one_line(exc)}\n")
        return 2
    return asyncio.run(_serve(server, settings, exit_on_eof=bool(args.exit_on_eof)))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


async def _serve(server: Any, settings: _Settings, *, exit_on_eof: bool) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start(settings.host, settings.port)
    except (OSError, KVAwareError) as exc:
        sys.stderr.write(f"{PROG}: error: cannot start: {_one_line(exc)}\n")
        await server.stop()
        return 1
    watching_stdin = False
    if exit_on_eof:
        watching_stdin = _watch_stdin(loop, stop)
    ready = {**server.ready_info(), "pid": os.getpid()}
    sys.stdout.write(json.dumps({"ready": ready}) + "\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        logger.info("sim engine %s shutting down", settings.pod)
        if watching_stdin:
            loop.remove_reader(sys.stdin.fileno())
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> bool:
    """Set ``stop`` when standard input reaches end of file (the parent went away)."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return False

    def readable() -> None:
        try:
            data = os.read(fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            return  # input is ignored; only its end matters
        logger.info("standard input closed; shutting down")
        loop.remove_reader(fd)
        stop.set()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)
    return True
