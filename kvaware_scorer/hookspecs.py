"""Hook specifications: what a kvaware-scorer plugin can implement.

Every hook is prefixed ``kvaware_`` and takes keyword arguments; an implementation may
accept any subset of them (pluggy passes only what it asks for). Plugins are found
through the ``kvaware_scorer`` entry-point group; the built-ins register through the same
path. Implement hooks with the :data:`hookimpl` marker::

    from kvaware_scorer.hookspecs import hookimpl

    @hookimpl
    def kvaware_register(registry):
        registry.add_scorer("session-affinity", SessionAffinityScorer.from_params,
                            doc="prefer the endpoint that served the session before")

Lifecycle: ``kvaware_register`` once when the pipeline is built; ``kvaware_startup`` at
``Pipeline.start()``; ``kvaware_endpoints_changed`` whenever the endpoint set changes;
``kvaware_request_routed`` and ``kvaware_request_finished`` once per request;
``kvaware_shutdown`` at ``Pipeline.stop()``. The per-request scoring path does not go
through hooks: the pipeline calls the Filter, Scorer and Picker objects built from the
registered factories directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kvaware_scorer.pipeline import Pipeline
    from kvaware_scorer.registry import ComponentRegistry
    from kvaware_scorer.types import Decision, Endpoint, RoutingRequest

PROJECT = "kvaware_scorer"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvaware_register(registry: ComponentRegistry) -> None:
    """Register component factories (filters, scorers, pickers) by type name.

    Called once, when the pipeline is built and before the configuration is applied, so
    the configuration can refer to every registered name.

    :param registry: call ``registry.add_filter/add_scorer/add_picker(name, factory,
        doc=...)``. A factory takes ``(pipeline, params)`` and returns the component.

    .. versionadded:: 0.1
    """


@hookspec
def kvaware_startup(pipeline: Pipeline) -> None:
    """Acquire resources: bind or connect sockets, start threads, load files.

    Called by ``Pipeline.start()``, never at import or registration. Must be bounded in time;
    raise :class:`kvaware_scorer.errors.KVAwareError` with a message saying how to fix it
    when the plugin cannot start.

    :param pipeline: the pipeline being started (its ``index``, ``listener``, ``load`` and
        ``tokenizers`` services are available).

    .. versionadded:: 0.1
    """


@hookspec
def kvaware_shutdown(pipeline: Pipeline) -> None:
    """Release what ``kvaware_startup`` acquired. Idempotent and bounded (≤ 1 s).

    :param pipeline: the pipeline being stopped.

    .. versionadded:: 0.1
    """


@hookspec
def kvaware_endpoints_changed(
    pipeline: Pipeline, added: Sequence[Endpoint], removed: Sequence[Endpoint]
) -> None:
    """The set of endpoints changed (discovery, a config reload, a backend removed).

    The built-in KV engine dials added pods and drops removed pods from the index.

    :param pipeline: the pipeline.
    :param added: endpoints that appeared (or whose definition changed).
    :param removed: endpoints that are gone.

    .. versionadded:: 0.1
    """


@hookspec
def kvaware_request_routed(
    pipeline: Pipeline, request: RoutingRequest, endpoint: Endpoint, decision: Decision | None
) -> None:
    """A request was sent to ``endpoint`` (after retries, the endpoint actually used).

    The built-in KV engine records speculative index entries for the request's blocks on
    that endpoint; the approximate scorer records its history. Keep implementations cheap:
    this runs once per request on the router's path.

    :param pipeline: the pipeline.
    :param request: the routed request (``token_ids`` and ``block_keys`` filled in when known).
    :param endpoint: where it was sent.
    :param decision: the decision that chose it, or None when the router chose by itself.

    .. versionadded:: 0.1
    """


@hookspec
def kvaware_request_finished(
    pipeline: Pipeline,
    request: RoutingRequest,
    endpoint: Endpoint,
    prompt_tokens: int | None,
    cached_tokens: int | None,
    error: str | None,
) -> None:
    """A routed request completed (or failed).

    :param pipeline: the pipeline.
    :param request: the request.
    :param endpoint: the endpoint that served it.
    :param prompt_tokens: ``usage.prompt_tokens`` from the response, when reported.
    :param cached_tokens: ``usage.prompt_tokens_details.cached_tokens``, when reported.
    :param error: a short error description when the request failed, else None.

    .. versionadded:: 0.1
    """
