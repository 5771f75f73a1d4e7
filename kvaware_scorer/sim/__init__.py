"""Simulated vLLM engines: a deterministic model of one v1 engine and calibrated profiles.

:class:`SimEngine` schedules :class:`SimRequest` objects step by step with vLLM's
continuous batching, prefix caching and eviction rules, and publishes the KV events a real
pod would (``docs/simulator-engine.md``). :func:`profile` returns the
:class:`EngineConfig` of a named, calibrated pod type.
"""

from __future__ import annotations

from kvaware_scorer.sim.engine import (
    HASH_ALGOS,
    EngineConfig,
    SimEngine,
    SimRequest,
    StepResult,
    generated_tokens,
)
from kvaware_scorer.sim.profiles import PROFILES, profile
from kvaware_scorer.sim.steptime import StepTimeModel

__all__ = [
    "HASH_ALGOS",
    "PROFILES",
    "EngineConfig",
    "SimEngine",
    "SimRequest",
    "StepResult",
    "StepTimeModel",
    "generated_tokens",
    "profile",
]
