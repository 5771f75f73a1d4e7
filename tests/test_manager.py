"""The plugin manager: built-ins, entry-point discovery, allow and block lists, hook checks.

Third-party plugins are found for real, through ``importlib.metadata`` entry points: the
installed ``kvaware-session-affinity`` distribution, and test-only distributions that
:func:`install_plugins` writes as a ``.dist-info`` folder on a temporary ``sys.path`` entry
(their entry points name objects defined in this module, such as :data:`KIT`).
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pluggy
import pytest

from kvaware_scorer.errors import ConfigError, KVAwareError
from kvaware_scorer.hookspecs import hookimpl
from kvaware_scorer.manager import BUILTIN_PLUGINS, GROUP, get_plugin_manager
from kvaware_scorer.pipeline import Pipeline
from kvaware_scorer.registry import ComponentRegistry, Params
from kvaware_scorer.types import Decision, Endpoint, RoutingRequest, ScoredEndpoint

SESSION_PLUGIN = "session-affinity"
_dist_numbers = itertools.count()


# ---------------------------------------------------------------------------- helpers


def install_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **eps: str) -> str:
    """Make a test-only distribution whose ``kvaware_scorer`` entry points are ``eps``
    (name -> ``module:attr``) discoverable for the rest of the test. Returns its name."""
    dist = f"kvaware_test_plugin_{next(_dist_numbers)}"
    info = tmp_path / f"site-{dist}" / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in eps.items())
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{lines}")
    monkeypatch.syspath_prepend(str(info.parent))
    return dist


def require_session_plugin() -> None:
    from importlib.metadata import entry_points

    if not any(ep.name == SESSION_PLUGIN for ep in entry_points(group=GROUP)):
        pytest.fail(
            "the session-affinity plugin is not installed; run "
            ".venv/bin/pip install -e plugins/kvaware-session-affinity"
        )


def quiet_config(**overrides: Any) -> dict[str, Any]:
    """A pipeline mapping with no listener and no scraper, plus ``overrides``."""
    config: dict[str, Any] = {"listener": {"enabled": False}, "load": {"scrape": False}}
    config.update(overrides)
    return config


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVAWARE_PLUGINS", raising=False)
    monkeypatch.delenv("KVAWARE_DISABLE_PLUGINS", raising=False)


# ---------------------------------------------------------------------------- test kit
# A plugin object used through a test-only entry point ("testkit = test_manager:KIT") by
# the manager, pipeline and hook tests. Its per-pipeline state lives in
# ``pipeline.extensions``, so pipelines never see each other's calls.


class _Boom:
    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[str, float]:
        raise RuntimeError("scorer exploded")


class _Fixed:
    """Scores given in params as endpoint id -> number (strings, as YAML labels are)."""

    def __init__(self, scores: Mapping[str, str]) -> None:
        self.scores = {k: float(v) for k, v in scores.items()}

    def score(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Mapping[str, float]:
        return dict(self.scores)


class _BoomPicker:
    def pick(self, request: RoutingRequest, ranked: Sequence[ScoredEndpoint]) -> Endpoint:
        raise RuntimeError("picker exploded")


class _DropAll:
    def filter(self, request: RoutingRequest, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        return []


def _fixed(pipeline: Pipeline, params: Params) -> _Fixed:
    return _Fixed(params.string_map("scores"))


def calls(pipeline: Pipeline) -> list[tuple[Any, ...]]:
    """The hook calls the test kit recorded for ``pipeline``."""
    found: list[tuple[Any, ...]] = pipeline.extensions.setdefault("testkit.calls", [])
    return found


class KitPlugin:
    @hookimpl
    def kvaware_register(self, registry: ComponentRegistry) -> None:
        registry.add_scorer("boom", lambda pipeline, params: _Boom(), doc="always raises")
        registry.add_scorer("fixed", _fixed, doc="scores from params.scores")
        registry.add_scorer(
            "wild",
            lambda pipeline, params: _Fixed(
                {"a": "nan", "b": "7", "c": "-3", "d": "inf", "ghost": "1"}
            ),
            doc="out-of-range scores",
        )
        registry.add_picker("boom-picker", lambda pipeline, params: _BoomPicker())
        registry.add_filter("drop-all", lambda pipeline, params: _DropAll())

    @hookimpl
    def kvaware_startup(self, pipeline: Pipeline) -> None:
        calls(pipeline).append(("startup", pipeline))
        failure = pipeline.extensions.get("testkit.fail_startup")
        if failure:
            raise KVAwareError(failure)

    @hookimpl
    def kvaware_shutdown(self, pipeline: Pipeline) -> None:
        calls(pipeline).append(("shutdown", pipeline))

    @hookimpl
    def kvaware_endpoints_changed(
        self, pipeline: Pipeline, added: Sequence[Endpoint], removed: Sequence[Endpoint]
    ) -> None:
        calls(pipeline).append(
            ("endpoints_changed", sorted(e.id for e in added), sorted(e.id for e in removed))
        )

    @hookimpl
    def kvaware_request_routed(
        self,
        pipeline: Pipeline,
        request: RoutingRequest,
        endpoint: Endpoint,
        decision: Decision | None,
    ) -> None:
        calls(pipeline).append(("routed", request, endpoint, decision))

    @hookimpl
    def kvaware_request_finished(
        self,
        pipeline: Pipeline,
        request: RoutingRequest,
        endpoint: Endpoint,
        prompt_tokens: int | None,
        cached_tokens: int | None,
        error: str | None,
    ) -> None:
        calls(pipeline).append(("finished", request, endpoint, prompt_tokens, cached_tokens, error))


KIT = KitPlugin()


class TypoPlugin:
    @hookimpl
    def kvaware_request_routd(self, pipeline: Pipeline) -> None:  # misspelt on purpose
        raise AssertionError("never called")


class ExtraArgPlugin:
    @hookimpl
    def kvaware_request_routed(self, pipeline: Pipeline, latency_ms: float) -> None:
        raise AssertionError("never called")


class DuplicateTypePlugin:
    @hookimpl
    def kvaware_register(self, registry: ComponentRegistry) -> None:
        registry.add_scorer("kv-prefix", lambda pipeline, params: _Boom())


TYPO = TypoPlugin()
EXTRA_ARG = ExtraArgPlugin()
DUPLICATE_TYPE = DuplicateTypePlugin()


# ---------------------------------------------------------------------------- built-ins


def test_builtins_load_without_entry_points() -> None:
    pm = get_plugin_manager(load_entry_points=False)
    names = {pm.get_name(p) for p in pm.get_plugins()}
    assert names == set(BUILTIN_PLUGINS)
    for name, module in BUILTIN_PLUGINS.items():
        assert pm.get_plugin(name) is sys.modules[module]


def test_builtins_are_declared_as_entry_points_of_this_distribution() -> None:
    from importlib.metadata import entry_points

    declared = {ep.name: ep.value for ep in entry_points(group=GROUP) if ep.name in BUILTIN_PLUGINS}
    assert declared == BUILTIN_PLUGINS


def test_builtin_hooks_and_types_are_registered() -> None:
    pm = get_plugin_manager(load_entry_points=False)
    routed = {impl.plugin_name for impl in pm.hook.kvaware_request_routed.get_hookimpls()}
    assert routed == {"kv-engine", "prefix-scorers"}
    pipeline = Pipeline(quiet_config(), load_entry_points=False)
    assert pipeline.registry.names("filter") == ["health", "label-selector", "model-match"]
    assert pipeline.registry.names("picker") == ["max-score", "weighted-random"]
    assert pipeline.registry.names("scorer") == [
        "approx-prefix",
        "in-flight",
        "kv-prefix",
        "kv-usage",
        "prefill-cost",
        "queue",
    ]


# ---------------------------------------------------------------------------- discovery


def test_installed_session_affinity_plugin_is_discovered() -> None:
    require_session_plugin()
    import kvaware_session_affinity.plugin as session_module

    pm = get_plugin_manager()
    assert pm.get_plugin(SESSION_PLUGIN) is session_module
    pipeline = Pipeline(quiet_config())
    entry = pipeline.registry.types[("scorer", SESSION_PLUGIN)]
    assert entry.plugin == SESSION_PLUGIN
    assert "session" in entry.doc


def test_without_entry_points_only_builtins_load() -> None:
    require_session_plugin()
    pm = get_plugin_manager(load_entry_points=False)
    assert pm.get_plugin(SESSION_PLUGIN) is None


def test_test_only_distribution_is_discovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugins(tmp_path, monkeypatch, testkit="test_manager:KIT")
    pm = get_plugin_manager()
    assert pm.get_plugin("testkit") is KIT
    pipeline = Pipeline(quiet_config(scorers=[{"type": "boom"}]))
    assert pipeline.registry.types[("scorer", "boom")].plugin == "testkit"


# ---------------------------------------------------------------------------- allow list


def test_config_allow_empty_loads_no_third_party_plugin() -> None:
    require_session_plugin()
    pm = get_plugin_manager(allow=[])
    assert pm.get_plugin(SESSION_PLUGIN) is None
    assert {pm.get_name(p) for p in pm.get_plugins()} == set(BUILTIN_PLUGINS)


def test_config_allow_names_the_plugins_to_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_session_plugin()
    install_plugins(tmp_path, monkeypatch, testkit="test_manager:KIT")
    pm = get_plugin_manager(allow=["testkit"])
    assert pm.get_plugin("testkit") is KIT
    assert pm.get_plugin(SESSION_PLUGIN) is None
    pm = get_plugin_manager(allow=[SESSION_PLUGIN])
    assert pm.get_plugin("testkit") is None
    assert pm.get_plugin(SESSION_PLUGIN) is not None


def test_allow_list_from_yaml_keeps_a_scorer_type_out() -> None:
    require_session_plugin()
    config = quiet_config(plugins={"allow": []}, scorers=[{"type": SESSION_PLUGIN}])
    with pytest.raises(ConfigError) as err:
        Pipeline(config)
    assert str(err.value).startswith("scorers[0].type: unknown scorer 'session-affinity'")
    assert "allowed values: approx-prefix, in-flight, kv-prefix" in str(err.value)


def test_env_allow_empty_string_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    require_session_plugin()
    monkeypatch.setenv("KVAWARE_PLUGINS", "")
    assert get_plugin_manager().get_plugin(SESSION_PLUGIN) is None
    monkeypatch.setenv("KVAWARE_PLUGINS", " , ")
    assert get_plugin_manager().get_plugin(SESSION_PLUGIN) is None


def test_env_allow_names_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    require_session_plugin()
    monkeypatch.setenv("KVAWARE_PLUGINS", f" {SESSION_PLUGIN} ")
    assert get_plugin_manager().get_plugin(SESSION_PLUGIN) is not None


def test_config_allow_takes_precedence_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    require_session_plugin()
    monkeypatch.setenv("KVAWARE_PLUGINS", "")
    assert get_plugin_manager(allow=[SESSION_PLUGIN]).get_plugin(SESSION_PLUGIN) is not None
    monkeypatch.setenv("KVAWARE_PLUGINS", SESSION_PLUGIN)
    assert get_plugin_manager(allow=[]).get_plugin(SESSION_PLUGIN) is None


def test_allow_naming_a_plugin_that_is_not_installed_fails() -> None:
    with pytest.raises(ConfigError) as err:
        get_plugin_manager(allow=["no-such-plugin", "kv-engine"])
    message = str(err.value)
    assert message.startswith("plugins.allow names plugins that are not installed: no-such-plugin;")
    assert "installed: " in message and "kv-engine" in message


def test_env_allow_naming_a_plugin_that_is_not_installed_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KVAWARE_PLUGINS", "ghost-plugin")
    with pytest.raises(ConfigError, match="not installed: ghost-plugin"):
        Pipeline(quiet_config())


def test_a_plugin_both_allowed_and_blocked_is_blocked_without_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An operator turning a plugin off with KVAWARE_DISABLE_PLUGINS while the allow list
    # still names it: blocked wins, and the plugin is not reported "not installed".
    require_session_plugin()
    monkeypatch.setenv("KVAWARE_DISABLE_PLUGINS", SESSION_PLUGIN)
    pm = get_plugin_manager(allow=[SESSION_PLUGIN])
    assert pm.get_plugin(SESSION_PLUGIN) is None


# ---------------------------------------------------------------------------- block list


def test_config_block_list_keeps_a_plugin_out() -> None:
    require_session_plugin()
    pm = get_plugin_manager(block=[SESSION_PLUGIN])
    assert pm.get_plugin(SESSION_PLUGIN) is None
    assert pm.is_blocked(SESSION_PLUGIN)
    assert pm.get_plugin("kv-engine") is not None


def test_env_block_list_keeps_plugins_out(monkeypatch: pytest.MonkeyPatch) -> None:
    require_session_plugin()
    monkeypatch.setenv("KVAWARE_DISABLE_PLUGINS", f"{SESSION_PLUGIN}, load-scorers")
    pm = get_plugin_manager()
    assert pm.get_plugin(SESSION_PLUGIN) is None
    assert pm.get_plugin("load-scorers") is None
    assert pm.get_plugin("prefix-scorers") is not None


def test_config_and_env_block_lists_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVAWARE_DISABLE_PLUGINS", "filters")
    pm = get_plugin_manager(block=["pickers"], load_entry_points=False)
    assert {pm.get_name(p) for p in pm.get_plugins()} == set(BUILTIN_PLUGINS) - {
        "filters",
        "pickers",
    }


def test_blocking_a_builtin_removes_its_types() -> None:
    with pytest.raises(ConfigError) as err:
        Pipeline(quiet_config(plugins={"block": ["pickers"]}))
    assert (
        str(err.value) == "picker.type: unknown picker 'max-score'; allowed values: none registered"
    )
    pipeline = Pipeline(
        quiet_config(plugins={"block": ["load-scorers"]}, scorers=[{"type": "kv-prefix"}])
    )
    assert "prefill-cost" not in pipeline.registry.names("scorer")


def test_blocked_plugin_is_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_plugins(tmp_path, monkeypatch, broken="kvaware_no_such_module_for_tests")
    with pytest.raises(ConfigError) as err:
        get_plugin_manager()
    message = str(err.value)
    assert message.startswith("plugin 'broken' (kvaware_no_such_module_for_tests) failed to import")
    assert "KVAWARE_DISABLE_PLUGINS" in message
    pm = get_plugin_manager(block=["broken"])
    assert pm.get_plugin("broken") is None
    pm = get_plugin_manager(allow=[])  # not allowed: not imported either
    assert pm.get_plugin("broken") is None


# ---------------------------------------------------------------------------- hook checks


def test_check_pending_catches_a_misspelt_hook_inline() -> None:
    pm = get_plugin_manager(load_entry_points=False)
    pm.register(TypoPlugin(), name="typo-inline")
    with pytest.raises(pluggy.PluginValidationError, match="kvaware_request_routd"):
        pm.check_pending()


def test_misspelt_hook_in_an_installed_plugin_fails_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugins(tmp_path, monkeypatch, typo="test_manager:TYPO")
    with pytest.raises(ConfigError) as err:
        get_plugin_manager()
    assert "implements an unknown hook" in str(err.value)
    assert "kvaware_request_routd" in str(err.value)
    with pytest.raises(ConfigError, match="unknown hook"):
        Pipeline(quiet_config())
    assert get_plugin_manager(block=["typo"]).get_plugin("typo") is None


def test_hook_asking_for_an_unknown_argument_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugins(tmp_path, monkeypatch, extra="test_manager:EXTRA_ARG")
    with pytest.raises(ConfigError) as err:
        get_plugin_manager()
    assert str(err.value).startswith("plugin 'extra' is invalid:")
    assert "latency_ms" in str(err.value)


def test_two_plugins_registering_one_type_name_fail_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_plugins(tmp_path, monkeypatch, dupe="test_manager:DUPLICATE_TYPE")
    with pytest.raises(ValueError, match="scorer type 'kv-prefix' is registered twice") as err:
        Pipeline(quiet_config())
    assert "dupe" in str(err.value) and "prefix-scorers" in str(err.value)
    Pipeline(quiet_config(plugins={"block": ["dupe"]}))  # the way out the message names


def test_kit_scores_are_what_its_params_say() -> None:
    # Sanity check of the test kit itself, so pipeline tests can rely on it.
    scorer = _Fixed({"a": "0.25", "b": "nan"})
    scores = scorer.score(RoutingRequest(model="m"), [])
    assert scores["a"] == 0.25 and math.isnan(scores["b"])
