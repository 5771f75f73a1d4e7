"""Exceptions raised at kvaware-scorer's boundaries (config, start-up, wire input)."""

from __future__ import annotations


class KVAwareError(Exception):
    """Base class of every error kvaware-scorer raises on purpose."""


class ConfigError(KVAwareError, ValueError):
    """A configuration value is wrong; the message names the setting and the fix."""


class WireError(KVAwareError, ValueError):
    """A frame or payload from the network could not be decoded.

    ``reason`` is a short, stable label used as a counter key (for example
    ``"not_msgpack"`` or ``"bad_seq"``); the message gives the detail.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
