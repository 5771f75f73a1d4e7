"""The hook specifications: named ``kvaware_*``, documented in docs/plugins.md with their
exact signatures, and each exercised through a real Pipeline by a ``test_hook_<name>``
test (as datasette's test_plugin_hooks_are_documented / _have_tests)."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_manager import calls, install_plugins, quiet_config
from test_pipeline import Chain, live_threads, wait_for

from kvaware_scorer import hookspecs
from kvaware_scorer.errors import KVAwareError
from kvaware_scorer.manager import get_plugin_manager
from kvaware_scorer.pipeline import Pipeline
from kvaware_scorer.types import Endpoint, RoutingRequest

ROOT = Path(__file__).resolve().parent.parent
PLUGINS_DOC = ROOT / "docs" / "plugins.md"
M = "m"


def hook_specs() -> dict[str, Callable[..., Any]]:
    """Every function of kvaware_scorer.hookspecs marked as a hook specification."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {
        name: fn
        for name, fn in vars(hookspecs).items()
        if callable(fn) and getattr(fn, marker, None) is not None
    }


def expected_heading(name: str, fn: Callable[..., Any]) -> str:
    """``name(arg: Type, ...) -> None``, with the annotations exactly as the spec writes them."""
    sig = inspect.signature(fn)
    args = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{name}({args}) -> {sig.return_annotation}"


def documented_headings() -> dict[str, str]:
    """Hook name -> the signature in its ``### `...` `` heading in docs/plugins.md."""
    found: dict[str, str] = {}
    for line in PLUGINS_DOC.read_text().splitlines():
        match = re.match(r"^### `((kvaware_\w+)\(.*\)(?: -> .+)?)`$", line)
        if match:
            assert match.group(2) not in found, f"{match.group(2)} documented twice"
            found[match.group(2)] = match.group(1)
    return found


def test_there_are_hooks() -> None:
    assert set(hook_specs()) == {
        "kvaware_register",
        "kvaware_startup",
        "kvaware_shutdown",
        "kvaware_endpoints_changed",
        "kvaware_request_routed",
        "kvaware_request_finished",
    }


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_hook_names_are_prefixed(name: str) -> None:
    assert name.startswith("kvaware_")


def test_every_hook_on_the_manager_is_a_prefixed_spec() -> None:
    pm = get_plugin_manager(load_entry_points=False)
    names = {name for name in vars(pm.hook) if not name.startswith("_")}
    assert names == set(hook_specs())
    for name in names:
        assert getattr(pm.hook, name).spec is not None, name


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_plugin_hooks_are_documented(name: str) -> None:
    headings = documented_headings()
    assert name in headings, f"docs/plugins.md has no '### `{name}(...)`' section"
    assert headings[name] == expected_heading(name, hook_specs()[name])


def test_docs_document_no_hook_that_does_not_exist() -> None:
    assert set(documented_headings()) <= set(hook_specs())


def _test_names() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_hook_"):
                names.add(node.name)
    return names


@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_plugin_hooks_have_tests(name: str) -> None:
    tests = _test_names()
    assert any(t == f"test_hook_{name}" or t.startswith(f"test_hook_{name}_") for t in tests), (
        f"no test named test_hook_{name} in tests/"
    )


# ---------------------------------------------------------------------------- the hooks


@pytest.fixture(autouse=True)
def _no_plugin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVAWARE_PLUGINS", raising=False)
    monkeypatch.delenv("KVAWARE_DISABLE_PLUGINS", raising=False)


@pytest.fixture
def kit_pipeline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Pipeline]]:
    """Pipelines with the recording test kit plugin installed through an entry point."""
    install_plugins(tmp_path, monkeypatch, testkit="test_manager:KIT")
    before = live_threads()
    made: list[Pipeline] = []

    def build(**config: Any) -> Pipeline:
        pipeline = Pipeline(quiet_config(**config))
        made.append(pipeline)
        return pipeline

    yield build
    for pipeline in made:
        pipeline.stop()
    wait_for(lambda: not (live_threads() - before), "threads to end")


def kinds(pipeline: Pipeline) -> list[str]:
    return [c[0] for c in calls(pipeline)]


