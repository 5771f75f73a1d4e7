"""Rate-limited logging, so bad input from one pod cannot flood the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLogger:
    """Logs at most one record per key every ``interval_s``, then says how many it held back."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 4096,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._max_keys = max_keys
        self._next: dict[str, float] = {}
        self._held_back: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` logged within the interval; True if logged."""
        now = self._clock()
        if now < self._next.get(key, 0.0):
            self._held_back[key] = self._held_back.get(key, 0) + 1
            return False
        if key not in self._next and len(self._next) >= self._max_keys:
            self._next.clear()
            self._held_back.clear()
        self._next[key] = now + self._interval_s
        held = self._held_back.pop(key, 0)
        if held:
            self._logger.warning("%s (%d similar messages suppressed)", msg % args, held)
        else:
            self._logger.warning(msg, *args)
        return True
