"""Shared fixtures: the conformance vectors, read in place from ../shared/conformance."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE_FILE = (
    Path(os.environ.get("KVAWARE_CONFORMANCE_DIR", str(ROOT.parent / "shared" / "conformance")))
    / "vllm_vectors.json"
)

_cache: dict[str, Any] = {}


def skip_or_fail(message: str) -> None:
    """A fixture file is missing: skip locally, fail under CI (``CI`` set)."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def load_vectors() -> dict[str, Any]:
    """The vLLM conformance vectors; skip (or fail under CI) when the file is absent."""
    if "v" not in _cache:
        if not CONFORMANCE_FILE.is_file():
            message = (
                f"conformance vectors not found at {CONFORMANCE_FILE}; "
                "set KVAWARE_CONFORMANCE_DIR to the folder holding vllm_vectors.json"
            )
            skip_or_fail(message)
        _cache["v"] = json.loads(CONFORMANCE_FILE.read_text())
    return _cache["v"]


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    return load_vectors()


def untag(value: Any) -> Any:
    """Turn the vectors' tagged JSON ({"$bin": hex}, {"$int": dec}) into Python values."""
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        if set(value) == {"$int"}:
            return int(value["$int"])
        return {k: untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag(v) for v in value]
    return value
