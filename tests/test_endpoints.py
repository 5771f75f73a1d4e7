"""vLLM's endpoint rules, checked against the conformance vectors' endpoint_cases."""

from __future__ import annotations

from typing import Any

import pytest

from kvaware_scorer.endpoints import parse_topic, publisher_binds, rank_endpoint
from kvaware_scorer.errors import ConfigError


def test_endpoint_cases(vectors: dict[str, Any]) -> None:
    cases = vectors["endpoint_cases"]
    assert cases
    for case in cases:
        endpoint, rank = case["endpoint"], case["data_parallel_rank"]
        if endpoint is None:
            continue
        if case["error"]:
            with pytest.raises(ConfigError, match="tcp:// or inproc://"):
                rank_endpoint(endpoint, rank)
            continue
        assert rank_endpoint(endpoint, rank) == case["offset_endpoint"], case
        assert publisher_binds(case["offset_endpoint"]) == case["publisher_binds"], case


def test_wire_sessions_effective_endpoints(vectors: dict[str, Any]) -> None:
    for session in vectors["wire_sessions"]:
        pub = session["publisher"]
        if pub["mode"] == "ipc":
            continue
        rank = pub["data_parallel_rank"]
        assert rank_endpoint(pub["configured_endpoint"], rank) == pub["effective_endpoint"]
        if pub["configured_replay_endpoint"]:
            expected = pub["effective_replay_endpoint"]
            assert rank_endpoint(pub["configured_replay_endpoint"], rank) == expected


def test_bad_endpoints() -> None:
    with pytest.raises(ConfigError, match="numeric port"):
        rank_endpoint("tcp://host", 1)
    with pytest.raises(ConfigError, match=">= 0"):
        rank_endpoint("tcp://host:1", -1)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("kv@10.0.0.1:8000@meta-llama/Llama-3.1-8B", ("10.0.0.1:8000", "meta-llama/Llama-3.1-8B")),
        ("kv@pod-a@model@with@ats", ("pod-a", "model@with@ats")),
        ("kv@pod-a", ("pod-a", None)),
        ("kv@pod-a@", ("pod-a", None)),
        ("kv@", None),
        ("", None),
        ("xx@pod@m", None),
    ],
)
def test_parse_topic(topic: str, expected: tuple[str, str | None] | None) -> None:
    assert parse_topic(topic) == expected
