"""Request tokenization for the scoring path, exactly as vLLM's OpenAI server does it.

The router must hash the same token ids the pod will compute, so a request is tokenized
the way vLLM tokenizes it:

- ``/v1/completions``: a string prompt is encoded **with** the tokenizer's special
  tokens (BOS and the like; ``add_special_tokens`` defaults to true there); a prompt
  given as token ids is used as is, after vLLM's validation (ints in ``[0, vocab)``).
- ``/v1/chat/completions``: the messages are normalised as vLLM does
  (:mod:`kvaware_scorer.chat`), the chat template is rendered with transformers'
  ``apply_chat_template(..., tokenize=False)`` (``add_generation_prompt`` defaults to
  true; ``continue_final_message`` leaves the last message open), and the rendered
  text is encoded **without** special tokens (``add_special_tokens`` defaults to false:
  the template writes them; adding them again would double Llama 3's BOS).

Tokenizers are built at start-up by :func:`load_tokenizer` (never on the request path)
from a :class:`TokenizerSpec`: a local directory, or a Hugging Face model id resolved
**only from the local cache**. Nothing is ever downloaded: every load passes
``local_files_only=True``. Routers must also set ``HF_HUB_OFFLINE=1`` in their
environment so that no library call can reach the hub (a missing id then fails in about
a second instead of retrying DNS for 45 s); the loader logs a warning when it is unset.
Configuration mistakes (bad path, missing files, id not in the cache, no chat template,
template that does not parse) raise :class:`~kvaware_scorer.errors.ConfigError` naming
the model and the fix. Request mistakes raise :class:`TokenizationError` (a
``ValueError``) with a stable ``reason``.

**Caching.** Tokenizing an 8k-token prompt costs about 10-40 ms, twenty times the
hashing and index lookups of a score, and requests repeat: the same prompt is retried,
and conversations and agents resend a long shared prefix (system prompt, tools,
earlier turns). :class:`RequestTokenizer` therefore keeps two bounded LRU caches:

- an **exact cache** keyed by a 128-bit BLAKE2b digest of (model, rendered text,
  ``add_special_tokens``) holding the final ids;
- a **segment cache**: the text is cut at every occurrence of the tokenizer's added
  tokens (``<|im_start|>``, ``<|im_end|>``, ...). The tokenizer isolates those tokens
  before normalisation and pre-tokenization, so encoding the pieces separately and
  concatenating them gives the ids of the whole text; the pieces' ids are cached, so a
  new turn in a conversation, or a new question under a shared system prompt, only
  encodes the text that is new. Cache misses of one request are encoded in one
  ``encode_batch_fast`` call, which runs without the GIL.

Segment parity is not assumed: at load a self-check encodes built-in samples (text
right after and before special tokens, leading spaces, newlines, Unicode that NFC
changes, the rendered chat template) both ways and compares them with transformers'
own ``encode``; if they differ (for example SentencePiece tokenizers that prepend "▁"
only at offset 0), the tokenizer falls back to whole-text encoding with the exact cache
only, and if even that differs from transformers, to transformers' ``encode``. The mode
is reported by :meth:`RequestTokenizer.stats`. The tests compare segment-wise and
whole-text ids on hundreds of generated chats for the shipped tiny tokenizer and Qwen3.

**Threads.** A :class:`RequestTokenizer` may be called from many threads: the caches
and counters are guarded by one lock held only for dictionary operations; encoding and
template rendering run outside it; nothing on the call path does I/O.

**Not covered:** multimodal content (refused, see :mod:`kvaware_scorer.chat`);
processor-level chat templates of multimodal models (``chat_template.json``; set
``chat_template`` explicitly); vLLM's ``--tokenizer-mode mistral``; ``truncate_prompt_tokens``
(apply it to the returned ids); batched prompts (call once per prompt).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import threading
import time
from array import array
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import jinja2

from kvaware_scorer.chat import (
    ContentFormat,
    TokenizationError,
    conversation_from_messages,
    detect_content_format,
    normalize_tools,
    template_variables,
)
from kvaware_scorer.errors import ConfigError

__all__ = [
    "TINY_CHAT_DIR",
    "TINY_CHAT_MODEL",
    "CacheConfig",
    "RequestTokenizer",
    "TokenizationError",
    "TokenizerSpec",
    "load_tokenizer",
    "load_tokenizers",
    "tiny_chat_spec",
]

logger = logging.getLogger(__name__)

TINY_CHAT_MODEL = "kvaware/tiny-chat"
"""Model name under which the demo and the tests use the shipped tiny tokenizer."""

TINY_CHAT_DIR = Path(__file__).resolve().parent / "data" / "tiny-chat"
"""Directory of the shipped tiny tokenizer (byte-level BPE, ChatML template)."""

EncodeMode = Literal["segment", "whole", "transformers"]

# Chat-template kwargs handled by name (apply_chat_template's own parameters).
_FORBIDDEN_KWARGS = frozenset({"chat_template", "tokenize"})  # vLLM rejects these
_DUPLICATE_KWARGS = frozenset({"conversation", "tools"})  # passed as arguments instead
_IGNORED_KWARGS = frozenset(
    {"return_dict", "return_tensors", "padding", "return_assistant_tokens_mask"}
)  # no effect on one sequence's ids
_UNSUPPORTED_KWARGS = frozenset(
    {"truncation", "max_length", "tokenizer_kwargs", "sanitize_control_tokens"}
)  # would change the ids in ways this module does not reproduce
_FLAG_KWARGS = frozenset({"add_generation_prompt", "continue_final_message"})

_SHORT_SEGMENT = 64  # segments up to this many characters are their own cache key
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class TokenizerSpec:
    """Where a model's tokenizer comes from.

    ``model`` is the served model name (as in requests). ``source`` is a local directory
    holding ``tokenizer.json`` and ``tokenizer_config.json``, or a Hugging Face model id
    already in the local cache (``revision`` picks a cached branch, tag or commit; it is
    an error with a directory). ``chat_template`` overrides the tokenizer's template,
    like vLLM's ``--chat-template``: Jinja text (anything containing ``{``, ``}`` or a
    newline) or the path of a ``.jinja`` file. ``content_format`` mirrors vLLM's
    ``--chat-template-content-format`` (``auto`` detects it from the template) and
    ``default_chat_template_kwargs`` its ``--default-chat-template-kwargs`` (request
    kwargs override them).
    """

    model: str
    source: str
    chat_template: str | None = None
    revision: str | None = None
    content_format: Literal["auto", "string", "openai"] = "auto"
    default_chat_template_kwargs: Mapping[str, Any] | None = field(
        default=None, hash=False, compare=False
    )


@dataclass(frozen=True)
class CacheConfig:
    """Bounds of a :class:`RequestTokenizer`'s caches (entries and total token ids).

    Ids are stored as 4-byte unsigned ints, so the defaults cap each cache near 32 MB
    of ids (plus about 150 bytes of bookkeeping per entry). Zero entries disables a
    cache.
    """

    exact_entries: int = 2048
    exact_tokens: int = 8_000_000
    segment_entries: int = 16_384
    segment_tokens: int = 8_000_000


def tiny_chat_spec() -> TokenizerSpec:
    """The spec of the shipped tiny tokenizer, served as ``kvaware/tiny-chat``."""
    return TokenizerSpec(model=TINY_CHAT_MODEL, source=str(TINY_CHAT_DIR))


# ----------------------------------------------------------------------------- caches


class _LRU:
    """A bounded LRU map from a key to token ids; the owner holds the lock."""

    __slots__ = ("_data", "evictions", "max_entries", "max_tokens", "tokens")

    def __init__(self, max_entries: int, max_tokens: int) -> None:
        self._data: OrderedDict[object, array[int]] = OrderedDict()
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self.tokens = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: object) -> array[int] | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: object, value: array[int]) -> None:
        if self.max_entries <= 0 or len(value) > self.max_tokens or key in self._data:
            return
        self._data[key] = value
        self.tokens += len(value)
        while len(self._data) > self.max_entries or self.tokens > self.max_tokens:
            _, old = self._data.popitem(last=False)
            self.tokens -= len(old)
            self.evictions += 1

    def clear(self) -> None:
        self._data.clear()
        self.tokens = 0


def _ids(values: Iterable[int]) -> array[int]:
    return array("I", values)


# -------------------------------------------------------------------------- tokenizer


class RequestTokenizer:
    """Tokenizes completion and chat requests for one model, with caches.

    Build it with :func:`load_tokenizer`. Every method is thread-safe.
    """

    def __init__(
        self,
        spec: TokenizerSpec,
        hf_tokenizer: Any,
        *,
        chat_template: str | None = None,
        cache: CacheConfig | None = None,
        self_check: bool = True,
    ) -> None:
        """Wrap an already loaded transformers fast tokenizer (see :func:`load_tokenizer`).

        ``chat_template`` is the resolved override text, if any.
        """
        import tokenizers

        self.spec = spec
        self.model = spec.model
        self._hf = hf_tokenizer
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise ConfigError(
                f"tokenizer for model {spec.model!r} ({spec.source}) is not a fast "
                "tokenizer; kvaware-scorer needs its tokenizer.json (convert the "
                "tokenizer with transformers and save it, then point source at that directory)"
            )
        # A private copy: transformers mutates its backend's truncation and padding per
        # call, which is neither thread-safe nor what we want.
        self._backend = tokenizers.Tokenizer.from_str(backend.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        self._backend.encode_special_tokens = bool(backend.encode_special_tokens)
        self._batch_encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)
        vocab = self._backend.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1 if vocab else 0
        """One more than the largest token id (vLLM's ``max_token_id + 1``)."""

        cache = cache or CacheConfig()
        self._lock = threading.Lock()
        self._hf_lock = threading.Lock()
        self._exact = _LRU(cache.exact_entries, cache.exact_tokens)
        self._segments = _LRU(cache.segment_entries, cache.segment_tokens)
        self._counts: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._digest_prefix = spec.model.encode("utf-8", "surrogatepass") + b"\x00"

        # Chat templates (plain and with tools), their content format and variables.
        self._templates: dict[bool, str | None] = {}
        for with_tools in (False, True):
            try:
                template = hf_tokenizer.get_chat_template(
                    chat_template, tools=[] if with_tools else None
                )
            except ValueError:
                template = None
            self._templates[with_tools] = template if isinstance(template, str) else None
        self._formats: dict[bool, ContentFormat] = {}
        self._variables: dict[bool, frozenset[str]] = {}
        for with_tools, template in self._templates.items():
            if template is None:
                continue
            try:
                self._variables[with_tools] = template_variables(template)
            except jinja2.TemplateError as exc:
                raise ConfigError(
                    f"chat template of model {spec.model!r} does not parse: {exc}; fix it "
                    "or override it with chat_template in the model's tokenizer spec"
                ) from exc
            if spec.content_format == "auto":
                self._formats[with_tools] = detect_content_format(template)
            else:
                self._formats[with_tools] = spec.content_format
        self._default_kwargs = dict(spec.default_chat_template_kwargs or {})
        self._apply_params = _apply_chat_template_params(hf_tokenizer)

        # Segment splitting at the added tokens the tokenizer isolates on the raw text.
        self._added: dict[str, int] = {}
        self._split: re.Pattern[str] | None = None
        self._special_prefix: tuple[int, ...] = ()
        self._special_suffix: tuple[int, ...] = ()
        self.mode: EncodeMode = "whole"
        why_not = self._prepare_segments()
        if why_not is None:
            self.mode = "segment"
        if self_check:
            self.mode = self._self_check(why_not)
        elif why_not is not None:
            logger.info("tokenizer %s: segment caching off (%s)", self.model, why_not)

    # ------------------------------------------------------------------ public API

    @property
    def has_chat_template(self) -> bool:
        """Whether :meth:`chat` can render (the tokenizer or the spec has a template)."""
        return self._templates[False] is not None or self._templates[True] is not None

    def completion(
        self, prompt: str | Sequence[int], *, add_special_tokens: bool = True
    ) -> list[int]:
        """Token ids of a ``/v1/completions`` prompt as vLLM computes them.

        A string is encoded with special tokens added (vLLM's default; pass
        ``add_special_tokens=False`` when the request sets it so). Token ids are
        returned as a new list after validation: each must be an ``int`` (not a bool)
        in ``[0, vocab_size)``. Raises :class:`TokenizationError` (``bad_prompt``,
        ``bad_token_ids``, ``empty_prompt``, ``encode_failed``).
        """
        try:
            if isinstance(prompt, str):
                ids = self._encode(prompt, add_special_tokens)
            elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
                ids = self._check_ids(prompt)
            else:
                raise TokenizationError(
                    "bad_prompt",
                    f"prompt must be a string or a list of token ids, got {type(prompt).__name__}",
                )
            if not ids:
                raise TokenizationError("empty_prompt", "the prompt is empty (vLLM rejects it)")
        except TokenizationError as exc:
            self._count_error(exc)
            raise
        self._bump("completion_requests")
        return ids

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        add_special_tokens: bool = False,
    ) -> list[int]:
        """Token ids of a ``/v1/chat/completions`` request as vLLM computes them.

        The messages (OpenAI shape; content a string or a list of content parts) and
        ``tools`` are normalised as vLLM does (:mod:`kvaware_scorer.chat`; text parts are
        joined with newlines for string-content templates; **image, audio and video
        parts are refused** with ``reason="multimodal"`` because their placeholder
        tokens depend on vLLM's multimodal processor). The template is rendered with
        ``add_generation_prompt`` and the request's ``chat_template_kwargs`` on top of
        the spec's defaults. ``add_generation_prompt=None`` means "not in the request":
        true, or false when ``continue_final_message`` is set; passing both as true
        raises ``generation_prompt_conflict`` with vLLM's message. (vLLM rejects only an
        explicit pair at validation; an omitted ``add_generation_prompt`` defaults to
        true there and transformers then refuses the combination, so such a request
        fails on the pod whatever the router computes.) The two flags win over
        same-named kwargs, as in vLLM; ``documents`` is passed through; ``chat_template``
        and ``tokenize`` are rejected as vLLM rejects them. The rendered text is encoded
        without special tokens unless ``add_special_tokens`` is set (the request field
        of the same name). Raises :class:`TokenizationError`.
        """
        try:
            text = self.render_chat(
                messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template_kwargs=chat_template_kwargs,
            )
            ids = self._encode(text, add_special_tokens)
            if not ids:
                raise TokenizationError("empty_prompt", "the rendered chat has no tokens")
        except TokenizationError as exc:
            self._count_error(exc)
            raise
        self._bump("chat_requests")
        return ids

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text vLLM renders for a chat request (see :meth:`chat`)."""
        if continue_final_message and add_generation_prompt:
            raise TokenizationError(
                "generation_prompt_conflict",
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            )
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        with_tools = tools is not None
        template = self._templates[with_tools]
        if template is None:
            raise TokenizationError(
                "no_chat_template",
                f"model {self.model!r} has no chat template; set chat_template in its "
                "tokenizer spec (Jinja text or a .jinja file) to serve chat requests",
            )
        conversation = conversation_from_messages(messages, self._formats[with_tools])
        tool_dicts = normalize_tools(tools)
        kwargs = self._template_kwargs(
            chat_template_kwargs,
            self._variables[with_tools],
            add_generation_prompt,
            continue_final_message,
        )
        try:
            rendered = self._hf.apply_chat_template(
                conversation,
                tools=tool_dicts,
                chat_template=template,
                tokenize=False,
                **kwargs,
            )
        except TokenizationError:
            raise
        except Exception as exc:  # jinja2 errors, raise_exception(), transformers checks
            raise TokenizationError(
                "template_error", f"chat template of model {self.model!r} failed: {exc}"
            ) from exc
        if not isinstance(rendered, str):  # pragma: no cover - transformers contract
            raise TokenizationError("template_error", "chat template did not render text")
        return rendered

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``, through the caches (what :meth:`chat` and
        :meth:`completion` use after rendering)."""
        return self._encode(text, add_special_tokens)

    def stats(self) -> dict[str, Any]:
        """Counters and cache figures.

        ``exact_hits``/``exact_misses`` (whole texts), ``segment_hits``/
        ``segment_misses`` (pieces between added tokens, on exact misses),
        ``tokens_saved`` (ids served from a cache instead of encoded),
        ``tokens_encoded``, ``encode_seconds``, request and error counts, the entries,
        ids and evictions of each cache, and ``mode`` (``segment``, ``whole`` or
        ``transformers``: how exact misses are encoded).
        """
        with self._lock:
            out: dict[str, Any] = {
                name: self._counts.get(name, 0)
                for name in (
                    "completion_requests",
                    "chat_requests",
                    "exact_hits",
                    "exact_misses",
                    "segment_hits",
                    "segment_misses",
                    "tokens_saved",
                    "tokens_encoded",
                )
            }
            out["encode_seconds"] = self._counts.get("encode_ns", 0) / 1e9
            out["errors"] = dict(self._errors)
            out["exact_entries"] = len(self._exact)
            out["exact_tokens"] = self._exact.tokens
            out["exact_evictions"] = self._exact.evictions
            out["segment_entries"] = len(self._segments)
            out["segment_tokens"] = self._segments.tokens
            out["segment_evictions"] = self._segments.evictions
        out["mode"] = self.mode
        out["model"] = self.model
        return out

    def clear_cache(self) -> None:
        """Empty both caches (counters are kept)."""
        with self._lock:
            self._exact.clear()
            self._segments.clear()

    # ---------------------------------------------------------------- internals

    def _bump(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def _count_error(self, exc: TokenizationError) -> None:
        with self._lock:
            self._errors[exc.reason] += 1

    def _check_ids(self, prompt: Sequence[object]) -> list[int]:
        limit = self.vocab_size
        values = list(prompt)
        if all(type(token) is int for token in values):  # the fast path: plain ints
            ids = cast("list[int]", values)
            if not ids or (min(ids) >= 0 and max(ids) < limit):
                return ids
        ids = []  # the slow path: say which token is wrong, accept int subclasses
        for i, token in enumerate(values):
            if isinstance(token, bool) or not isinstance(token, int):
                raise TokenizationError(
                    "bad_token_ids",
                    f"prompt token {i} is {token!r} ({type(token).__name__}); "
                    "token ids must be integers",
                )
            if not 0 <= token < limit:
                raise TokenizationError(
                    "bad_token_ids",
                    f"prompt token {i} is {token}, out of vocabulary for model "
                    f"{self.model!r} (valid ids: 0..{limit - 1})",
                )
            ids.append(int(token))
        return ids

    def _template_kwargs(
        self,
        request_kwargs: Mapping[str, Any] | None,
        variables: frozenset[str],
        add_generation_prompt: bool,
        continue_final_message: bool,
    ) -> dict[str, Any]:
        if request_kwargs is not None and not isinstance(request_kwargs, Mapping):
            raise TokenizationError("bad_template_kwargs", "chat_template_kwargs must be an object")
        merged = {**self._default_kwargs, **(request_kwargs or {})}
        bad = sorted(_FORBIDDEN_KWARGS & merged.keys())
        if bad:
            raise TokenizationError(
                "bad_template_kwargs",
                f"Found unexpected chat template kwargs from request: {set(bad)}",
            )
        bad = sorted(_DUPLICATE_KWARGS & merged.keys())
        if bad:
            raise TokenizationError(
                "bad_template_kwargs",
                f"chat_template_kwargs may not set {', '.join(bad)} "
                "(pass messages and tools as request fields)",
            )
        bad = sorted(_UNSUPPORTED_KWARGS & merged.keys())
        if bad:
            raise TokenizationError(
                "bad_template_kwargs",
                f"chat_template_kwargs {', '.join(bad)} would change the token ids in a way "
                "kvaware-scorer does not reproduce",
            )
        kwargs = {
            key: value
            for key, value in merged.items()
            if key not in _IGNORED_KWARGS
            and key not in _FLAG_KWARGS
            and (key in variables or key in self._apply_params)
        }
        kwargs["add_generation_prompt"] = add_generation_prompt
        kwargs["continue_final_message"] = continue_final_message
        return kwargs

    def _digest(self, text: str, flag: bytes) -> bytes:
        h = hashlib.blake2b(self._digest_prefix, digest_size=16)
        h.update(flag)
        h.update(text.encode("utf-8", "surrogatepass"))
        return h.digest()

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if not isinstance(text, str):
            raise TokenizationError("bad_prompt", f"text must be a string, got {type(text)}")
        key = self._digest(text, b"\x01" if add_special_tokens else b"\x00")
        with self._lock:
            hit = self._exact.get(key)
            if hit is not None:
                self._counts["exact_hits"] += 1
                self._counts["tokens_saved"] += len(hit)
            else:
                self._counts["exact_misses"] += 1
        if hit is not None:
            return hit.tolist()
        started = time.perf_counter_ns()
        try:
            ids = self._encode_uncached(text, add_special_tokens, self.mode, use_cache=True)
        except TokenizationError:
            raise
        except Exception as exc:  # e.g. lone surrogates the Rust side cannot take
            raise TokenizationError(
                "encode_failed", f"model {self.model!r}: the text could not be encoded: {exc}"
            ) from exc
        elapsed = time.perf_counter_ns() - started
        stored = _ids(ids)
        with self._lock:
            self._counts["encode_ns"] += elapsed
            self._exact.put(key, stored)
        return ids

    def _encode_uncached(
        self, text: str, add_special_tokens: bool, mode: EncodeMode, *, use_cache: bool
    ) -> list[int]:
        """Ids of ``text`` in ``mode``; with ``use_cache`` the segment cache is used."""
        if mode == "transformers":
            with self._hf_lock:
                ids = list(self._hf.encode(text, add_special_tokens=add_special_tokens))
            self._bump("tokens_encoded", len(ids))
            return ids
        if mode == "whole":
            ids = list(self._batch_encode([text], add_special_tokens=add_special_tokens)[0].ids)
            self._bump("tokens_encoded", len(ids))
            return ids
        body = self._encode_segments(text, use_cache=use_cache)
        if add_special_tokens and (self._special_prefix or self._special_suffix):
            return [*self._special_prefix, *body, *self._special_suffix]
        return body

    def _pieces(self, text: str) -> list[str | int]:
        """``text`` cut at added tokens: strings, and token ids for the tokens."""
        split = self._split
        if split is None:
            return [text] if text else []
        pieces: list[str | int] = []
        pos = 0
        added = self._added
        for match in split.finditer(text):
            start = match.start()
            if start > pos:
                pieces.append(text[pos:start])
            pieces.append(added[match.group()])
            pos = match.end()
        if pos < len(text):
            pieces.append(text[pos:])
        return pieces

    def _segment_key(self, segment: str) -> object:
        if len(segment) <= _SHORT_SEGMENT:
            return segment
        return self._digest(segment, b"\x02")

    def _encode_segments(self, text: str, *, use_cache: bool) -> list[int]:
        pieces = self._pieces(text)
        segments = [piece for piece in pieces if isinstance(piece, str)]
        if not use_cache or len(pieces) == 1:
            # One piece: the exact cache already holds it; do not store it twice.
            unique = list(dict.fromkeys(segments))
            found: dict[str, Sequence[int]] = dict(
                zip(unique, self._encode_batch(unique), strict=True)
            )
        else:
            found = self._lookup_segments(segments)
        out: list[int] = []
        for piece in pieces:
            if isinstance(piece, int):
                out.append(piece)
            else:
                out.extend(found[piece])
        return out

    def _lookup_segments(self, segments: list[str]) -> dict[str, Sequence[int]]:
        found: dict[str, Sequence[int]] = {}
        keys: dict[str, object] = {}
        for segment in segments:
            if segment not in keys:
                keys[segment] = self._segment_key(segment)
        misses: list[str] = []
        with self._lock:
            for segment, key in keys.items():
                cached = self._segments.get(key)
                if cached is None:
                    misses.append(segment)
                else:
                    found[segment] = cached
                    self._counts["tokens_saved"] += len(cached)
            self._counts["segment_hits"] += len(found)
            self._counts["segment_misses"] += len(misses)
        if misses:
            encoded = self._encode_batch(misses)
            stored = [_ids(ids) for ids in encoded]
            with self._lock:
                for segment, ids in zip(misses, stored, strict=True):
                    self._segments.put(keys[segment], ids)
            found.update(zip(misses, encoded, strict=True))
        return found

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        encodings = self._batch_encode(texts, add_special_tokens=False)
        out = [list(encoding.ids) for encoding in encodings]
        self._bump("tokens_encoded", sum(len(ids) for ids in out))
        return out

    # ------------------------------------------------------------ segment set-up

    def _prepare_segments(self) -> str | None:
        """Build the splitter; return why segment mode is impossible, or None."""
        backend = self._backend
        if backend.encode_special_tokens:
            return "the tokenizer encodes special tokens as text (split_special_tokens)"
        split_tokens: dict[str, int] = {}
        for token_id, token in backend.get_added_tokens_decoder().items():
            if token.normalized:
                continue  # matched after normalisation, inside a piece: no boundary
            if token.lstrip or token.rstrip or token.single_word:
                return f"added token {token.content!r} strips whitespace or is single-word"
            if token.content:
                split_tokens[token.content] = token_id
        if not split_tokens:
            return "the tokenizer has no added tokens to split at"
        self._added = split_tokens
        ordered = sorted(split_tokens, key=len, reverse=True)  # leftmost-longest
        self._split = re.compile("|".join(re.escape(token) for token in ordered))
        affixes = self._special_affixes()
        if affixes is None:
            return "the special tokens added around a text could not be located"
        self._special_prefix, self._special_suffix = affixes
        return None

    def _special_affixes(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """The ids ``add_special_tokens=True`` puts before and after a text's ids."""
        found: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
        for probe in ("hello world", "x", "A longer probe, with punctuation: 42."):
            bare = self._backend.encode(probe, add_special_tokens=False).ids
            full = self._backend.encode(probe, add_special_tokens=True).ids
            spans = [i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare]
            if len(spans) != 1 or not bare:
                return None
            start = spans[0]
            found.add((tuple(full[:start]), tuple(full[start + len(bare) :])))
        return found.pop() if len(found) == 1 else None

    def _self_check_texts(self) -> list[str]:
        template = self._templates[False] or self._templates[True] or ""
        tokens = [token for token in self._added if token in template][:4]
        if not tokens:
            tokens = sorted(self._added, key=self._added.__getitem__)[:3] or [""]
        first, last = tokens[0], tokens[-1]
        bodies = [
            "system\nYou are a helpful assistant.",
            "user\n  Hello,   world!  ",
            " leading space",
            "\n\nblank lines\n\n",
            "trailing spaces   ",
            "digits 1234567890 and 3.14159",
            "caf\u00e9 nai\u0308ve e\u0301 \u212a \ufb01 \u2713 \u65e5\u672c\u8a9e",
            "\U0001f642\U0001f44d\U0001f3fd emoji, zero\u200bwidth, nbsp\u00a0here",
            "tabs\tand\r\nCRLF\r\n",
            "'s 're contractions don't",
            "<not|a|token> <|im_start ",
            "x",
        ]
        texts = ["".join(f"{first}{body}{last}\n" for body in bodies)]
        for body in bodies:
            texts += [f"{first}{body}", f"{body}{first}", f"{first}{first}{body}{last}{last}"]
        texts += [first, first + last, "plain text without special tokens", " x"]
        for with_tools in (False, True):
            if self._templates[with_tools] is None:
                continue
            try:
                texts.append(
                    self.render_chat(
                        [
                            {"role": "system", "content": "Be brief."},
                            {"role": "user", "content": " Hi\n\nthere "},
                            {"role": "assistant", "content": "Hello! "},
                            {"role": "user", "content": "caf\u00e9 e\u0301 \u212a"},
                        ],
                        tools=[{"type": "function", "function": {"name": "f"}}]
                        if with_tools
                        else None,
                    )
                )
            except TokenizationError as exc:
                logger.warning(
                    "tokenizer %s: the chat template cannot render a sample chat: %s",
                    self.model,
                    exc,
                )
        return [text for text in texts if text]

    def _self_check(self, why_not: str | None) -> EncodeMode:
        """Pick the fastest mode whose ids equal transformers' ``encode`` on samples."""
        texts = self._self_check_texts()
        reference = {
            (text, flag): list(self._hf.encode(text, add_special_tokens=flag))
            for text in texts
            for flag in (False, True)
        }
        candidates: list[EncodeMode] = ["whole", "transformers"]
        if why_not is None:
            candidates.insert(0, "segment")
        for mode in candidates:
            mismatch = next(
                (
                    (text, flag)
                    for (text, flag), want in reference.items()
                    if self._encode_uncached(text, flag, mode, use_cache=False) != want
                ),
                None,
            )
            if mismatch is None:
                if mode != "segment":
                    logger.warning(
                        "tokenizer %s: segment caching off (%s); encoding whole texts (%s)",
                        self.model,
                        why_not or "self-check mismatch",
                        mode,
                    )
                with self._lock:
                    self._counts.clear()  # the check's own encodes are not traffic
                return mode
            logger.info(
                "tokenizer %s: %s encoding differs from transformers on %r (add_special_tokens=%s)",
                self.model,
                mode,
                mismatch[0][:80],
                mismatch[1],
            )
            if mode == "segment":
                why_not = "segment self-check mismatch"
        return "transformers"  # pragma: no cover - transformers always matches itself


# ---------------------------------------------------------------------------- loading

_TORCH_ADVISORY = "Models won't be available and only tokenizers"


class _DropTorchAdvisory(logging.Filter):
    """Drops transformers' import-time "PyTorch was not found" advisory, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _TORCH_ADVISORY not in str(record.msg)


def _auto_tokenizer_class() -> Any:
    """Import transformers' ``AutoTokenizer`` without its no-torch advisory line."""
    if "transformers" in sys.modules:
        from transformers import AutoTokenizer

        return AutoTokenizer
    library_logger = logging.getLogger("transformers")
    advisory_filter = _DropTorchAdvisory()
    library_logger.addFilter(advisory_filter)
    try:
        from transformers import AutoTokenizer
    finally:
        library_logger.removeFilter(advisory_filter)
    return AutoTokenizer


def _apply_chat_template_params(hf_tokenizer: Any) -> frozenset[str]:
    import inspect

    try:
        signature = inspect.signature(hf_tokenizer.apply_chat_template)
    except (TypeError, ValueError):  # pragma: no cover - builtins only
        return frozenset()
    return frozenset(
        name
        for name, param in signature.parameters.items()
        if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL)
    )


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or source.count("/") > 1
        or "\\" in source
        or (os.sep != "/" and os.sep in source)
    )


