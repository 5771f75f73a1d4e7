"""The OpenAI-compatible request and response shapes the router reads and writes.

:func:`routing_request` turns a ``/v1/completions`` or ``/v1/chat/completions`` body into
the :class:`~kvaware_scorer.types.RoutingRequest` the pipeline scores, taking exactly the
fields that change the prompt's tokens (``messages``/``prompt``, ``tools``,
``add_generation_prompt``, ``continue_final_message``, ``chat_template_kwargs``,
``cache_salt``) plus ``max_tokens`` and the headers. Errors use OpenAI's error shape.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from kvaware_scorer.types import Endpoint, RoutingRequest

Kind = Literal["completion", "chat"]


class RequestError(Exception):
    """A client error, answered with OpenAI's error JSON and ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        """The error as a JSON-ready mapping."""
        return error_body(self.status, self.message, self.param)


_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "RequestTooLargeError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape (vLLM's too): ``{"error": {message, type, param, code}}``."""
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "InternalServerError"),
            "param": param,
            "code": status,
        }
    }


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; raises :class:`RequestError` (400) otherwise."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def kind_of(body: Mapping[str, Any]) -> Kind:
    """Chat when the body has ``messages``, else completion (for the debug endpoint)."""
    return "chat" if "messages" in body else "completion"


def routing_request(
    kind: Kind, body: Mapping[str, Any], headers: Mapping[str, str]
) -> RoutingRequest:
    """The pipeline's view of a request body; raises :class:`RequestError` (400)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "`model` is required and must be a string", "model")
    request = RoutingRequest(
        model=model,
        headers={k.lower(): v for k, v in headers.items()},
        request_id=headers.get("x-request-id") or uuid.uuid4().hex,
        max_tokens=_optional_int(body, "max_tokens"),
        cache_salt=_optional_str(body, "cache_salt"),
    )
    if kind == "chat":
        max_completion = _optional_int(body, "max_completion_tokens")
        if max_completion is not None:
            request.max_tokens = max_completion
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "`messages` must be a non-empty list", "messages")
        if not all(isinstance(m, Mapping) for m in messages):
            raise RequestError(400, "every message must be an object", "messages")
        request.messages = messages
        tools = body.get("tools")
        if tools is not None:
            if not isinstance(tools, list):
                raise RequestError(400, "`tools` must be a list", "tools")
            request.tools = tools
        request.add_generation_prompt = _optional_bool(body, "add_generation_prompt")
        request.continue_final_message = bool(_optional_bool(body, "continue_final_message"))
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None:
            if not isinstance(kwargs, Mapping):
                raise RequestError(
                    400, "`chat_template_kwargs` must be an object", "chat_template_kwargs"
                )
            request.chat_template_kwargs = kwargs
    else:
        request.prompt = _first_prompt(body.get("prompt"))
    return request


def _first_prompt(prompt: Any) -> str | list[int]:
    """The prompt to route by: the string, the token ids, or a batch's first prompt."""
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        first = prompt[0]
        if isinstance(first, str) and first:
            return first
        if (
            isinstance(first, list)
            and first
            and all(isinstance(t, int) and not isinstance(t, bool) for t in first)
        ):
            return first
    raise RequestError(
        400, "`prompt` must be a non-empty string, token-id list, or a batch of them", "prompt"
    )


def _optional_int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(400, f"`{key}` must be an integer", key)
    return value


def _optional_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(400, f"`{key}` must be a string", key)
    return value


def _optional_bool(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise RequestError(400, f"`{key}` must be true or false", key)
    return value


def check_model(model: str, endpoints: Sequence[Endpoint]) -> None:
    """Raise a 404 :class:`RequestError` when no backend serves ``model``."""
    if not any(e.serves(model) for e in endpoints):
        raise RequestError(404, f"The model `{model}` does not exist.", "model")


def models_body(endpoints: Sequence[Endpoint], created: int) -> dict[str, Any]:
    """``GET /v1/models``: the union of the backends' models and adapters."""
    data: dict[str, dict[str, Any]] = {}
    for endpoint in endpoints:
        for model in sorted(endpoint.models):
            data.setdefault(model, _model_card(model, created, None))
        base = min(endpoint.models) if endpoint.models else None
        for adapter in sorted(endpoint.adapters):
            data.setdefault(adapter, _model_card(adapter, created, base))
    return {"object": "list", "data": [data[k] for k in sorted(data)]}


def _model_card(model: str, created: int, parent: str | None) -> dict[str, Any]:
    return {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "kvaware-router",
        "root": parent or model,
        "parent": parent,
    }
