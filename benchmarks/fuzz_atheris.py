"""Coverage-guided fuzzing (atheris / libFuzzer) of the untrusted-input boundaries.

Not run in CI (``tests/test_fuzz.py`` is the CI fuzzing, with hypothesis). One harness,
three targets chosen by the first input byte (or fixed with ``--target=frames|payload|config``):

* 0: ``wire.decode_frames`` on the rest split into frames at ``\\x00\\xff`` markers;
* 1: ``wire.decode_payload`` on the rest, then ``PrefixIndex.apply`` + ``match`` of
  whatever decodes (tiny capacities, so eviction and orphans run);
* 2: ``config.load_config`` on the rest parsed as YAML (``yaml.safe_load``; a YAML error
  is skipped, as ``read_yaml`` turns it into a ``ConfigError``).

Allowed: ``WireError`` (decoders), ``ConfigError`` (config). The bugs pinned by
``xfail`` tests in ``tests/test_fuzz.py`` are counted and skipped (``--stop-on-known`` makes
them crash instead); anything else is a crash that libFuzzer reports with the input.

    .venv/bin/pip install atheris
    .venv/bin/python benchmarks/fuzz_atheris.py --seconds=60 [--target=payload] \
        [libFuzzer flags] [CORPUS_DIR]

After ``--seconds`` (default 60) it prints one JSON line on stdout (executions, per
target, and the known-bug hits) and exits 0; libFuzzer's own ``-max_total_time`` and
``-runs`` stop it without that line.
A seed corpus (valid map- and array-form batches, frames and a valid config) is written to
a temporary directory when no corpus directory is given.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports():
    import yaml

    from kvaware_scorer import config as config_mod
    from kvaware_scorer import index as index_mod
    from kvaware_scorer import keys as keys_mod
    from kvaware_scorer import wire
    from kvaware_scorer.errors import ConfigError, KVAwareError, WireError
    from kvaware_scorer.events import BlockStored, EventBatch

INSTRUMENTED = (keys_mod,)  # imported under instrumentation for coverage only
COUNTS: dict[str, int] = {"executions": 0, "frames": 0, "payload": 0, "config": 0}
KNOWN: dict[str, int] = {}
STOP_ON_KNOWN = "--stop-on-known" in sys.argv
SECONDS = float(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--seconds=")), 60))
TARGETS = ("frames", "payload", "config")
ONLY = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--target=")), None)
STARTED = time.monotonic()
CORPUS: list[str] = []
SEP = b"\x00\xff"


def _known(name: str, exc: BaseException) -> None:
    KNOWN[name] = KNOWN.get(name, 0) + 1
    if STOP_ON_KNOWN:
        raise exc


def fuzz_frames(data: bytes) -> None:
    try:
        wire.decode_frames(data.split(SEP))
    except WireError as exc:
        assert exc.reason in wire.REASONS


def fuzz_payload(data: bytes) -> None:
    try:
        batch = wire.decode_payload(data)
    except WireError as exc:
        assert exc.reason in wire.REASONS
        return
    assert set(batch.errors) <= wire.REASONS
    index = index_mod.PrefixIndex(
        block_size=16, default_model="m", pod_capacity=8, max_entries=16, max_orphan_blocks=8
    )
    try:
        index.apply("pod", batch.events, rank=(batch.data_parallel_rank or 0) % 4)
    except KVAwareError as exc:  # test_index_survives_token_ids_out_of_uint32
        _known("token_id_out_of_range", exc)
    except IndexError as exc:  # test_index_survives_extra_keys_shorter_than_block_hashes
        _known("short_extra_keys", exc)
    for event in batch.events:
        if isinstance(event, BlockStored) and event.token_ids:
            try:
                keys = index.keys(event.token_ids, "m")
            except KVAwareError:
                continue
            index.match(keys)


def fuzz_config(data: bytes) -> None:
    try:
        source: Any = yaml.safe_load(data.decode("utf-8", "replace"))
    except (yaml.YAMLError, RecursionError):
        return  # read_yaml's job (its RecursionError is test_config_deeply_nested_yaml_...)
    if isinstance(source, str):
        return  # a bare string is a file path
    try:
        config_mod.load_config(source)
    except ConfigError:
        pass
    except OverflowError as exc:  # test_config_int_beyond_float_range_is_a_config_error
        _known("config_int_beyond_float", exc)


def test_one_input(data: bytes) -> None:
    COUNTS["executions"] += 1
    if COUNTS["executions"] % 1000 == 0 and time.monotonic() - STARTED > SECONDS:
        _report()
        os._exit(0)  # libFuzzer runs no Python exit handlers
    if not data:
        return
    target, rest = data[0] % 3, data[1:]
    if ONLY is not None:
        target, rest = TARGETS.index(ONLY), data
    if target == 0:
        COUNTS["frames"] += 1
        fuzz_frames(rest)
    elif target == 1:
        COUNTS["payload"] += 1
        fuzz_payload(rest)
    else:
        COUNTS["config"] += 1
        fuzz_config(rest)


def _seed_corpus() -> str:
    folder = Path(tempfile.mkdtemp(prefix="kvaware-fuzz-"))
    stored = BlockStored([7, 8], None, list(range(32)), 16, medium="GPU", extra_keys=[None, None])
    batch = EventBatch(1.0, [stored], 0)
    seeds = {
        "map": b"\x01" + wire.encode_batch(batch),
        "array": b"\x01" + wire.encode_batch_legacy(batch),
        "frames": b"\x00" + SEP.join(wire.encode_frames("kv@pod@m", 3, batch)),
        "config": b"\x02"
        + yaml.safe_dump(
            {
                "index": {"block_size": 16, "tier_weights": {"gpu": 1.0}},
                "listener": {"bind": ["tcp://127.0.0.1:5557"], "replay_timeout_s": 2.0},
                "endpoints": [{"id": "a", "models": ["m"]}],
                "scorers": [{"type": "kv-prefix", "weight": 2.0}],
            }
        ).encode(),
    }
    for name, data in seeds.items():
        if ONLY is not None:
            if data[0] != TARGETS.index(ONLY):
                continue
            data = data[1:]  # a fixed target reads the input without the selector byte
        (folder / name).write_bytes(data)
    return str(folder)


def _report() -> None:
    seconds = round(time.monotonic() - STARTED, 1)
    line = {"seconds": seconds, "counts": COUNTS, "known_bug_hits": KNOWN, "corpus": CORPUS}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def main() -> None:
    argv = [
        a
        for a in sys.argv
        if a != "--stop-on-known" and not a.startswith(("--seconds=", "--target="))
    ]
    if ONLY is not None and ONLY not in TARGETS:
        sys.exit(f"--target must be one of {', '.join(TARGETS)}")
    if not any(not a.startswith("-") for a in argv[1:]):
        argv.append(_seed_corpus())
    CORPUS.extend(a for a in argv[1:] if not a.startswith("-"))
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
