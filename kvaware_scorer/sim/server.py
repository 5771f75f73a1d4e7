"""A simulated vLLM engine served in real time over HTTP, publishing real KV events.

:class:`SimServer` wraps one :class:`~kvaware_scorer.sim.engine.SimEngine` in an aiohttp
application that speaks the parts of vLLM's OpenAI-compatible server a router depends
on, so routers, end-to-end tests and interop tests can run against a fleet of
processes that behave like vLLM pods without a GPU:

- ``POST /v1/completions`` and ``POST /v1/chat/completions``, streaming (SSE) and not.
  Prompts are tokenized by the same :class:`~kvaware_scorer.tokenization.RequestTokenizer`
  a router uses, so the token ids the engine caches are the ids the router hashes.
  Every request generates exactly ``max_tokens`` tokens (``ignore_eos``); the text is a
  deterministic filler; ``usage.prompt_tokens_details.cached_tokens`` is the engine's
  prefix-cache hit.
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (vLLM's Prometheus names).
- KV events through an :class:`~kvaware_scorer.publisher.EventPublisher` (vLLM's wire
  format, topic ``kv@<pod>@<model>``, replay endpoint).
- Fault injection under ``/admin/`` (loopback clients only): reset the prefix cache,
  drop the next N event batches (kept for replay), restart the engine, read the set of
  cached block hashes, read counters.

Time: an asyncio task runs ``engine.step(now)`` whenever the engine has work, then
sleeps the step's simulated duration divided by ``speed`` and resolves the requests whose
first token or last token that step produced. Simulated time follows the wall clock
(``(wall - start) * speed``) and never runs ahead of it.

Everything runs on one event loop thread (the engine is not thread-safe); only
tokenization runs in worker threads. ``docs/simulator-realtime.md`` documents the
process, its flags and endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.events import EventBatch
from kvaware_scorer.publisher import EventPublisher
from kvaware_scorer.sim.engine import EngineConfig, SimEngine, SimRequest
from kvaware_scorer.tokenization import RequestTokenizer, TokenizationError

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "ApiError",
    "LoraAdapter",
    "SimServer",
    "filler_text",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS: Final = 16
"""Output tokens of a request that gives neither ``max_tokens`` nor ``max_completion_tokens``."""

MAX_BODY_BYTES: Final = 64 * 1024 * 1024
ENGINE_LABEL: Final = "0"
_IDLE_STEP_S: Final = 0.001  # wall pause after a step that did nothing (never spin)
_FILLER: Final[tuple[str, ...]] = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "simulated",
    "tokens",
    "flow",
)


def filler_text(start: int, end: int) -> str:
    """The deterministic text of output tokens ``[start, end)`` (one word per token)."""
    return "".join(" " + _FILLER[i % len(_FILLER)] for i in range(start, end))


class ApiError(Exception):
    """A request error answered as OpenAI-style JSON: ``{"error": {...}}``."""

    _TYPES: Final = {
        400: "BadRequestError",
        403: "PermissionDeniedError",
        404: "NotFoundError",
        405: "MethodNotAllowed",
        413: "BadRequestError",
        500: "InternalServerError",
        503: "ServiceUnavailableError",
    }

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        """The JSON body vLLM sends for this error."""
        return {
            "error": {
                "message": self.message,
                "type": self._TYPES.get(self.status, "APIError"),
                "param": self.param,
                "code": self.status,
            }
        }

    def response(self) -> web.Response:
        """The HTTP response carrying :meth:`body`."""
        return web.json_response(self.body(), status=self.status)


class _EngineGone(Exception):
    """The request's engine was restarted or shut down before it finished."""


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter served as an extra model (``--lora NAME[=PATH]``)."""

    name: str
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> LoraAdapter:
        """``NAME`` or ``NAME=PATH``; raises :class:`ConfigError` for an empty name."""
        name, sep, path = text.partition("=")
        name = name.strip()
        if not name:
            raise ConfigError(f"--lora {text!r}: the adapter name is empty; use NAME or NAME=PATH")
        return cls(name, (path.strip() or None) if sep else None)


@dataclass(eq=False)
class _Pending:
    """A request in the engine and the futures its handler awaits."""

    request: SimRequest
    first: asyncio.Future[None]
    done: asyncio.Future[None]


@dataclass
class _Options:
    """Validated request fields shared by completions and chat."""

    max_tokens: int
    stream: bool
    include_usage: bool
    cache_salt: str | None
    add_special_tokens: bool
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------ validation


def _field_error(name: str, what: str) -> ApiError:
    return ApiError(400, f"'{name}': {what}", param=name)


def _opt_bool(body: Mapping[str, Any], name: str, default: bool | None) -> bool | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _field_error(name, f"must be a boolean, got {type(value).__name__}")
    return value


def _opt_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _field_error(name, f"must be an integer, got {type(value).__name__}")
    return value


def _parse_options(body: Mapping[str, Any], *, chat: bool, default_max_tokens: int) -> _Options:
    max_tokens = _opt_int(body, "max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens < 1:
        raise _field_error("max_tokens", f"must be at least 1, got {max_tokens}")
    n = _opt_int(body, "n")
    if n is not None and n != 1:
        raise _field_error("n", f"the simulated engine serves n=1 only, got {n}")
    stream = bool(_opt_bool(body, "stream", False))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ApiError(
                400, "Stream options can only be defined when `stream=True`.", param="stream"
            )
        if not isinstance(options, Mapping):
            raise _field_error("stream_options", "must be an object")
        include_usage = bool(_opt_bool(options, "include_usage", False))
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise _field_error("cache_salt", "must be a non-empty string")
    add_special = _opt_bool(body, "add_special_tokens", not chat)
    return _Options(max_tokens, stream, include_usage, salt, bool(add_special))


def _completion_prompt(body: Mapping[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise _field_error("prompt", "is required")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if prompt and all(isinstance(p, (str, list)) for p in prompt):
            raise _field_error("prompt", "the simulated engine serves one prompt per request")
        return prompt
    raise _field_error(
        "prompt", f"must be a string or a list of token ids, not {type(prompt).__name__}"
    )


def _usage(req: SimRequest, completion_tokens: int) -> dict[str, Any]:
    prompt = len(req.token_ids)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": req.cached_tokens},
    }


def _sse(payload: Mapping[str, Any] | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---------------------------------------------------------------------------- server


class SimServer:
    """One simulated engine behind vLLM's HTTP API; see the module docstring.

    ``config.model`` is the served model name. ``kv_events`` is the publisher's data
    endpoint (``None``: no KV events); it binds when ``kv_events_bind`` (the default;
    ``tcp://127.0.0.1:0`` picks a free port) and connects otherwise, as vLLM does for a
    non-wildcard endpoint. ``replay`` always binds. ``speed`` divides every step's
    duration (20.0 runs twenty times faster than the modelled pod).
    """

    def __init__(
        self,
        pod: str,
        config: EngineConfig,
        tokenizer: RequestTokenizer,
        *,
        loras: Sequence[LoraAdapter] = (),
        speed: float = 1.0,
        kv_events: str | None = "tcp://127.0.0.1:0",
        replay: str | None = "tcp://127.0.0.1:0",
        kv_events_bind: bool = True,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        if not pod or "@" in pod:
            raise ConfigError(f"pod name {pod!r} must be non-empty and contain no '@'")
        if not (isinstance(speed, (int, float)) and math.isfinite(speed) and speed > 0):
            raise ConfigError(f"speed must be a finite number > 0, got {speed!r}")
        if default_max_tokens < 1:
            raise ConfigError(f"default_max_tokens must be >= 1, got {default_max_tokens}")
        names = [lora.name for lora in loras]
        if config.model in names or len(set(names)) != len(names):
            raise ConfigError(f"LoRA names must be unique and differ from the model: {names}")
        if replay is not None and kv_events is None:
            raise ConfigError("a replay endpoint needs a KV-event endpoint")
        self.pod = pod
        self.config = config
        self.tokenizer = tokenizer
        self.loras: dict[str, LoraAdapter] = {lora.name: lora for lora in loras}
        self.speed = float(speed)
        self.default_max_tokens = default_max_tokens
        self.topic = f"kv@{pod}@{config.model}"
        self._publisher: EventPublisher | None = None
        if kv_events is not None:
            self._publisher = EventPublisher(
                kv_events, replay_endpoint=replay, topic=self.topic, bind=kv_events_bind
            )
        self._engine = SimEngine(pod, config, event_sink=self._on_batch)
        self._pending: dict[str, _Pending] = {}
        self._drop_batches = 0
        self._dropped_batches = 0
        self._restarts = 0
        self._generation_tokens = 0
        self._successes = 0
        self._created = int(time.time())
        self._t0 = 0.0
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.url = ""
        self.app = self._make_app()

    # ------------------------------------------------------------------ lifecycle

    @property
    def model(self) -> str:
        """The served model name."""
        return self.config.model

    @property
    def engine(self) -> SimEngine:
        """The current engine (a new one after each restart)."""
        return self._engine

    @property
    def kv_events(self) -> str | None:
        """The publisher's endpoint (the bound address once started), or ``None``."""
        return None if self._publisher is None else self._publisher.endpoint

    @property
    def replay(self) -> str | None:
        """The replay endpoint (the bound address once started), or ``None``."""
        return None if self._publisher is None else self._publisher.replay_endpoint

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Start the publisher, the engine loop and the HTTP server."""
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        self._wake = asyncio.Event()
        if self._publisher is not None:
            self._publisher.start()
        try:
            self._loop_task = asyncio.create_task(self._run_engine(), name="sim-engine-loop")
            self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
            await self._runner.setup()
            site = web.TCPSite(self._runner, host, port)
            await site.start()
        except BaseException:
            await self.stop()
            raise
        bound = self._runner.addresses[0]
        url_host = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if ":" in url_host:
            url_host = f"[{url_host}]"
        self.url = f"http://{url_host}:{bound[1]}"
        logger.info(
            "sim engine %s serving %s at %s (KV events %s, replay %s)",
            self.pod,
            self.model,
            self.url,
            self.kv_events,
            self.replay,
        )

    async def stop(self) -> None:
        """Fail in-flight requests, stop the loop, the server and the publisher. Idempotent."""
        self._closing = True
        self._fail_pending("the engine is shutting down")
        if self._wake is not None:
            self._wake.set()
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._publisher is not None:
            self._publisher.stop()

    def ready_info(self) -> dict[str, Any]:
        """What the ``sim-engine`` command prints once listening (without the pid)."""
        return {
            "pod": self.pod,
            "url": self.url,
            "model": self.model,
            "kv_events": self.kv_events,
            "replay": self.replay,
            "topic": self.topic,
        }

    # ------------------------------------------------------------------ engine loop

    def _sim_now(self) -> float:
        wall = (asyncio.get_running_loop().time() - self._t0) * self.speed
        return max(self._engine.now_s, wall)

    async def _run_engine(self) -> None:
        assert self._wake is not None
        wake = self._wake
        loop = asyncio.get_running_loop()
        while not self._closing:
            engine = self._engine
            if not engine.has_work():
                wake.clear()
                await wake.wait()
                continue
            try:
                result = engine.step(self._sim_now())
            except Exception:  # a bug: restart rather than hang the requests
                logger.exception("engine %s: step failed; restarting the engine", self.pod)
                self.restart()
                continue
            delay = self._t0 + result.end_s / self.speed - loop.time()
            if result.duration_s <= 0:
                delay = max(delay, _IDLE_STEP_S)
            await asyncio.sleep(max(0.0, delay))
            if engine is not self._engine:
                continue  # restarted meanwhile: its requests were failed already
            for req in result.first_tokens:
                pending = self._pending.get(req.request_id)
                if pending is not None:
                    self._generation_tokens += 1
                    if not pending.first.done():
                        pending.first.set_result(None)
            for req in result.finished:
                pending = self._pending.pop(req.request_id, None)
                if pending is None:
                    continue
                self._generation_tokens += req.max_tokens - 1
                self._successes += 1
                if not pending.first.done():
                    pending.first.set_result(None)
                if not pending.done.done():
                    pending.done.set_result(None)

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            for future in (entry.first, entry.done):
                if not future.done():
                    future.set_exception(_EngineGone(reason))
                    future.exception()  # mark retrieved: a handler may be gone already

    def _on_batch(self, batch: EventBatch) -> None:
        """The engine's event sink: publish (or drop on request) with a wall-clock stamp."""
        publisher = self._publisher
        if publisher is None:
            return
        batch.ts = time.time()
        if self._drop_batches > 0:
            self._drop_batches -= 1
            self._dropped_batches += 1
            publisher.publish(batch, deliver=False)
        else:
            publisher.publish(batch)

    # ------------------------------------------------------------------ app

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/admin/reset_prefix_cache", self._admin(self._reset_prefix_cache))
        app.router.add_post("/reset_prefix_cache", self._admin(self._reset_prefix_cache))
        app.router.add_post("/admin/drop_events", self._admin(self._drop_events))
        app.router.add_post("/admin/restart", self._admin(self._restart))
        app.router.add_get("/admin/truth", self._admin(self._truth))
        app.router.add_get("/admin/stats", self._admin(self._stats))
        return app

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return ApiError(exc.status, exc.reason or "request failed").response()
        except ConnectionError:
            raise
        except Exception:
            logger.exception("engine %s: %s %s failed", self.pod, request.method, request.path)
            return ApiError(500, "internal error in the simulated engine").response()

    def _admin(
        self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not _is_loopback(request.remote):
                raise ApiError(403, "admin endpoints answer loopback clients only")
            return await handler(request)

        return guarded

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _resolve_model(self, body: Mapping[str, Any]) -> tuple[str, str | None]:
        """``(model as echoed, LoRA name or None)``; 404 for a model not served here."""
        model = body.get("model")
        if model is None or model == "":
            return self.model, None
        if not isinstance(model, str):
            raise _field_error("model", "must be a string")
        if model == self.model:
            return model, None
        if model in self.loras:
            return model, model
        raise ApiError(404, f"The model `{model}` does not exist.", param="model")

    async def _tokenize(self, encode: Callable[[], list[int]]) -> list[int]:
        try:
            return await asyncio.to_thread(encode)
        except TokenizationError as exc:
            raise ApiError(400, str(exc)) from None

    # ------------------------------------------------------------------ OpenAI API

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        model, lora = self._resolve_model(body)
        options = _parse_options(body, chat=False, default_max_tokens=self.default_max_tokens)
        prompt = _completion_prompt(body)
        tokenizer = self.tokenizer

        def encode() -> list[int]:
            return tokenizer.completion(prompt, add_special_tokens=options.add_special_tokens)

        token_ids = await self._tokenize(encode)
        return await self._serve(request, False, model, lora, token_ids, options)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        model, lora = self._resolve_model(body)
        options = _parse_options(body, chat=True, default_max_tokens=self.default_max_tokens)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _field_error("messages", "must be a non-empty list of messages")
        tools = body.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise _field_error("tools", "must be a list")
        add_generation_prompt = _opt_bool(body, "add_generation_prompt", None)
        continue_final = bool(_opt_bool(body, "continue_final_message", False))
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise _field_error("chat_template_kwargs", "must be an object")
        tokenizer = self.tokenizer

        def encode() -> list[int]:
            return tokenizer.chat(
                messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final,
                chat_template_kwargs=kwargs,
                add_special_tokens=options.add_special_tokens,
            )

        token_ids = await self._tokenize(encode)
        return await self._serve(request, True, model, lora, token_ids, options)

    def _submit(
        self, chat: bool, lora: str | None, token_ids: list[int], options: _Options
    ) -> _Pending:
        if self._closing:
            raise ApiError(503, "the engine is shutting down")
        max_len = self.config.effective_max_model_len
        total = len(token_ids) + options.max_tokens
        if total > max_len:
            raise ApiError(
                400,
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {total} tokens ({len(token_ids)} in the "
                f"{'messages' if chat else 'prompt'}, {options.max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
            )
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        lora_path = self.loras[lora].path if lora is not None else None
        req = SimRequest(
            request_id,
            token_ids,
            options.max_tokens,
            self._sim_now(),
            lora_name=lora,
            cache_salt=options.cache_salt,
            lora_path=lora_path,
        )
        try:
            self._engine.add_request(req)
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        loop = asyncio.get_running_loop()
        pending = _Pending(req, loop.create_future(), loop.create_future())
        self._pending[request_id] = pending
        assert self._wake is not None
        self._wake.set()
        return pending

    async def _serve(
        self,
        request: web.Request,
        chat: bool,
        model: str,
        lora: str | None,
        token_ids: list[int],
        options: _Options,
    ) -> web.StreamResponse:
        pending = self._submit(chat, lora, token_ids, options)
        req = pending.request
        if options.stream:
            return await self._stream(request, chat, model, pending, options)
        try:
            await asyncio.shield(pending.done)
        except _EngineGone as exc:
            raise ApiError(503, f"request {req.request_id} aborted: {exc}") from None
        text = filler_text(0, req.max_tokens)
        choice: dict[str, Any]
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": None,
            }
        return web.json_response(
            {
                "id": req.request_id,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": _usage(req, req.max_tokens),
            }
        )

    async def _stream(
        self,
        request: web.Request,
        chat: bool,
        model: str,
        pending: _Pending,
        options: _Options,
    ) -> web.StreamResponse:
        req = pending.request
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        created = int(time.time())
        head = {
            "id": req.request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
        }

        def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
            choice: dict[str, Any] = {"index": 0}
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice["delta"] = delta
            else:
                choice["text"] = text or ""
            choice["logprobs"] = None
            choice["finish_reason"] = finish
            choice["stop_reason"] = None
            return _sse({**head, "choices": [choice]})

        try:
            try:
                await asyncio.shield(pending.first)
                if chat:
                    await response.write(chunk("", None, role=True))
                last = req.max_tokens == 1 and pending.done.done()
                await response.write(chunk(filler_text(0, 1), "length" if last else None))
                await asyncio.shield(pending.done)
                if not last:
                    await response.write(chunk(filler_text(1, req.max_tokens), "length"))
                if options.include_usage:
                    usage = _usage(req, req.max_tokens)
                    await response.write(_sse({**head, "choices": [], "usage": usage}))
            except _EngineGone as exc:
                error = ApiError(503, f"request {req.request_id} aborted: {exc}")
                await response.write(_sse(error.body()))
            await response.write(_sse("[DONE]"))
            await response.write_eof()
        except ConnectionError:
            logger.debug("engine %s: client of %s went away", self.pod, req.request_id)
        return response

    async def _models(self, request: web.Request) -> web.Response:
        max_len = self.config.effective_max_model_len

        def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": name,
                "object": "model",
                "created": self._created,
                "owned_by": "vllm",
                "root": root,
                "parent": parent,
                "max_model_len": max_len,
                "permission": [],
            }

        data = [card(self.model, self.model, None)]
        data += [
            card(lora.name, lora.path or lora.name, self.model) for lora in self.loras.values()
        ]
        return web.json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text(), content_type="text/plain")

    def metrics_text(self) -> str:
        """The Prometheus text page, with vLLM's metric names and labels."""
        engine = self._engine
        stats = engine.stats()
        labels = f'engine="{ENGINE_LABEL}",model_name="{_label(self.model)}"'
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float, extra: str = "") -> None:
            family = name[: -len("_total")] if kind == "counter" else name
            lines.append(f"# HELP {family} {help_text}")
            lines.append(f"# TYPE {family} {kind}")
            lines.append(f"{name}{{{labels}{extra}}} {float(value)!r}")

        metric(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            engine.num_running,
        )
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            engine.num_waiting,
        )
        metric(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            engine.kv_usage,
        )
        metric(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            stats["prefix_cache_queries"],
        )
        metric(
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            stats["prefix_cache_hits"],
        )
        metric(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            stats["prompt_tokens"],
        )
        metric(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            self._generation_tokens,
        )
        metric(
            "vllm:num_preemptions_total",
            "counter",
            "Cumulative number of preemption from the engine.",
            stats["preemptions"],
        )
        metric(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            self._successes,
            ',finished_reason="length"',
        )
        info = (
            f',block_size="{self.config.block_size}",enable_prefix_caching="True",'
            f'num_gpu_blocks="{self.config.num_gpu_blocks}",'
            f'prefix_caching_hash_algo="{_label(self.config.hash_algo)}"'
        )
        metric(
            "vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig", 1, info
        )
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ admin

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        done = self._engine.reset_prefix_cache(self._sim_now())
        if not done:
            logger.info("engine %s: prefix cache not reset (blocks in use)", self.pod)
        return web.json_response({"reset": done})

    async def _drop_events(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        count = _opt_int(body, "batches")
        if count is None or count < 0:
            raise _field_error("batches", "must be an integer >= 0")
        self._drop_batches += count
        logger.info("engine %s: dropping the next %d event batches", self.pod, self._drop_batches)
        return web.json_response({"dropping": self._drop_batches})

    async def _restart(self, request: web.Request) -> web.Response:
        self.restart()
        return web.json_response({"restarted": True, "restarts": self._restarts})

    def restart(self) -> None:
        """Behave like a restarted pod: in-flight requests fail, the cache and counters
        are gone (no ``AllBlocksCleared`` is sent), the event sequence restarts at 0."""
        self._fail_pending("the engine restarted")
        self._engine = SimEngine(self.pod, self.config, event_sink=self._on_batch)
        self._drop_batches = 0
        self._generation_tokens = 0
        self._successes = 0
        self._restarts += 1
        if self._publisher is not None:
            self._publisher.restart()
        logger.info("engine %s restarted (%d restarts)", self.pod, self._restarts)

    async def _truth(self, request: web.Request) -> web.Response:
        hashes = sorted(self._engine.cached_block_hashes())
        return web.json_response(
            {
                "pod": self.pod,
                "model": self.model,
                "block_size": self.config.block_size,
                "hashes": hashes,
            }
        )

    async def _stats(self, request: web.Request) -> web.Response:
        out: dict[str, Any] = dict(self._engine.stats())
        publisher = self._publisher
        out.update(
            {
                "pod": self.pod,
                "model": self.model,
                "restarts": self._restarts,
                "in_flight": len(self._pending),
                "generation_tokens": self._generation_tokens,
                "dropping_batches": self._drop_batches,
                "dropped_batches": self._dropped_batches,
                "published_batches": 0 if publisher is None else publisher.sent,
                "subscribed": publisher is not None and publisher.wait_subscribed(0),
            }
        )
        return web.json_response(out)
