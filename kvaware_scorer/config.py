"""The YAML configuration: typed sections with defaults, validated strictly at start-up.

The configuration is one mapping, either the whole file or the ``kvaware:`` section of a
router's YAML. Unknown keys, wrong types and out-of-range values raise
:class:`~kvaware_scorer.errors.ConfigError` naming the YAML path (for example
``kvaware.scorers[1].weight``) and the allowed values. String values may refer to the
environment as ``${NAME}`` or ``${NAME:-default}`` (paths and secrets).

Every key is documented in ``docs/configuration.md``; a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.index import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_ORPHAN_BLOCKS,
    DEFAULT_POD_CAPACITY,
    DEFAULT_SPECULATIVE_TTL_S,
)
from kvaware_scorer.residency import DEFAULT_OTHER_TIER_WEIGHT
from kvaware_scorer.wire import DEFAULT_MAX_PAYLOAD_BYTES

HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _f(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    factory: Any = dataclasses.MISSING,
) -> Any:
    meta = {"doc": doc, "minimum": minimum, "maximum": maximum, "choices": choices}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class PluginsConfig:
    allow: list[str] | None = _f(None, doc="entry-point plugins to load (null: all installed)")
    block: list[str] = _f(factory=list, doc="entry-point plugins never to load")


@dataclass(frozen=True)
class IndexConfig:
    block_size: int = _f(
        16, doc="tokens per index block; a divisor or multiple of vLLM's", minimum=1
    )
    hash_seed: str = _f("", doc="seed of the request-key chain; equal on replicas sharing an index")
    tier_weights: dict[str, float] = _f(
        factory=lambda: {"gpu": 1.0, "cpu": 0.8},
        minimum=0.0,
        maximum=1.0,
        doc="weight per tier (vLLM medium, lower-case) in [0, 1]; `speculative` defaults to gpu",
    )
    other_tier_weight: float = _f(
        DEFAULT_OTHER_TIER_WEIGHT, doc="weight of tiers not listed", minimum=0.0, maximum=1.0
    )
    pod_capacity: int = _f(
        DEFAULT_POD_CAPACITY, doc="blocks kept per pod (oldest evicted)", minimum=1
    )
    max_entries: int = _f(
        DEFAULT_MAX_ENTRIES, doc="request keys kept in all (global cap)", minimum=1
    )
    speculative_ttl_s: float = _f(
        DEFAULT_SPECULATIVE_TTL_S,
        doc="lifetime of speculative entries; 0 disables them",
        minimum=0.0,
    )
    max_orphan_blocks: int = _f(
        DEFAULT_MAX_ORPHAN_BLOCKS, doc="blocks with an unknown parent kept per pod", minimum=0
    )


@dataclass(frozen=True)
class HashCheckConfig:
    hash_algo: str = _f("sha256", doc="the pods' --prefix-caching-hash-algo", choices=HASH_ALGOS)
    pythonhashseed: str | None = _f(None, doc="the pods' PYTHONHASHSEED (null: unset)")
    block_size: int = _f(16, doc="the pods' --block-size", minimum=1)


@dataclass(frozen=True)
class ListenerConfig:
    enabled: bool = _f(True, doc="run the KV-event listener")
    bind: list[str] = _f(factory=list, doc="addresses to bind SUB sockets on (pods connect)")
    topic_filter: str = _f("kv@", doc="bind mode: topic prefix to subscribe to")
    bind_replay_port: int | None = _f(
        None, doc="bind mode: pods' replay port (host from pod name)", minimum=1, maximum=65535
    )
    replay: bool = _f(True, doc="repair gaps and restarts through replay endpoints")
    replay_timeout_s: float = _f(2.0, doc="give up a silent replay after this long", minimum=0.01)
    max_message_bytes: int = _f(
        DEFAULT_MAX_PAYLOAD_BYTES, doc="largest message accepted", minimum=1024
    )
    max_queued_messages: int = _f(
        10_000, doc="messages queued per socket before ZeroMQ sheds (seen as a gap)", minimum=1
    )
    unknown_pods: str = _f(
        "auto",
        doc="bind-mode events from pods that are not endpoints: accept, reject, or auto "
        "(reject when endpoints are configured statically)",
        choices=("auto", "accept", "reject"),
    )
    hash_check: HashCheckConfig | None = _f(
        None, doc="check sampled events against these vLLM hash settings"
    )


@dataclass(frozen=True)
class KVEventsSource:
    endpoint: str = _f(doc="the pod's publisher address, rank 0 (tcp://host:port)")
    replay_endpoint: str | None = _f(None, doc="the pod's replay (ROUTER) address, rank 0")
    dp_size: int = _f(1, doc="data-parallel ranks (rank r at port + r)", minimum=1)
    topic: str = _f("", doc="subscription prefix")


@dataclass(frozen=True)
class EndpointConfig:
    id: str = _f(doc="the endpoint id (the pod name in KV-event topics)")
    url: str = _f("", doc="base URL, e.g. http://10.0.0.5:8000")
    models: list[str] = _f(factory=list, doc="served model names (empty: any)")
    adapters: list[str] = _f(factory=list, doc="served LoRA adapter names")
    labels: dict[str, str] = _f(factory=dict, doc="labels for label-selector filters")
    kv_events: KVEventsSource | None = _f(None, doc="dial this pod's KV-event publisher")


@dataclass(frozen=True)
class TokenizerConfig:
    model: str = _f(doc="model name as requests give it")
    source: str = _f(doc="local directory, or a hub name already in the local HF cache")
    chat_template: str | None = _f(None, doc="chat template override: Jinja text or a .jinja path")
    adapters: list[str] = _f(factory=list, doc="LoRA adapters of this model (share its tokenizer)")


@dataclass(frozen=True)
class ComponentConfig:
    type: str = _f(doc="registered type name")
    params: dict[str, Any] = _f(factory=dict, doc="the component's own parameters")


@dataclass(frozen=True)
class ScorerConfig:
    type: str = _f(doc="registered scorer type")
    weight: float = _f(1.0, doc="multiplies the scorer's [0, 1] score", minimum=0.0)
    params: dict[str, Any] = _f(factory=dict, doc="the scorer's own parameters")


@dataclass(frozen=True)
class LoadConfig:
    scrape: bool = _f(True, doc="scrape each endpoint's /metrics")
    scrape_interval_s: float = _f(1.0, doc="seconds between scrapes", minimum=0.05)
    scrape_timeout_s: float = _f(0.5, doc="timeout of one scrape", minimum=0.01)


@dataclass(frozen=True)
class PipelineConfig:
    plugins: PluginsConfig = _f(factory=PluginsConfig, doc="which entry-point plugins load")
    index: IndexConfig = _f(factory=IndexConfig, doc="the prefix index")
    listener: ListenerConfig = _f(factory=ListenerConfig, doc="the KV-event listener")
    endpoints: list[EndpointConfig] = _f(factory=list, doc="static endpoints")
    tokenizers: list[TokenizerConfig] = _f(factory=list, doc="tokenizer per model")
    filters: list[ComponentConfig] = _f(
        factory=lambda: [ComponentConfig("model-match"), ComponentConfig("health")],
        doc="filters, applied in order",
    )
    scorers: list[ScorerConfig] = _f(
        factory=lambda: [ScorerConfig("prefill-cost", 1.0)], doc="scorers and their weights"
    )
    picker: ComponentConfig = _f(factory=lambda: ComponentConfig("max-score"), doc="the picker")
    fallback: str = _f(
        "error",
        doc="nothing left after the filters: fail, or use all endpoints",
        choices=("error", "unfiltered"),
    )
    load: LoadConfig = _f(factory=LoadConfig, doc="load figures from the endpoints")


def load_config(
    source: Mapping[str, Any] | str | Path | None, *, root: str = "kvaware"
) -> PipelineConfig:
    """Validate a mapping (or a YAML file path) into a :class:`PipelineConfig`.

    A mapping with a single ``kvaware`` key is unwrapped, so a router's whole YAML works.
    """
    if source is None:
        return PipelineConfig()
    if isinstance(source, (str, Path)):
        source = read_yaml(Path(source))
    path = ""
    if isinstance(source, Mapping) and root in source:
        extra = sorted(k for k in source if k != root)
        source = source[root]
        path = root
        del extra  # other top-level keys belong to the host router
    if source is None:
        source = {}
    try:
        return _convert(PipelineConfig, source, path)  # type: ignore[no-any-return]
    except RecursionError:
        raise ConfigError(f"{path or 'config'}: nested too deeply") from None


def read_yaml(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a configuration") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(tp: Any, value: Any, path: str, meta: Mapping[str, Any] | None = None) -> Any:
    origin = typing.get_origin(tp)
    where = path or "(top level)"
    if origin in (Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, path, meta)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: must be a mapping, got {_show(value)}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(str(k) for k in value if k not in fields)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(fields)}"
            )
        out = {}
        for name, f in fields.items():
            sub = _join(path, name)
            if name in value:
                out[name] = _convert(hints[name], value[name], sub, f.metadata)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{sub}: required ({f.metadata.get('doc', '')})")
        return tp(**out)  # type: ignore[operator]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list, got {_show(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{path}[{i}]", meta) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: must be a mapping, got {_show(value)}")
        _key_tp, item_tp = typing.get_args(tp)
        if item_tp is Any:
            return {str(k): _expand_env(v, _join(path, str(k))) for k, v in value.items()}
        return {str(k): _convert(item_tp, v, _join(path, str(k)), meta) for k, v in value.items()}
    return _scalar(tp, value, where, meta or {})


def _scalar(tp: Any, value: Any, where: str, meta: Mapping[str, Any]) -> Any:
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, got {_show(value)}")
        value = _expand_env(value, where)
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(
                f"{where}: {value!r} is not allowed; allowed values: {', '.join(choices)}"
            )
        return value
    if tp is bool:
        if isinstance(value, str) and "${" in value:
            expanded = str(_expand_env(value, where)).strip().lower()
            if expanded in ("true", "false"):
                return expanded == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, got {_show(value)}")
        return value
    if tp in (int, float):
        if isinstance(value, str):
            value = _expand_env(value, where)
            try:
                value = int(value) if tp is int else float(value)
            except ValueError:
                raise ConfigError(f"{where}: must be a number, got {value!r}") from None
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                float(value)
            except OverflowError:
                raise ConfigError(f"{where}: {value} is too large for a number") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (tp is int and not isinstance(value, int))
        ):
            kind = "an integer" if tp is int else "a number"
            raise ConfigError(f"{where}: must be {kind}, got {_show(value)}")
        low, high = meta.get("minimum"), meta.get("maximum")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = (
                f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            )
            raise ConfigError(f"{where}: {value!r} is out of range; allowed: {bounds}")
        return tp(value)
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover - schema bug


def _expand_env(value: Any, where: str) -> Any:
    """Substitute ``${NAME}`` / ``${NAME:-default}`` in strings, also inside nested params."""
    if isinstance(value, Mapping):
        return {k: _expand_env(v, _join(where, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if not found:  # unset, or set but empty: like the shell's ${NAME:-default}
            if found is not None and default is None:
                return found
            if default is None:
                raise ConfigError(
                    f"{where}: environment variable {name} is not set; set it or write "
                    f"${{{name}:-default}}"
                )
            return default
        return found

    return _ENV.sub(sub, value)


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def config_keys(tp: Any = PipelineConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every key path with its default and doc, for the configuration reference."""
    out: list[tuple[str, Any, str]] = []
    hints = typing.get_type_hints(tp)
    for f in dataclasses.fields(tp):
        path = _join(prefix, f.name)
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else f.default_factory()
            if f.default_factory is not dataclasses.MISSING
            else None
        )
        out.append((path, default, f.metadata.get("doc", "")))
        inner = hints[f.name]
        args = [a for a in typing.get_args(inner) if a is not type(None)]
        if typing.get_origin(inner) is list and dataclasses.is_dataclass(args[0]):
            out.extend(config_keys(args[0], path + "[]"))
        elif dataclasses.is_dataclass(inner):
            out.extend(config_keys(inner, path))
        elif args and dataclasses.is_dataclass(args[0]) and typing.get_origin(inner) is not dict:
            out.extend(config_keys(args[0], path))
    return out
