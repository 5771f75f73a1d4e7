"""vLLM's endpoint rules: per data-parallel-rank offsets and bind-versus-connect.

vLLM rewrites both the publisher and the replay endpoint for DP rank r > 0: a TCP port
P != 0 becomes P + r (the text after the last ``:`` is the port), ``inproc://name``
becomes ``inproc://name_dp<r>``, and ``ipc://`` endpoints cannot be used with r > 0.
"""

from __future__ import annotations

from kvaware_scorer.errors import ConfigError


def rank_endpoint(endpoint: str, rank: int) -> str:
    """The address DP rank ``rank`` publishes on, given the configured ``endpoint``."""
    if rank < 0:
        raise ConfigError(f"data-parallel rank must be >= 0, got {rank}")
    if rank == 0:
        return endpoint
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{rank}"
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"endpoint {endpoint!r} has no numeric port; use tcp://HOST:PORT")
        if int(port) == 0:
            return endpoint
        return f"{host}:{int(port) + rank}"
    raise ConfigError(
        f"endpoint {endpoint!r} cannot be offset for data-parallel rank {rank}: "
        "vLLM accepts only tcp:// or inproc:// endpoints with data parallelism"
    )


def publisher_binds(endpoint: str) -> bool:
    """Whether vLLM's publisher binds (True) or connects (False) to ``endpoint``."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def parse_topic(topic: str) -> tuple[str, str | None] | None:
    """``kv@<pod>@<model>`` -> (pod, model); ``kv@<pod>`` -> (pod, None); else None."""
    parts = topic.split("@", 2)
    if len(parts) < 2 or parts[0] != "kv" or not parts[1]:
        return None
    model = parts[2] if len(parts) == 3 and parts[2] else None
    return parts[1], model
