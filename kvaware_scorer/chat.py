"""Chat requests as vLLM's OpenAI server prepares them for the chat template.

This module turns the ``messages`` and ``tools`` of an OpenAI chat-completions request
into the ``conversation`` and tool list that vLLM hands to ``apply_chat_template``, so
that :mod:`kvaware_scorer.tokenization` renders the very text vLLM renders. It is a
port of the text-only part of vLLM's ``chat_utils.parse_chat_messages`` /
``_postprocess_messages``, the request-side normalisation of ``ChatCompletionRequest``
and ``ChatCompletionToolsParam``, and the template heuristics of ``renderers/hf.py``:

- **Content.** A string, ``None`` (empty) or a list of content parts. Text parts
  (``text``, ``input_text``, ``output_text``, ``refusal``, ``thinking``, bare strings)
  are joined with ``"\\n"`` for templates that read ``message.content`` as a string (the
  "string" content format); for templates that loop over ``message['content']`` (the
  "openai" format) each becomes ``{"type": "text", "text": ...}``, exactly as vLLM
  decides by inspecting the template. A text or refusal part whose text is ``None`` is
  skipped, as vLLM does.
- **Multimodal parts** (``image_url``, ``input_image``, ``image_pil``, ``image_embeds``,
  ``input_audio``, ``audio_url``, ``audio_embeds``, ``video_url``, ``prompt_embeds``) are
  refused with :class:`TokenizationError` (``reason="multimodal"``). vLLM replaces each
  with the model's placeholder string and then lets the model's multimodal processor
  expand it into a number of placeholder tokens that depends on the image itself; we do
  not run processors, so every token from the first item on would be wrong, and a
  silently wrong token list would make the router believe in cache hits that are not
  there. The router should count the error and score the request without a prefix.
- **Message fields kept**, as in vLLM: ``role``, ``content``; for assistants
  ``tool_calls`` (function ``arguments`` given as JSON strings are parsed into objects,
  unparsable ones become ``{}``, an empty list is dropped) and ``reasoning`` (also
  exposed as ``reasoning_content``; the deprecated request field ``reasoning_content``
  is accepted as an alias); for tools ``tool_call_id``; ``name`` and ``task`` when they
  are strings; for ``developer`` messages ``tools``. Any other key is dropped.
- **Tools** are normalised as vLLM's pydantic models dump them:
  ``{"type": "function", "function": {"name", "description", "parameters", ...}}`` with
  missing ``description``/``parameters`` as ``null`` and unknown function fields kept
  after them. Templates that ``tojson`` the tools therefore see vLLM's key order.

Errors are :class:`TokenizationError` (a ``ValueError``) with a stable ``reason``.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import Any, Literal

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox

from kvaware_scorer.errors import KVAwareError

__all__ = [
    "MULTIMODAL_PART_TYPES",
    "TEXT_PART_TYPES",
    "ContentFormat",
    "TokenizationError",
    "conversation_from_messages",
    "detect_content_format",
    "normalize_tools",
    "template_variables",
]

ContentFormat = Literal["string", "openai"]
"""How a chat template reads ``message.content``: as a string, or as OpenAI parts."""

TEXT_PART_TYPES: dict[str, str] = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
"""Content-part types that carry text, and the key holding it."""

MULTIMODAL_PART_TYPES = frozenset(
    {
        "image_url",
        "input_image",
        "image_pil",
        "image_embeds",
        "audio_url",
        "input_audio",
        "audio_embeds",
        "video_url",
        "prompt_embeds",
    }
)
"""Content-part types that need vLLM's multimodal processor (refused here)."""

# Parts without a "type" are recognised by these keys (vLLM's fallback), in this order.
_UNTYPED_MEDIA_KEYS = (
    "image_url",
    "image_pil",
    "image_embeds",
    "audio_embeds",
    "prompt_embeds",
    "audio_url",
    "input_audio",
    "video_url",
)

# Part types whose None text is skipped rather than rejected (vLLM logs and skips).
_SKIP_NONE_TYPES = frozenset({"text", "refusal"})


