"""kvaware-scorer plugin: session affinity (``scorers: [{type: session-affinity}]``)."""

from __future__ import annotations

from kvaware_session_affinity.plugin import SessionAffinityScorer, SessionTable

__all__ = ["SessionAffinityScorer", "SessionTable"]
__version__ = "0.1.0"