def _template_override(spec: TokenizerSpec) -> str | None:
    value = spec.chat_template
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"chat_template of model {spec.model!r} must be Jinja text or the path of a .jinja file"
        )
    if any(char in value for char in "{}\n"):
        text = value
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"chat_template of model {spec.model!r} is {value!r}: not Jinja text (it has "
                "no '{', '}' or newline) and no such file; give the template itself or the "
                "path of an existing .jinja file"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"chat_template file {value!r} of model {spec.model!r} cannot be read: {exc}"
            ) from exc
    try:
        template_variables(text)
    except jinja2.TemplateError as exc:
        raise ConfigError(
            f"chat_template of model {spec.model!r} does not parse as Jinja: {exc}"
        ) from exc
    return text


def _resolve_source(spec: TokenizerSpec) -> tuple[str, bool]:
    """``(what to pass to from_pretrained, is_local_directory)``; raises ConfigError."""
    source = spec.source
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(
            f"tokenizer source of model {spec.model!r} is empty; set it to a directory "
            "holding tokenizer.json and tokenizer_config.json or a cached model id"
        )
    path = Path(source).expanduser()
    if path.exists() or _looks_like_path(source):
        if not path.exists():
            raise ConfigError(
                f"tokenizer directory {source!r} of model {spec.model!r} does not exist; "
                "set source to the directory holding tokenizer.json and tokenizer_config.json"
            )
        if not path.is_dir():
            raise ConfigError(
                f"tokenizer source {source!r} of model {spec.model!r} is a file; set source "
                "to the directory that holds tokenizer.json and tokenizer_config.json"
            )
        if not (path / "tokenizer.json").is_file():
            present = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
            raise ConfigError(
                f"tokenizer directory {source!r} of model {spec.model!r} has no "
                f"tokenizer.json (it holds: {present}); copy the model's tokenizer.json and "
                "tokenizer_config.json there"
            )
        if spec.revision is not None:
            raise ConfigError(
                f"revision {spec.revision!r} of model {spec.model!r} applies only to hub "
                f"model ids, not to the directory {source!r}; remove it"
            )
        return str(path), True
    if not _HUB_ID.match(source):
        raise ConfigError(
            f"tokenizer source {source!r} of model {spec.model!r} is neither an existing "
            "directory nor a Hugging Face model id (org/name)"
        )
    return source, False