class TokenizationError(KVAwareError, ValueError):
    """A request cannot be tokenized as vLLM would; the message says why.

    ``reason`` is a short, stable label suitable as a counter key: ``bad_messages``,
    ``bad_tools``, ``multimodal``, ``bad_prompt``, ``bad_token_ids``, ``empty_prompt``,
    ``generation_prompt_conflict``, ``bad_template_kwargs``, ``template_error``,
    ``no_chat_template`` or ``encode_failed``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _bad(message: str) -> TokenizationError:
    return TokenizationError("bad_messages", message)


# --------------------------------------------------------------------------- messages


def _part_text(part: object, where: str) -> tuple[str, str] | None:
    """``(kind, text)`` of one content part (kind ``text`` or ``tool_reference``), or
    ``None`` when vLLM skips the part. Raises for multimodal and malformed parts."""
    if isinstance(part, str):
        return "text", part
    if not isinstance(part, Mapping):
        raise _bad(f"{where} must be a string or an object, got {type(part).__name__}")
    part_type = part.get("type")
    uuid = part.get("uuid")
    if isinstance(part_type, str) and uuid is None:
        if part_type in TEXT_PART_TYPES:
            value = part.get(TEXT_PART_TYPES[part_type])
            if value is None and part_type in _SKIP_NONE_TYPES:
                return None
            if not isinstance(value, str):
                raise _bad(f"{where} ({part_type!r}) needs a string {TEXT_PART_TYPES[part_type]!r}")
            return "text", value
        if part_type == "tool_reference":
            name = part.get("name")
            if not isinstance(name, str):
                raise _bad(f"{where} (tool_reference) needs a string 'name'")
            return "tool_reference", name
        if part_type in MULTIMODAL_PART_TYPES:
            raise _multimodal(part_type, where)
        supported = sorted({*TEXT_PART_TYPES, "tool_reference", *MULTIMODAL_PART_TYPES})
        raise _bad(
            f"{where}: unsupported chat content part type {part_type!r}; "
            f"supported types: {', '.join(supported)}"
        )
    if part_type is None or uuid is not None:
        for key in _UNTYPED_MEDIA_KEYS:
            if key in part:
                raise _multimodal(key, where)
        if "tool_reference" in part:
            name = part.get("tool_reference")
            if not isinstance(name, str):
                raise _bad(f"{where} (tool_reference) needs a string name")
            return "tool_reference", name
        raise _bad(f"{where}: missing 'type' field in content part")
    raise _bad(f"{where}: invalid 'type' field in content part ({part_type!r})")


def _multimodal(part_type: str, where: str) -> TokenizationError:
    return TokenizationError(
        "multimodal",
        f"{where} is a {part_type!r} part: multimodal content cannot be tokenized without "
        "the model's multimodal processor (vLLM expands it into image/audio placeholder "
        "tokens whose number depends on the media), so this request has no exact token "
        "ids; score it without a cached prefix",
    )


def _content(
    content: object, content_format: ContentFormat, where: str
) -> str | list[dict[str, str]]:
    if content is None:
        parts: Sequence[object] = []
    elif isinstance(content, str):
        parts = [content]
    elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        parts = content
    else:
        raise _bad(
            f"{where}.content must be a string, a list of content parts or null, "
            f"got {type(content).__name__}"
        )
    pieces: list[tuple[str, str]] = []
    for j, part in enumerate(parts):
        piece = _part_text(part, f"{where}.content[{j}]")
        if piece is not None:
            pieces.append(piece)
    if content_format == "string":
        return "\n".join(text for _, text in pieces)
    return [
        {"type": "text", "text": text} if kind == "text" else {"type": kind, "name": text}
        for kind, text in pieces
    ]


def _tool_calls(value: object, where: str) -> list[Any]:
    """A copy of an assistant's ``tool_calls`` with vLLM's argument post-processing."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise _bad(f"{where}.tool_calls must be a list")
    calls: list[Any] = []
    for k, call in enumerate(value):
        if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
            raise _bad(f"{where}.tool_calls[{k}] must be an object with a 'function' object")
        function = dict(call["function"])
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments)
            except json.JSONDecodeError:
                function["arguments"] = {}
        elif not isinstance(arguments, (dict, list)):
            function["arguments"] = {}
        copied = dict(call)
        copied["function"] = function
        calls.append(copied)
    return calls