def test_hook_kvaware_register(kit_pipeline: Callable[..., Pipeline]) -> None:
    # The kit's kvaware_register ran before the configuration was applied, so the
    # configuration can name its types; each pipeline gets its own registry.
    p = kit_pipeline(
        endpoints=[{"id": "a"}, {"id": "b"}],
        scorers=[{"type": "fixed", "params": {"scores": {"b": "1"}}}],
    )
    q = kit_pipeline()
    assert p.registry is not q.registry
    for pipeline in (p, q):
        entry = pipeline.registry.types[("scorer", "fixed")]
        assert (entry.plugin, entry.doc) == ("testkit", "scores from params.scores")
        assert pipeline.registry.names("picker") == ["boom-picker", "max-score", "weighted-random"]
    assert p.route(RoutingRequest(model=M, token_ids=[1])).endpoint.id == "b"
    assert calls(p) == []  # registering calls no other hook


def test_hook_kvaware_startup(kit_pipeline: Callable[..., Pipeline]) -> None:
    p = kit_pipeline()
    assert calls(p) == []  # not at construction
    p.start()
    p.start()
    assert calls(p) == [("startup", p)]
    p.stop()
    p.start()  # a restart starts again
    assert kinds(p) == ["startup", "shutdown", "startup"]


def test_hook_kvaware_startup_failure_fails_start(kit_pipeline: Callable[..., Pipeline]) -> None:
    p = kit_pipeline()
    p.extensions["testkit.fail_startup"] = "missing credentials file /etc/x"
    with pytest.raises(KVAwareError, match="missing credentials file"):
        p.start()
    # What the start-up hooks that ran had started is shut down again...
    assert kinds(p) == ["startup", "shutdown"]
    del p.extensions["testkit.fail_startup"]
    p.start()  # ...and the pipeline is not marked started: this one runs start-up again
    assert kinds(p) == ["startup", "shutdown", "startup"]


def test_hook_kvaware_shutdown(kit_pipeline: Callable[..., Pipeline]) -> None:
    p = kit_pipeline()
    p.stop()  # never started: nothing to shut down
    assert calls(p) == []
    with p:
        pass
    p.stop()
    assert calls(p) == [("startup", p), ("shutdown", p)]


def test_hook_kvaware_endpoints_changed(kit_pipeline: Callable[..., Pipeline]) -> None:
    p = kit_pipeline(endpoints=[{"id": "a", "models": [M]}, {"id": "b", "models": [M]}])
    a, b = p.endpoints
    p.set_endpoints([a])  # before start: nobody is told yet
    assert calls(p) == []
    p.start()
    assert calls(p)[1:] == [("endpoints_changed", ["a"], [])]  # the set at start
    calls(p).clear()
    c = Endpoint("c", models=frozenset({M}))
    p.set_endpoints([a, b, c])
    p.set_endpoints([a, b, c])  # unchanged: no call
    p.set_endpoints([Endpoint("a", models=frozenset({M}), labels={"zone": "x"}), c])
    assert calls(p) == [
        ("endpoints_changed", ["b", "c"], []),
        ("endpoints_changed", ["a"], ["b"]),  # a changed definition counts as added
    ]


def test_hook_kvaware_request_routed(kit_pipeline: Callable[..., Pipeline]) -> None:
    p = kit_pipeline(endpoints=[{"id": "a", "models": [M]}], scorers=[{"type": "kv-prefix"}])
    p.start()
    chain = Chain(3)
    request = chain.request()
    decision = p.route(request)
    calls(p).clear()
    p.routed(request, decision.endpoint, decision)
    p.routed(request, decision.endpoint)  # the router chose by itself
    assert calls(p) == [
        ("routed", request, decision.endpoint, decision),
        ("routed", request, decision.endpoint, None),
    ]
    assert request.block_keys is not None and len(request.block_keys) == 3
    # The built-in kv-engine implementation of the same hook left speculative entries.
    match = p.index.match(request.block_keys, ["a"])["a"]
    assert match.blocks_by_tier == {"speculative": 3}
    assert p.load.get("a").in_flight == 2


def test_hook_kvaware_request_finished(kit_pipeline: Callable[..., Pipeline]) -> None:
    p = kit_pipeline(endpoints=[{"id": "a", "models": [M]}])
    p.start()
    request = Chain(2).request()
    endpoint = p.route(request).endpoint
    p.routed(request, endpoint)
    assert p.load.get("a").in_flight_tokens == 32
    calls(p).clear()
    p.finished(request, endpoint, prompt_tokens=32, cached_tokens=16)
    failed = Chain(1).request()
    p.routed(failed, endpoint)
    p.finished(failed, endpoint, error="upstream reset")
    assert calls(p) == [
        ("finished", request, endpoint, 32, 16, None),
        ("routed", failed, endpoint, None),
        ("finished", failed, endpoint, None, None, "upstream reset"),
    ]
    assert p.load.get("a").in_flight == 0 and p.load.get("a").in_flight_tokens == 0
