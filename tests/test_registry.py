"""ComponentRegistry and Params: typed parameters, refused keys, names, duplicates, protocols."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.pipeline import Pipeline
from kvaware_scorer.registry import ComponentRegistry, Filter, Params, Picker, Scorer
from kvaware_scorer.types import Endpoint, RoutingRequest, ScoredEndpoint

PATH = "scorers[2].params"


class _Scorer:
    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[str, float]:
        return {e.id: 1.0 for e in endpoints}


class _Filter:
    def filter(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        return endpoints


class _Picker:
    def pick(self, request: RoutingRequest, ranked: Sequence[ScoredEndpoint]) -> Endpoint:
        return ranked[0].endpoint


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    # Built-ins only, nothing started: a real pipeline for factories to receive.
    return Pipeline(
        {"listener": {"enabled": False}, "load": {"scrape": False}}, load_entry_points=False
    )


# ---------------------------------------------------------------------------- Params


def test_params_defaults_are_returned_and_recorded_in_asked() -> None:
    p = Params({}, PATH)
    assert p.number("scale", 1.5, minimum=0.0) == 1.5
    assert p.integer("n", 7, minimum=1) == 7
    assert p.optional_integer("seed") is None
    assert p.boolean("on", True) is True
    assert p.string("mode", "a", choices=("a", "b")) == "a"
    assert p.string_map("labels") == {}
    assert p.asked == {"scale": 1.5, "n": 7, "seed": None, "on": True, "mode": "a", "labels": {}}
    p.done()


def test_params_given_values_are_converted() -> None:
    p = Params(
        {"scale": 2, "n": 3, "seed": 9, "on": False, "mode": "b", "labels": {"zone": "a"}}, PATH
    )
    scale = p.number("scale", 1.0)
    assert scale == 2.0 and isinstance(scale, float)
    assert p.integer("n", 1) == 3
    assert p.optional_integer("seed") == 9
    assert p.boolean("on", True) is False
    assert p.string("mode", "a", choices=("a", "b")) == "b"
    assert p.string_map("labels") == {"zone": "a"}
    p.done()


def test_params_none_is_an_empty_mapping() -> None:
    p = Params(None, PATH)
    assert p.integer("n", 4) == 4
    p.done()


@pytest.mark.parametrize("raw", [[1, 2], "text", 3])
def test_params_must_be_a_mapping(raw: Any) -> None:
    with pytest.raises(ConfigError, match=r"^scorers\[2\]\.params: must be a mapping, got "):
        Params(raw, PATH)


@pytest.mark.parametrize(
    ("reader", "value", "message"),
    [
        ("number", "fast", r"scorers\[2\]\.params\.k: must be a number, got 'fast'"),
        ("number", True, r"scorers\[2\]\.params\.k: must be a number, got True"),
        ("number", None, r"scorers\[2\]\.params\.k: must be a number, got None"),
        ("integer", 1.5, r"scorers\[2\]\.params\.k: must be an integer, got 1\.5"),
        ("integer", False, r"scorers\[2\]\.params\.k: must be an integer, got False"),
        ("integer", "3", r"scorers\[2\]\.params\.k: must be an integer, got '3'"),
        ("optional_integer", 2.5, r"scorers\[2\]\.params\.k: must be an integer or null"),
        ("boolean", "yes", r"scorers\[2\]\.params\.k: must be true or false, got 'yes'"),
        ("boolean", 1, r"scorers\[2\]\.params\.k: must be true or false, got 1"),
        ("string", 5, r"scorers\[2\]\.params\.k: must be a string, got 5"),
        ("string_map", {"a": 1}, r"scorers\[2\]\.params\.k: must be a mapping of strings"),
        ("string_map", ["a"], r"scorers\[2\]\.params\.k: must be a mapping of strings"),
    ],
)
def test_params_type_errors_name_the_path(reader: str, value: Any, message: str) -> None:
    p = Params({"k": value}, PATH)
    defaults: dict[str, tuple[Any, ...]] = {
        "number": (1.0,),
        "integer": (1,),
        "optional_integer": (),
        "boolean": (True,),
        "string": ("x",),
        "string_map": (),
    }
    with pytest.raises(ConfigError, match=f"^{message}"):
        getattr(p, reader)("k", *defaults[reader])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: p.number("k", 1.0, minimum=0.5), r"params\.k: must be >= 0\.5, got 0\.1"),
        (lambda p: p.number("k", 0.0, maximum=0.05), r"params\.k: must be <= 0\.05, got 0\.1"),
        (lambda p: p.integer("j", 1, minimum=2), r"params\.j: must be >= 2, got 1"),
        (lambda p: p.integer("j", 1, maximum=0), r"params\.j: must be <= 0, got 1"),
        (lambda p: p.optional_integer("j", minimum=5), r"params\.j: must be >= 5, got 1"),
    ],
)
def test_params_range_errors_name_the_bound(call: Any, message: str) -> None:
    p = Params({"k": 0.1, "j": 1}, PATH)
    with pytest.raises(ConfigError, match=message):
        call(p)


def test_params_range_bounds_are_inclusive() -> None:
    p = Params({"k": 0.5, "j": 2}, PATH)
    assert p.number("k", 1.0, minimum=0.5, maximum=0.5) == 0.5
    assert p.integer("j", 1, minimum=2, maximum=2) == 2


def test_params_choices_error_lists_the_allowed_values() -> None:
    p = Params({"by": "bytes"}, PATH)
    with pytest.raises(ConfigError) as err:
        p.string("by", "requests", choices=("requests", "tokens"))
    assert str(err.value) == (
        "scorers[2].params.by: 'bytes' is not allowed; allowed values: requests, tokens"
    )


def test_params_unknown_keys_are_refused_with_the_allowed_list() -> None:
    p = Params({"scale": 1.0, "scael": 2.0, "zz": 1}, PATH)
    p.number("scale", 1.0)
    p.integer("depth", 3)
    with pytest.raises(ConfigError) as err:
        p.done()
    assert str(err.value) == ("scorers[2].params: unknown key(s) scael, zz; allowed: depth, scale")


def test_params_unknown_keys_when_nothing_is_accepted() -> None:
    p = Params({"x": 1}, PATH)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) x; allowed: none$"):
        p.done()


# ---------------------------------------------------------------------------- registry


def test_register_and_list_names_per_kind() -> None:
    reg = ComponentRegistry()
    reg.current_plugin = "mine"
    reg.add_scorer("b-scorer", lambda pl, pa: _Scorer(), doc="b")
    reg.add_scorer("a-scorer", lambda pl, pa: _Scorer())
    reg.add_filter("a-scorer", lambda pl, pa: _Filter())  # names are unique per kind only
    reg.add_picker("p", lambda pl, pa: _Picker())
    assert reg.names("scorer") == ["a-scorer", "b-scorer"]
    assert reg.names("filter") == ["a-scorer"]
    assert reg.names("picker") == ["p"]
    entry = reg.types[("scorer", "b-scorer")]
    assert (entry.kind, entry.name, entry.doc, entry.plugin) == ("scorer", "b-scorer", "b", "mine")


def test_duplicate_registration_names_both_plugins() -> None:
    reg = ComponentRegistry()
    reg.current_plugin = "first-plugin"
    reg.add_scorer("dup", lambda pl, pa: _Scorer())
    reg.current_plugin = "second-plugin"
    with pytest.raises(ValueError, match="registered twice") as err:
        reg.add_scorer("dup", lambda pl, pa: _Scorer())
    assert "first-plugin" in str(err.value) and "second-plugin" in str(err.value)
    assert "block one of the plugins" in str(err.value)
    assert reg.types[("scorer", "dup")].plugin == "first-plugin"


@pytest.mark.parametrize("name", ["", "Upper", "under_score", "-leading", "sp ace", "dot.ted"])
def test_bad_type_names_are_refused(name: str) -> None:
    reg = ComponentRegistry()
    with pytest.raises(ValueError, match="must be kebab-case"):
        reg.add_filter(name, lambda pl, pa: _Filter())
    assert reg.types == {}


@pytest.mark.parametrize("name", ["a", "kv-prefix", "x2", "0-start"])
def test_good_type_names_are_accepted(name: str) -> None:
    reg = ComponentRegistry()
    reg.add_filter(name, lambda pl, pa: _Filter())
    assert reg.names("filter") == [name]


def test_build_passes_the_pipeline_and_checked_params(pipeline: Pipeline) -> None:
    seen: dict[str, Any] = {}

    def factory(pl: Pipeline, params: Params) -> _Scorer:
        seen["pipeline"] = pl
        seen["n"] = params.integer("n", 1, minimum=1)
        seen["path"] = params.path
        return _Scorer()

    reg = ComponentRegistry()
    reg.add_scorer("s", factory)
    built = reg.build("scorer", "s", pipeline, {"n": 4}, "scorers[0]")
    assert isinstance(built, Scorer)
    assert seen == {"pipeline": pipeline, "n": 4, "path": "scorers[0].params"}


def test_build_refuses_unknown_params_after_the_factory(pipeline: Pipeline) -> None:
    reg = ComponentRegistry()
    reg.add_scorer("s", lambda pl, pa: (pa.integer("n", 1), _Scorer())[1])
    with pytest.raises(ConfigError) as err:
        reg.build("scorer", "s", pipeline, {"n": 2, "m": 3}, "scorers[1]")
    assert str(err.value) == "scorers[1].params: unknown key(s) m; allowed: n"


def test_build_unknown_type_lists_registered_types(pipeline: Pipeline) -> None:
    reg = ComponentRegistry()
    reg.add_picker("p-one", lambda pl, pa: _Picker())
    reg.add_picker("p-two", lambda pl, pa: _Picker())
    with pytest.raises(ConfigError) as err:
        reg.build("picker", "p-three", pipeline, {}, "picker")
    assert str(err.value) == "picker.type: unknown picker 'p-three'; allowed values: p-one, p-two"
    with pytest.raises(ConfigError, match="allowed values: none registered"):
        reg.build("filter", "f", pipeline, {}, "filters[0]")


@pytest.mark.parametrize(
    ("kind", "protocol"), [("filter", "Filter"), ("scorer", "Scorer"), ("picker", "Picker")]
)
def test_build_refuses_an_object_without_the_protocol(
    pipeline: Pipeline, kind: Any, protocol: str
) -> None:
    reg = ComponentRegistry()
    reg.current_plugin = "sloppy-plugin"
    # Each of these implements a *different* protocol than the one asked for.
    wrong = {"filter": _Scorer, "scorer": _Picker, "picker": _Filter}[kind]
    getattr(reg, f"add_{kind}")("thing", lambda pl, pa: wrong())
    with pytest.raises(ConfigError) as err:
        reg.build(kind, "thing", pipeline, {}, "somewhere[3]")
    assert str(err.value) == (
        f"somewhere[3]: {kind} 'thing' from plugin sloppy-plugin does not implement {protocol}"
    )


def test_build_refuses_none_from_a_factory(pipeline: Pipeline) -> None:
    reg = ComponentRegistry()
    reg.add_scorer("forgot-return", lambda pl, pa: None)
    with pytest.raises(ConfigError, match="does not implement Scorer"):
        reg.build("scorer", "forgot-return", pipeline, {}, "scorers[0]")


def test_protocols_are_runtime_checkable() -> None:
    assert isinstance(_Filter(), Filter) and not isinstance(_Filter(), Scorer)
    assert isinstance(_Scorer(), Scorer) and not isinstance(_Scorer(), Picker)
    assert isinstance(_Picker(), Picker) and not isinstance(_Picker(), Filter)


def test_pipeline_registry_records_the_registering_plugin(pipeline: Pipeline) -> None:
    owners = {(e.kind, e.name): e.plugin for e in pipeline.registry.types.values()}
    assert owners[("scorer", "kv-prefix")] == "prefix-scorers"
    assert owners[("scorer", "prefill-cost")] == "load-scorers"
    assert owners[("filter", "health")] == "filters"
    assert owners[("picker", "max-score")] == "pickers"
    assert pipeline.registry.current_plugin == ""