def conversation_from_messages(
    messages: object, content_format: ContentFormat = "string"
) -> list[dict[str, Any]]:
    """The conversation vLLM passes to the chat template for these request messages.

    ``messages`` is the request's ``messages`` list (OpenAI shape). The input is not
    modified. Raises :class:`TokenizationError` (``bad_messages`` or ``multimodal``).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise _bad(f"messages must be a list of message objects, got {type(messages).__name__}")
    if not messages:
        raise _bad("messages must not be empty")
    conversation: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise _bad(
                f"{where} must be an object with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(f"{where}.role must be a non-empty string")
        out: dict[str, Any] = {"role": role}
        content = _content(message.get("content"), content_format, where)
        if (
            role == "tool"
            and isinstance(content, list)
            and all(part.get("type") == "text" for part in content)
        ):
            content = "\n".join(part["text"] for part in content)
        out["content"] = content
        if role == "assistant":
            tool_calls = message.get("tool_calls")
            if tool_calls is not None:
                calls = _tool_calls(tool_calls, where)
                if calls:
                    out["tool_calls"] = calls
            reasoning = message.get("reasoning")
            if reasoning is None:
                reasoning = message.get("reasoning_content")
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise _bad(f"{where}.reasoning must be a string")
                out["reasoning"] = reasoning
                out["reasoning_content"] = reasoning
        elif role == "tool" and "tool_call_id" in message:
            out["tool_call_id"] = message["tool_call_id"]
        if isinstance(message.get("name"), str):
            out["name"] = message["name"]
        if isinstance(message.get("task"), str):
            out["task"] = message["task"]
        if role == "developer":
            out["tools"] = message.get("tools")
        conversation.append(out)
    return conversation


# ------------------------------------------------------------------------------ tools

_FUNCTION_FIELDS = ("name", "description", "parameters")


def normalize_tools(tools: object) -> list[dict[str, Any]] | None:
    """The request's ``tools`` as vLLM dumps them for the template (``None`` stays None).

    Raises :class:`TokenizationError` (``bad_tools``) for a malformed list.
    """
    if tools is None:
        return None
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise TokenizationError("bad_tools", "tools must be a list of tool objects")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise TokenizationError("bad_tools", f"{where} must be an object")
        kind = tool.get("type", "function")
        if kind != "function":
            raise TokenizationError("bad_tools", f"{where}.type must be 'function', got {kind!r}")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise TokenizationError("bad_tools", f"{where}.function must be an object")
        name = function.get("name")
        description = function.get("description")
        parameters = function.get("parameters")
        if not isinstance(name, str):
            raise TokenizationError("bad_tools", f"{where}.function.name must be a string")
        if description is not None and not isinstance(description, str):
            raise TokenizationError("bad_tools", f"{where}.function.description must be a string")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise TokenizationError("bad_tools", f"{where}.function.parameters must be an object")
        dumped: dict[str, Any] = {
            "name": name,
            "description": description,
            "parameters": dict(parameters) if parameters is not None else None,
        }
        defer_loading = function.get("defer_loading")
        if defer_loading is None:
            defer_loading = tool.get("defer_loading")
        if defer_loading is not None:
            dumped["defer_loading"] = defer_loading
        for key, value in function.items():
            if key not in _FUNCTION_FIELDS and key != "defer_loading":
                dumped[key] = value
        entry: dict[str, Any] = {"type": "function", "function": dumped}
        if tool.get("defer_loading") is not None:
            entry["defer_loading"] = tool["defer_loading"]
        out.append(entry)
    return out


# -------------------------------------------------------------------------- templates


class _GenerationTag(jinja2.ext.Extension):
    """Parses transformers' ``{% generation %}`` blocks (used for assistant masks)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> Any:  # pragma: no cover - parse only
        return caller()


def _parse(template: str) -> jinja2.nodes.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    return env.parse(template)


@lru_cache(maxsize=64)
def template_variables(template: str) -> frozenset[str]:
    """Names a chat template reads from its context (Jinja's undeclared variables).

    Raises ``jinja2.TemplateSyntaxError`` for a template that does not parse.
    """
    return frozenset(jinja2.meta.find_undeclared_variables(_parse(template)))


def _is_name(node: jinja2.nodes.Node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name


def _is_item(node: jinja2.nodes.Node, name: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return (
            _is_name(node.node, name)
            and isinstance(node.arg, jinja2.nodes.Const)
            and node.arg.value == key
        )
    if isinstance(node, jinja2.nodes.Getattr):
        return _is_name(node.node, name) and node.attr == key
    return False


def _reads(node: jinja2.nodes.Node, name: str, key: str | None = None) -> bool:
    """Whether ``node`` is ``name`` (or ``name[key]``), possibly filtered, tested or sliced."""
    if isinstance(node, jinja2.nodes.Filter):
        return node.node is not None and _reads(node.node, name, key)
    if isinstance(node, jinja2.nodes.Test):
        return _reads(node.node, name, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return _reads(node.node, name, key)
    return _is_item(node, name, key) if key else _is_name(node, name)


def _aliases(root: jinja2.nodes.Template, name: str) -> Iterator[str]:
    """``name`` and every variable assigned from it (transitively)."""
    yield name
    pending = deque([name])
    seen = {name}
    while pending:
        current = pending.popleft()
        for assign in root.find_all(jinja2.nodes.Assign):
            target = assign.target
            if isinstance(target, jinja2.nodes.Name) and _reads(assign.node, current):
                yield target.name
                if target.name not in seen:
                    seen.add(target.name)
                    pending.append(target.name)


def _loop_targets(root: jinja2.nodes.Template, sources: list[str], key: str | None) -> list[str]:
    targets: list[str] = []
    for loop in root.find_all(jinja2.nodes.For):
        if isinstance(loop.target, jinja2.nodes.Name) and any(
            _reads(loop.iter, source, key) for source in sources
        ):
            targets.append(loop.target.name)
    return targets


@lru_cache(maxsize=64)
def detect_content_format(template: str) -> ContentFormat:
    """vLLM's heuristic: ``"openai"`` when the template loops over a message's content
    (``{% for part in message['content'] %}``), else ``"string"``.

    A template that does not parse counts as ``"string"`` (vLLM's default).
    """
    try:
        root = _parse(template)
    except jinja2.TemplateError:
        return "string"
    message_vars = _loop_targets(root, list(_aliases(root, "messages")), None)
    if _loop_targets(root, message_vars, "content"):
        return "openai"
    return "string"
