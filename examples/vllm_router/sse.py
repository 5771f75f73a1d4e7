"""Server-sent events of a streamed completion: usage extraction and the extra usage chunk.

The router needs each streamed request's ``usage`` (prompt and cached tokens) for
``Pipeline.finished``. vLLM sends it in a final chunk (``choices: []``) only when the
request asks with ``stream_options.include_usage``, so the router asks on the client's
behalf (:func:`ask_for_usage`) and, when the client did not ask, removes that chunk again
(:class:`SSEFilter`). Everything else passes through unchanged, event by event, as soon
as an event is complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_SEPARATORS = (b"\r\n\r\n", b"\n\n")


def ask_for_usage(body: dict[str, Any]) -> bool:
    """Make a streaming body ask for usage; True when the router added the request.

    Only a ``stream: true`` body is changed (vLLM refuses ``stream_options`` otherwise).
    """
    if body.get("stream") is not True:
        return False
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        return False  # malformed: left for vLLM to refuse
    if options is not None and options.get("include_usage") is True:
        return False
    merged = dict(options) if options is not None else {}
    merged["include_usage"] = True
    body["stream_options"] = merged
    return True


def usage_numbers(usage: Any) -> tuple[int | None, int | None]:
    """``(prompt_tokens, cached_tokens)`` of an OpenAI ``usage`` object (None when absent)."""
    if not isinstance(usage, Mapping):
        return None, None
    prompt = usage.get("prompt_tokens")
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    return (
        prompt if isinstance(prompt, int) else None,
        cached if isinstance(cached, int) else None,
    )


class SSEFilter:
    """Splits an SSE byte stream into events, records usage, drops the injected usage chunk.

    ``feed(chunk)`` returns the bytes to forward now (the complete events in the buffer,
    minus the dropped one); ``flush()`` returns what is left at the end of the stream.
    """

    def __init__(self, strip_usage_chunk: bool) -> None:
        self.strip_usage_chunk = strip_usage_chunk
        self.prompt_tokens: int | None = None
        self.cached_tokens: int | None = None
        self.events = 0
        self.done = False
        self.error: str | None = None
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """Take a chunk from upstream; return the complete events to forward."""
        self._buffer += chunk
        out: list[bytes] = []
        while True:
            cut, size = self._next_separator()
            if cut < 0:
                break
            event = self._buffer[: cut + size]
            self._buffer = self._buffer[cut + size :]
            if self._keep(event[:cut]):
                out.append(event)
        return b"".join(out)

    def flush(self) -> bytes:
        """The incomplete event left at the end of the stream (forwarded as is)."""
        rest, self._buffer = self._buffer, b""
        if rest.strip() and not self._keep(rest):
            return b""
        return rest

    def _next_separator(self) -> tuple[int, int]:
        found = [(self._buffer.find(sep), len(sep)) for sep in _SEPARATORS]
        hits = [f for f in found if f[0] >= 0]
        return min(hits) if hits else (-1, 0)

    def _keep(self, event: bytes) -> bool:
        data = b"\n".join(
            line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
        )
        if not data:
            return True
        self.events += 1
        if data.strip() == b"[DONE]":
            self.done = True
            return True
        if b'"usage"' not in data and b'"error"' not in data:
            return True
        try:
            payload = json.loads(data)
        except ValueError:
            return True
        if not isinstance(payload, Mapping):
            return True
        if isinstance(payload.get("error"), Mapping):
            self.error = str(payload["error"].get("message", "error event"))
        usage = payload.get("usage")
        if isinstance(usage, Mapping):
            prompt, cached = usage_numbers(usage)
            self.prompt_tokens = prompt if prompt is not None else self.prompt_tokens
            self.cached_tokens = cached if cached is not None else self.cached_tokens
            if self.strip_usage_chunk and payload.get("choices") == []:
                return False
        return True
