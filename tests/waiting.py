"""Synchronisation for tests: poll a condition until it holds, with a deadline (no sleeps
as synchronisation, no wall-clock assertions)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

DEFAULT_DEADLINE_S = 10.0


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = DEFAULT_DEADLINE_S) -> Any:
    """Poll ``condition`` until it returns something truthy (returned); fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
