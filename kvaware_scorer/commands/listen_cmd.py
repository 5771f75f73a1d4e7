"""``kvaware-scorer listen``: consume live vLLM KV events and print them with index stats.

Bind mode (``--bind tcp://*:5557``): pods' publishers connect to us and name themselves
in the topic ``kv@<pod>@<model>``. Connect mode (``--connect``): we dial each pod's
publisher; the value is ``[POD=]ENDPOINT[,replay=ENDPOINT][,dp=N][,model=NAME]``, for
example ``--connect pod-a=tcp://10.0.0.5:5557,replay=tcp://10.0.0.5:5558,model=llama``.

Each applied batch is printed on standard output as one JSON object, as ``decode``
prints it, plus ``pod`` and ``rank`` (``--quiet`` leaves them out). Every
``--stats-interval`` seconds a JSON line ``{"stats": ...}`` goes to standard error.
Stops on Ctrl-C, or after ``--duration`` seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from kvaware_scorer.commands.decode_cmd import batch_to_json
from kvaware_scorer.errors import ConfigError, KVAwareError
from kvaware_scorer.events import EventBatch
from kvaware_scorer.hash_check import HashCheck
from kvaware_scorer.index import PrefixIndex
from kvaware_scorer.listener import KVEventListener, PodSource
from kvaware_scorer.vllm_hash import VllmHashSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bind",
        action="append",
        default=[],
        metavar="ADDR",
        help="bind a SUB socket here (repeatable)",
    )
    parser.add_argument(
        "--connect",
        action="append",
        default=[],
        metavar="SPEC",
        help="dial a pod's publisher: [POD=]ENDPOINT[,replay=E][,dp=N][,model=M]",
    )
    parser.add_argument("--topic-filter", default="kv@", help="bind-mode topic prefix (kv@)")
    parser.add_argument(
        "--bind-replay-port",
        type=int,
        default=None,
        help="bind mode: pods' replay port (host taken from the pod name)",
    )
    parser.add_argument("--model", default="", help="default model name of pods")
    parser.add_argument("--block-size", type=int, default=16, help="index block size (16)")
    parser.add_argument("--stats-interval", type=float, default=10.0, metavar="S")
    parser.add_argument(
        "--duration", type=float, default=None, metavar="S", help="stop after this many seconds"
    )
    parser.add_argument("--quiet", action="store_true", help="print stats only")
    parser.add_argument(
        "--vllm-hash-algo",
        default=None,
        help="check sampled events against vLLM's hash settings: sha256, sha256_cbor, "
        "xxhash or xxhash_cbor (with --vllm-pythonhashseed and --vllm-block-size)",
    )
    parser.add_argument("--vllm-pythonhashseed", default=None, help="the pods' PYTHONHASHSEED")
    parser.add_argument("--vllm-block-size", type=int, default=16, help="the pods' block size")


def parse_connect(spec: str) -> PodSource:
    """``[POD=]ENDPOINT[,replay=E][,dp=N][,model=M]`` -> PodSource."""
    head, *options = spec.split(",")
    pod, sep, endpoint = head.partition("=")
    if not sep:
        pod, endpoint = head, head
    if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise ConfigError(
            f"--connect {spec!r}: endpoint must start with tcp://, ipc:// or inproc://"
        )
    fields: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in ("replay", "dp", "model"):
            raise ConfigError(
                f"--connect {spec!r}: unknown option {option!r}; "
                "allowed: replay=ENDPOINT, dp=N, model=NAME"
            )
        fields[key] = value
    try:
        dp_size = int(fields.get("dp", "1"))
    except ValueError:
        raise ConfigError(f"--connect {spec!r}: dp must be an integer") from None
    return PodSource(
        pod,
        endpoint,
        replay_endpoint=fields.get("replay"),
        model=fields.get("model"),
        dp_size=dp_size,
    )


def run(args: argparse.Namespace) -> int:
    try:
        if not args.bind and not args.connect:
            raise ConfigError("give at least one --bind ADDR or --connect SPEC")
        sources = [parse_connect(spec) for spec in args.connect]
        index = PrefixIndex(block_size=args.block_size, default_model=args.model)
        hash_check = None
        if args.vllm_hash_algo is not None:
            hash_check = HashCheck(
                VllmHashSettings(
                    hash_algo=args.vllm_hash_algo,
                    pythonhashseed=args.vllm_pythonhashseed,
                    block_size=args.vllm_block_size,
                )
            )
    except KVAwareError as exc:
        print(f"kvaware-scorer listen: {exc}", file=sys.stderr)
        return 2
    out_lock = threading.Lock()

    def show(pod: str, rank: int, seq: int, batch: EventBatch) -> None:
        record = {"pod": pod, "rank": rank, **batch_to_json(batch, seq=seq)}
        with out_lock:
            print(json.dumps(record), flush=True)

    listener = KVEventListener(
        index,
        bind=args.bind,
        topic_filter=args.topic_filter,
        bind_replay_port=args.bind_replay_port,
        on_batch=None if args.quiet else show,
        hash_check=hash_check,
    )
    try:
        listener.start()
    except KVAwareError as exc:
        print(f"kvaware-scorer listen: {exc}", file=sys.stderr)
        return 2
    for source in sources:
        listener.add_pod(source)
    print(
        json.dumps(
            {
                "listening": {
                    "bound": listener.bound_endpoints,
                    "connected": [s.pod for s in sources],
                }
            }
        ),
        file=sys.stderr,
        flush=True,
    )
    deadline = None if args.duration is None else time.monotonic() + args.duration
    try:
        while deadline is None or time.monotonic() < deadline:
            wait = args.stats_interval
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            time.sleep(wait)
            stats = listener.stats()
            stats.pop("index", None)
            stats["entries"] = len(index)
            print(json.dumps({"stats": stats}), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
    return 0
