"""ComponentRegistry: component factories by type name, and typed parameter reading.

Plugins add factories in ``kvaware_register``; the pipeline builds the components the
configuration names. A factory is called as ``factory(pipeline, params)`` and reads its
parameters through :class:`Params`, which checks types and ranges, names the YAML path in
every error, and refuses keys the factory did not ask for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, runtime_checkable

from kvaware_scorer.errors import ConfigError

if TYPE_CHECKING:
    from kvaware_scorer.pipeline import Pipeline
    from kvaware_scorer.types import Endpoint, RoutingRequest, ScoredEndpoint

Kind = Literal["filter", "scorer", "picker"]
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_T = TypeVar("_T")


@runtime_checkable
class Filter(Protocol):
    """Keeps the endpoints a request may go to."""

    def filter(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        """Return the subset of ``endpoints`` that may serve ``request``."""


@runtime_checkable
class Scorer(Protocol):
    """Scores endpoints in [0, 1]; a missing endpoint id means 0."""

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[str, float]:
        """Return endpoint id -> score in [0, 1]."""


@runtime_checkable
class Picker(Protocol):
    """Chooses one endpoint among the scored ones (ranked best first)."""

    def pick(self, request: RoutingRequest, ranked: Sequence[ScoredEndpoint]) -> Endpoint:
        """Return the chosen endpoint."""


class Params:
    """Typed access to one component's ``params`` mapping, for config validation."""

    def __init__(self, raw: Mapping[str, Any] | None, path: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: must be a mapping, got {type(raw).__name__}")
        self._raw = dict(raw)
        self.path = path
        self.asked: dict[str, Any] = {}  # key -> default, for docs and the unknown-key check

    def _get(self, key: str, default: Any) -> Any:
        self.asked[key] = default
        return self._raw.get(key, default)

    def number(
        self,
        key: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.path}.{key}: must be a number, got {value!r}")
        _check_range(f"{self.path}.{key}", value, minimum, maximum)
        return float(value)

    def integer(
        self, key: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.path}.{key}: must be an integer, got {value!r}")
        _check_range(f"{self.path}.{key}", value, minimum, maximum)
        return value

    def optional_integer(self, key: str, *, minimum: int | None = None) -> int | None:
        value = self._get(key, None)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.path}.{key}: must be an integer or null, got {value!r}")
        _check_range(f"{self.path}.{key}", value, minimum, None)
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.path}.{key}: must be true or false, got {value!r}")
        return value

    def string(self, key: str, default: str, *, choices: Sequence[str] | None = None) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.path}.{key}: must be a string, got {value!r}")
        if choices is not None and value not in choices:
            raise ConfigError(
                f"{self.path}.{key}: {value!r} is not allowed; allowed values: {', '.join(choices)}"
            )
        return value

    def string_map(self, key: str) -> dict[str, str]:
        value = self._get(key, {})
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{self.path}.{key}: must be a mapping of strings to strings")
        return dict(value)

    def done(self) -> None:
        """Refuse keys nobody asked for (typos fail at start-up)."""
        unknown = sorted(set(self._raw) - set(self.asked))
        if unknown:
            allowed = ", ".join(sorted(self.asked)) or "none"
            raise ConfigError(
                f"{self.path}: unknown key(s) {', '.join(unknown)}; allowed: {allowed}"
            )


def _check_range(path: str, value: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and value < minimum:
        raise ConfigError(f"{path}: must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{path}: must be <= {maximum}, got {value!r}")


Factory = Callable[["Pipeline", Params], Any]


@dataclass(frozen=True)
class ComponentType:
    kind: Kind
    name: str
    factory: Factory
    doc: str
    plugin: str = ""


@dataclass
class ComponentRegistry:
    """Factories by kind and type name (kebab-case, unique per kind)."""

    types: dict[tuple[Kind, str], ComponentType] = field(default_factory=dict)
    current_plugin: str = ""

    def _add(self, kind: Kind, name: str, factory: Factory, doc: str) -> None:
        if not _NAME.match(name):
            raise ValueError(f"{kind} type name {name!r} must be kebab-case ([a-z0-9-])")
        existing = self.types.get((kind, name))
        if existing is not None:
            raise ValueError(
                f"{kind} type {name!r} is registered twice (by {existing.plugin or '?'} and "
                f"{self.current_plugin or '?'}); block one of the plugins"
            )
        self.types[(kind, name)] = ComponentType(kind, name, factory, doc, self.current_plugin)

    def add_filter(self, name: str, factory: Factory, *, doc: str = "") -> None:
        self._add("filter", name, factory, doc)

    def add_scorer(self, name: str, factory: Factory, *, doc: str = "") -> None:
        self._add("scorer", name, factory, doc)

    def add_picker(self, name: str, factory: Factory, *, doc: str = "") -> None:
        self._add("picker", name, factory, doc)

    def names(self, kind: Kind) -> list[str]:
        return sorted(name for k, name in self.types if k == kind)

    def build(self, kind: Kind, name: str, pipeline: Pipeline, raw: Any, path: str) -> Any:
        """Build one component; errors name ``path`` and the registered types."""
        entry = self.types.get((kind, name))
        if entry is None:
            allowed = ", ".join(self.names(kind)) or "none registered"
            raise ConfigError(f"{path}.type: unknown {kind} {name!r}; allowed values: {allowed}")
        params = Params(raw, f"{path}.params")
        component = entry.factory(pipeline, params)
        params.done()
        protocol = {"filter": Filter, "scorer": Scorer, "picker": Picker}[kind]
        if not isinstance(component, protocol):
            raise ConfigError(
                f"{path}: {kind} {name!r} from plugin {entry.plugin or '?'} does not implement "
                f"{protocol.__name__}"
            )
        return component
