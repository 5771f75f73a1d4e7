"""Value types shared by the pipeline and its components."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvaware_scorer.keys import MultiModalItem


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A serving pod the router can send requests to.

    ``id`` is the one identifier used everywhere: in the index (the pod name in KV-event
    topics or the name a pod is dialed under), in metrics and in decisions.
    """

    id: str
    url: str = ""
    models: frozenset[str] = frozenset()
    adapters: frozenset[str] = frozenset()
    labels: Mapping[str, str] = field(default_factory=dict)
    healthy: bool = True

    def serves(self, model: str) -> bool:
        """Whether this endpoint serves ``model`` (a base model or a LoRA adapter).

        An endpoint that lists no models serves every model.
        """
        return not self.models or model in self.models or model in self.adapters


@dataclass(slots=True)
class RoutingRequest:
    """One request to route. Built by the router from the HTTP request.

    Either ``token_ids`` is given, or the pipeline tokenizes ``prompt`` (completions) or
    ``messages`` (chat) once, with the model's tokenizer, and caches the result here.
    ``model`` is the name in the request body; when it names a LoRA adapter, ``lora_name``
    is set by the pipeline and the adapter's namespace is used for keys.
    """

    model: str
    prompt: str | list[int] | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    token_ids: list[int] | None = None
    lora_name: str | None = None
    cache_salt: str | None = None
    mm_items: Sequence[MultiModalItem] = ()
    tools: Sequence[Mapping[str, Any]] | None = None
    add_generation_prompt: bool | None = None  # None: as the request left it (vLLM's default)
    continue_final_message: bool = False
    chat_template_kwargs: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    max_tokens: int | None = None
    request_id: str = ""
    # Filled in by the pipeline, shared by every component for this request.
    block_keys: list[int] | None = None
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ScoredEndpoint:
    """An endpoint with its weighted total and the per-scorer raw scores in [0, 1]."""

    endpoint: Endpoint
    total: float
    scores: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one route: the chosen endpoint and why."""

    endpoint: Endpoint
    ranked: Sequence[ScoredEndpoint]
    weights: Mapping[str, float]
    filtered_out: Mapping[str, Sequence[str]]
    failed_scorers: Sequence[str]
    predicted_cached_tokens: int
    prompt_tokens: int
    timings_ms: Mapping[str, float]

    def explain(self) -> dict[str, Any]:
        """A JSON-ready explanation (for logs and the debug endpoint)."""
        return {
            "endpoint": self.endpoint.id,
            "prompt_tokens": self.prompt_tokens,
            "predicted_cached_tokens": self.predicted_cached_tokens,
            "weights": dict(self.weights),
            "ranked": [
                {
                    "endpoint": s.endpoint.id,
                    "total": round(s.total, 6),
                    "scores": {k: round(v, 6) for k, v in s.scores.items()},
                }
                for s in self.ranked
            ],
            "filtered_out": {k: list(v) for k, v in self.filtered_out.items()},
            "failed_scorers": list(self.failed_scorers),
            "timings_ms": {k: round(v, 4) for k, v in self.timings_ms.items()},
        }
