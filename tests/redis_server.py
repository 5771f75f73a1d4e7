"""A real ``redis-server`` for tests: 127.0.0.1 only, an ephemeral port, no persistence
(``--save "" --appendonly no``), its own temporary directory, always stopped.

Use the session fixture ``redis_server`` (``from redis_server import
redis_server_fixture`` in a test module registers it), or :class:`RedisServer` as a
context manager. Without a ``redis-server`` binary on PATH
the tests that need one skip, except under ``CI``, where that fails the run
(``scripts/test`` installs it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

_START_ATTEMPTS = 5
_READY_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0


def redis_server_binary() -> str:
    """Path of ``redis-server``; skips the test (fails it under CI) when absent."""
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server not found on PATH (apt-get install -y redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _ping(port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; :meth:`restart` keeps the port (and loses the data)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or 0
        self._fixed_port = port is not None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        binary = redis_server_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(_START_ATTEMPTS):
            if not self._fixed_port:
                self.port = _free_port()
            log = self.workdir / f"redis-{self.port}.log"
            self._proc = subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--logfile",
                    str(log),
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "yes",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + _READY_TIMEOUT_S
            while time.monotonic() < deadline and self._proc.poll() is None:
                if _ping(self.port):
                    return
                time.sleep(0.01)
            self.stop()  # exited (port taken) or never answered: try another port
        raise RuntimeError(f"redis-server did not start; see {self.workdir}")

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL). Idempotent."""
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(_STOP_TIMEOUT_S)

    def restart(self) -> None:
        """Stop and start on the same port: like a Redis restart without persistence."""
        self.stop()
        self._fixed_port = True
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session", name="redis_server")
def redis_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by the session's tests (use distinct namespaces)."""
    redis_server_binary()
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server
