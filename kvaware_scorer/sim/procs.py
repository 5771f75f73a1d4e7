"""Start and stop fleets of ``kvaware-scorer sim-engine`` processes (tests, examples).

Each engine is a real process (``python -m kvaware_scorer.cli sim-engine``) serving HTTP
on 127.0.0.1 and publishing KV events on ephemeral ports; :func:`spawn_engines` waits
(bounded) for each one's ready line and returns where to reach it. Engines are started
with ``--exit-on-eof`` and a pipe on their standard input, so an engine also shuts down
when the process that spawned it dies without calling :func:`stop_engines`.

```python
with engine_fleet(2) as engines:
    for engine in engines:
        print(engine.pod, engine.url, engine.kv_events, engine.replay)
```
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.tokenization import TINY_CHAT_MODEL

__all__ = ["EngineProcess", "engine_fleet", "engine_stderr", "spawn_engines", "stop_engines"]

logger = logging.getLogger(__name__)

_MAX_READY_LINE = 64 * 1024
_STDERR_TAIL = 4000
# process -> the anonymous file collecting its stderr (closed by stop_engines)
_STDERR_FILES: dict[subprocess.Popen[bytes], IO[bytes]] = {}


@dataclass(frozen=True)
class EngineProcess:
    """A running simulated engine: where to reach it, and its process."""

    pod: str
    url: str
    model: str
    kv_events: str | None
    replay: str | None
    topic: str
    process: subprocess.Popen[bytes]


def engine_stderr(engine: EngineProcess | subprocess.Popen[bytes]) -> str:
    """What the engine wrote on standard error so far (empty once it was stopped)."""
    process = engine.process if isinstance(engine, EngineProcess) else engine
    return _read_stderr(process)


def _read_stderr(process: subprocess.Popen[bytes], limit: int = 1 << 20) -> str:
    handle = _STDERR_FILES.get(process)
    if handle is None or handle.closed:
        return ""
    # pread: the child shares this file's offset, which must not move under it
    data = os.pread(handle.fileno(), limit, 0)
    return data.decode("utf-8", "replace")


def _command(
    pod: str,
    model: str,
    speed: float,
    scale: float,
    num_gpu_blocks: int | None,
    extra_args: Sequence[str],
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "kvaware_scorer.cli",
        "sim-engine",
        "--pod",
        pod,
        "--model",
        model,
        "--speed",
        repr(float(speed)),
        "--scale",
        repr(float(scale)),
        "--exit-on-eof",
    ]
    if num_gpu_blocks is not None:
        command += ["--num-gpu-blocks", str(num_gpu_blocks)]
    command += list(extra_args)
    return command


def _start(command: list[str]) -> subprocess.Popen[bytes]:
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - owned by _STDERR_FILES until stopped
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    except BaseException:
        stderr.close()
        raise
    _STDERR_FILES[process] = stderr
    return process


def _read_ready(process: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
    """The ``ready`` object of the engine's first stdout line; raises on exit or timeout."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KVAwareError("timed out waiting for the ready line")
            if not selector.select(min(remaining, 0.5)):
                if process.poll() is not None:
                    raise KVAwareError(f"exited with status {process.returncode}")
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
                raise KVAwareError(f"exited with status {process.returncode}")
            buffer += chunk
            if len(buffer) > _MAX_READY_LINE:
                raise KVAwareError("the first output line is too long to be a ready line")
    line = buffer.split(b"\n", 1)[0]
    try:
        ready = json.loads(line)["ready"]
    except (ValueError, KeyError, TypeError):
        raise KVAwareError(f"unexpected first output line {line[:200]!r}") from None
    if not isinstance(ready, dict):
        raise KVAwareError(f"unexpected ready line {line[:200]!r}")
    return ready


def spawn_engines(
    n: int,
    *,
    model: str = TINY_CHAT_MODEL,
    speed: float = 20.0,
    scale: float = 0.05,
    num_gpu_blocks: int | None = None,
    extra_args: Sequence[str] = (),
    prefix: str = "pod",
    timeout_s: float = 30.0,
) -> list[EngineProcess]:
    """Start ``n`` engines named ``f"{prefix}-{i}"`` and wait until each is listening.

    All processes start at once; the wait for every ready line shares one deadline of
    ``timeout_s``. If any engine fails to start, every engine started here is stopped
    and :class:`KVAwareError` is raised with that engine's standard error.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    processes: list[tuple[str, subprocess.Popen[bytes]]] = []
    engines: list[EngineProcess] = []
    try:
        for i in range(n):
            pod = f"{prefix}-{i}"
            command = _command(pod, model, speed, scale, num_gpu_blocks, extra_args)
            processes.append((pod, _start(command)))
        deadline = time.monotonic() + timeout_s
        for pod, process in processes:
            try:
                ready = _read_ready(process, deadline)
            except KVAwareError as exc:
                _signal_and_wait([process], 2.0)
                tail = _read_stderr(process)[-_STDERR_TAIL:].strip()
                raise KVAwareError(
                    f"sim engine {pod!r} did not start: {exc}; stderr:\n{tail or '(empty)'}"
                ) from None
            engines.append(
                EngineProcess(
                    pod=str(ready["pod"]),
                    url=str(ready["url"]),
                    model=str(ready["model"]),
                    kv_events=ready.get("kv_events"),
                    replay=ready.get("replay"),
                    topic=str(ready["topic"]),
                    process=process,
                )
            )
            logger.info("sim engine %s ready at %s", pod, ready["url"])
    except BaseException:
        _terminate([process for _, process in processes], 5.0)
        raise
    return engines


def stop_engines(engines: Iterable[EngineProcess], timeout_s: float = 5.0) -> None:
    """SIGTERM every engine, wait up to ``timeout_s`` in all, then SIGKILL what is left."""
    _terminate([engine.process for engine in engines], timeout_s)


def _terminate(processes: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """Stop the processes (SIGTERM, then SIGKILL at the deadline) and release their pipes."""
    _signal_and_wait(processes, timeout_s)
    for process in processes:
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        handle = _STDERR_FILES.pop(process, None)
        if handle is not None:
            handle.close()


def _signal_and_wait(processes: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("sim engine pid %d ignored SIGTERM; killing it", process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()


@contextmanager
def engine_fleet(n: int, **kwargs: Any) -> Iterator[list[EngineProcess]]:
    """:func:`spawn_engines` for the ``with`` block; :func:`stop_engines` at its end."""
    engines = spawn_engines(n, **kwargs)
    try:
        yield engines
    finally:
        stop_engines(engines)