def load_tokenizer(
    spec: TokenizerSpec,
    *,
    require_chat_template: bool = True,
    cache: CacheConfig | None = None,
    self_check: bool = True,
) -> RequestTokenizer:
    """Load a model's tokenizer at start-up (offline) and return its :class:`RequestTokenizer`.

    With ``require_chat_template`` (the default) a tokenizer without a chat template and
    without a ``chat_template`` override is a configuration error; pass False for
    models served only through ``/v1/completions``. ``self_check`` runs the segment
    parity check (keep it on outside benchmarks). Raises
    :class:`~kvaware_scorer.errors.ConfigError` with the model name and the fix.
    """
    if not isinstance(spec.model, str) or not spec.model:
        raise ConfigError("a tokenizer spec needs a non-empty model name")
    if spec.content_format not in ("auto", "string", "openai"):
        raise ConfigError(
            f"content_format of model {spec.model!r} is {spec.content_format!r}; "
            "use auto, string or openai"
        )
    if spec.default_chat_template_kwargs is not None and not isinstance(
        spec.default_chat_template_kwargs, Mapping
    ):
        raise ConfigError(f"default_chat_template_kwargs of model {spec.model!r} must be a mapping")
    started = time.perf_counter()
    target, local = _resolve_source(spec)
    override = _template_override(spec)
    if not local and not os.environ.get("HF_HUB_OFFLINE"):
        logger.warning(
            "HF_HUB_OFFLINE is not set: kvaware-scorer loads tokenizers from the local "
            "cache only, but set HF_HUB_OFFLINE=1 in the router's environment so that no "
            "library call can reach the Hugging Face hub"
        )
    auto = _auto_tokenizer_class()
    options: dict[str, Any] = {"local_files_only": True}
    if spec.revision is not None:
        options["revision"] = spec.revision
    try:
        hf_tokenizer = auto.from_pretrained(target, **options)
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local:
            hint = "check that tokenizer.json and tokenizer_config.json are valid"
        else:
            hint = (
                "it must already be in the local Hugging Face cache (nothing is downloaded): "
                f"run `hf download {target} --include 'tokenizer*'` where the hub is reachable "
                "and copy the cache, or set source to a local directory"
            )
        raise ConfigError(
            f"cannot load the tokenizer of model {spec.model!r} from {spec.source!r}: "
            f"{detail}; {hint}"
        ) from exc
    tokenizer = RequestTokenizer(
        spec, hf_tokenizer, chat_template=override, cache=cache, self_check=self_check
    )
    if require_chat_template and not tokenizer.has_chat_template:
        raise ConfigError(
            f"the tokenizer of model {spec.model!r} ({spec.source}) has no chat template; "
            "set chat_template in its spec (Jinja text or a .jinja file), or load it with "
            "require_chat_template=False if it serves only completions"
        )
    if tokenizer.has_chat_template:
        try:  # compile the template now, not on the first request
            tokenizer.render_chat([{"role": "user", "content": "warm-up"}])
        except TokenizationError as exc:
            logger.warning("tokenizer %s: template warm-up failed: %s", spec.model, exc)
    logger.info(
        "loaded tokenizer of model %s from %s in %.2f s (%d ids, chat template: %s, mode: %s)",
        spec.model,
        spec.source,
        time.perf_counter() - started,
        tokenizer.vocab_size,
        "yes" if tokenizer.has_chat_template else "no",
        tokenizer.mode,
    )
    return tokenizer


def load_tokenizers(specs: Iterable[TokenizerSpec], **options: Any) -> dict[str, RequestTokenizer]:
    """Load several specs (see :func:`load_tokenizer`), keyed by model name.

    A model named twice is a :class:`~kvaware_scorer.errors.ConfigError`.
    """
    out: dict[str, RequestTokenizer] = {}
    for spec in specs:
        if spec.model in out:
            raise ConfigError(f"model {spec.model!r} has two tokenizer specs; keep one")
        out[spec.model] = load_tokenizer(spec, **options)
    return out
