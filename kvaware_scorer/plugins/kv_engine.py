"""Built-in plugin: runs the KV engine (listener → index) inside the pipeline's lifecycle.

* startup/shutdown start and stop the KV-event listener;
* endpoints that come with a KV-event source are dialed; removed endpoints are dropped
  from the listener and the index;
* every routed request leaves speculative entries for its blocks on the chosen endpoint,
  so a burst of requests sharing a new prefix follows the first one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvaware_scorer.hookspecs import hookimpl

if TYPE_CHECKING:
    from kvaware_scorer.pipeline import Pipeline
    from kvaware_scorer.types import Endpoint, RoutingRequest


@hookimpl
def kvaware_startup(pipeline: Pipeline) -> None:
    if pipeline.listener is not None:
        pipeline.listener.start()


@hookimpl
def kvaware_shutdown(pipeline: Pipeline) -> None:
    if pipeline.listener is not None:
        pipeline.listener.stop()


@hookimpl
def kvaware_endpoints_changed(
    pipeline: Pipeline, added: Sequence[Endpoint], removed: Sequence[Endpoint]
) -> None:
    for endpoint in removed:
        if pipeline.listener is not None:
            pipeline.listener.remove_pod(endpoint.id)
        else:
            pipeline.index.remove_pod(endpoint.id)
    for endpoint in added:
        if endpoint.models:
            pipeline.index.set_pod(endpoint.id, model=sorted(endpoint.models)[0])
        source = pipeline.kv_source(endpoint.id)
        if source is not None and pipeline.listener is not None:
            pipeline.listener.add_pod(source)


@hookimpl
def kvaware_request_routed(pipeline: Pipeline, request: RoutingRequest, endpoint: Endpoint) -> None:
    if request.block_keys:
        pipeline.index.add_speculative(endpoint.id, request.block_keys)
