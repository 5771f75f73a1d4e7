"""A KV-cache-aware OpenAI router for vLLM pods, built on ``kvaware_scorer.pipeline``.

Run it from the repository root with ``python -m examples.vllm_router --config
examples/vllm_router/config.yaml``; see ``README.md`` in this directory. Modules, one job
each: ``settings`` (the YAML), ``openai_api`` (request bodies and error shapes), ``sse``
(streamed usage), ``health`` (backend health), ``metrics`` (router counters), ``proxy``
(forwarding and failover), ``app`` (the server), ``cli`` (the command).
"""

from __future__ import annotations

from .app import Router
from .settings import RouterConfig, Settings, load_settings, parse_settings

__all__ = ["Router", "RouterConfig", "Settings", "load_settings", "parse_settings"]
