"""The built-in plugins' components on their own (filters, scorers, pickers, the KV-engine
hooks, parameter checking), and the third-party ``session-affinity`` plugin installed from
``plugins/kvaware-session-affinity`` and enabled from YAML like any built-in."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_manager import quiet_config, require_session_plugin
from test_pipeline import Chain

from kvaware_scorer.config import load_config
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.manager import BUILTIN_PLUGINS
from kvaware_scorer.pipeline import Pipeline
from kvaware_scorer.plugins.filters import LabelSelectorFilter, ModelMatchFilter
from kvaware_scorer.plugins.load_scorers import min_max_low_is_good
from kvaware_scorer.plugins.pickers import MaxScorePicker, WeightedRandomPicker
from kvaware_scorer.plugins.prefix_scorers import ApproxHistory
from kvaware_scorer.registry import Params
from kvaware_scorer.types import Endpoint, RoutingRequest, ScoredEndpoint

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_DIR = ROOT / "plugins" / "kvaware-session-affinity"
M = "m"


@pytest.fixture(scope="module")
def builtins() -> Pipeline:
    return Pipeline(quiet_config(), load_entry_points=False)


def ranked(*totals: float) -> list[ScoredEndpoint]:
    items = [ScoredEndpoint(Endpoint(f"e{i}"), t, {}) for i, t in enumerate(totals)]
    return sorted(items, key=lambda s: -s.total)


def request() -> RoutingRequest:
    return RoutingRequest(model=M, token_ids=[1])


# ---------------------------------------------------------------------------- parameters


def builtin_types(p: Pipeline) -> list[tuple[str, str]]:
    return sorted((k, n) for (k, n), e in p.registry.types.items() if e.plugin in BUILTIN_PLUGINS)


def test_every_builtin_type_builds_with_default_params(builtins: Pipeline) -> None:
    assert len(builtin_types(builtins)) == 11
    for kind, name in builtin_types(builtins):
        component = builtins.registry.build(kind, name, builtins, {}, f"{kind}s[0]")
        assert component is not None


def test_every_builtin_type_refuses_unknown_params(builtins: Pipeline) -> None:
    for kind, name in builtin_types(builtins):
        probe = Params({}, "x")
        builtins.registry.types[(kind, name)].factory(builtins, probe)
        allowed = ", ".join(sorted(probe.asked)) or "none"
        with pytest.raises(ConfigError) as err:
            builtins.registry.build(kind, name, builtins, {"bogus_key": 1}, "here")
        assert str(err.value) == f"here.params: unknown key(s) bogus_key; allowed: {allowed}"


@pytest.mark.parametrize(
    ("section", "params", "message"),
    [
        ("scorers", {"type": "kv-prefix", "params": {"length_weight": 2}},
         r"scorers\[0\]\.params\.length_weight: must be <= 1\.0, got 2"),
        ("scorers", {"type": "kv-prefix", "params": {"length_scale_tokens": 0}},
         r"scorers\[0\]\.params\.length_scale_tokens: must be >= 1, got 0"),
        ("scorers", {"type": "approx-prefix", "params": {"capacity_per_endpoint": 0}},
         r"scorers\[0\]\.params\.capacity_per_endpoint: must be >= 1"),
        ("scorers", {"type": "approx-prefix", "params": {"max_prefix_blocks": 1.5}},
         r"scorers\[0\]\.params\.max_prefix_blocks: must be an integer, got 1\.5"),
        ("scorers", {"type": "in-flight", "params": {"by": "bytes"}},
         r"scorers\[0\]\.params\.by: 'bytes' is not allowed; allowed values: requests, tokens"),
        ("scorers", {"type": "prefill-cost", "params": {"load_scale": -1}},
         r"scorers\[0\]\.params\.load_scale: must be >= 0\.0, got -1"),
        ("scorers", {"type": "prefill-cost", "params": {"waiting_tokens": "many"}},
         r"scorers\[0\]\.params\.waiting_tokens: must be an integer, got 'many'"),
        ("filters", {"type": "health", "params": {"unhealthy_after": -1}},
         r"filters\[0\]\.params\.unhealthy_after: must be >= 0, got -1"),
        ("filters", {"type": "label-selector", "params": {"match_labels": {"zone": 1}}},
         r"filters\[0\]\.params\.match_labels: must be a mapping of strings to strings"),
        ("picker", {"type": "weighted-random", "params": {"temperature": 0}},
         r"picker\.params\.temperature: must be >= 1e-06, got 0"),
        ("picker", {"type": "max-score", "params": {"seed": "lucky"}},
         r"picker\.params\.seed: must be an integer or null, got 'lucky'"),
    ],
)  # fmt: skip
def test_builtin_params_are_checked(section: str, params: dict[str, Any], message: str) -> None:
    config = quiet_config(**{section: params if section == "picker" else [params]})
    with pytest.raises(ConfigError, match=f"^{message}"):
        Pipeline(config, load_entry_points=False)


# ---------------------------------------------------------------------------- filters


def test_model_match_filter_directly() -> None:
    endpoints = [
        Endpoint("a", models=frozenset({M})),
        Endpoint("b", models=frozenset({"base"}), adapters=frozenset({M})),
        Endpoint("c", models=frozenset({"other"})),
        Endpoint("d"),
    ]
    kept = ModelMatchFilter().filter(request(), endpoints)
    assert [e.id for e in kept] == ["a", "b", "d"]
    assert kept[0] is endpoints[0]


def test_label_selector_filter_directly() -> None:
    endpoints = [Endpoint("a", labels={"z": "1", "p": "x"}), Endpoint("b", labels={"z": "1"})]
    assert [
        e.id for e in LabelSelectorFilter({"z": "1", "p": "x"}).filter(request(), endpoints)
    ] == ["a"]
    assert LabelSelectorFilter({}).filter(request(), endpoints) == endpoints


# ---------------------------------------------------------------------------- scorers


def test_min_max_low_is_good() -> None:
    assert min_max_low_is_good({}) == {}
    assert min_max_low_is_good({"a": 5.0, "b": 5.0}) == {"a": 1.0, "b": 1.0}
    assert min_max_low_is_good({"a": 0.0, "b": 10.0, "c": 2.5}) == {"a": 1.0, "b": 0.0, "c": 0.75}


def test_approx_history_consecutive_prefix_per_endpoint() -> None:
    h = ApproxHistory(capacity_per_endpoint=100, max_prefix_blocks=100)
    h.record("a", [1, 2, 3, 4])
    h.record("b", [1, 2, 9])
    assert h.matched_blocks([1, 2, 3, 4, 5], ["a", "b", "c"]) == {"a": 4, "b": 2, "c": 0}
    assert h.matched_blocks([7, 2, 3], ["a", "b"]) == {"a": 0, "b": 0}  # prefix only
    h.forget("a")
    assert h.matched_blocks([1, 2, 3], ["a", "b"]) == {"a": 0, "b": 2}


def test_approx_history_bounds() -> None:
    h = ApproxHistory(capacity_per_endpoint=3, max_prefix_blocks=2)
    h.record("a", [1, 2, 3, 4])  # only the first two blocks are recorded
    assert h.matched_blocks([1, 2, 3], ["a"]) == {"a": 2}
    h.record("a", [5, 6])  # capacity 3: block 1 goes (least recently recorded)
    assert h.matched_blocks([1, 2], ["a"]) == {"a": 0}
    assert h.matched_blocks([5, 6], ["a"]) == {"a": 2}


def test_approx_history_many_endpoints() -> None:
    h = ApproxHistory(capacity_per_endpoint=10, max_prefix_blocks=10)
    for i in range(100):  # more endpoints than a machine word has bits
        h.record(f"e{i}", list(range(i % 5 + 1)))
    got = h.matched_blocks([0, 1, 2, 3, 4], [f"e{i}" for i in range(100)])
    assert got == {f"e{i}": i % 5 + 1 for i in range(100)}


# ---------------------------------------------------------------------------- pickers


def test_max_score_picker_takes_the_single_best() -> None:
    picker = MaxScorePicker(seed=1)
    r = ranked(0.3, 0.9, 0.1)
    assert {picker.pick(request(), r).id for _ in range(20)} == {"e1"}


def test_max_score_picker_ties_within_tolerance() -> None:
    picker = MaxScorePicker(seed=5)
    r = ranked(2.0, 2.0 - 1e-12, 1.9)
    counts = Counter(picker.pick(request(), r).id for _ in range(400))
    assert set(counts) == {"e0", "e1"} and min(counts.values()) > 100
    one, two = MaxScorePicker(seed=5), MaxScorePicker(seed=5)
    assert [one.pick(request(), r).id for _ in range(50)] == [
        two.pick(request(), r).id for _ in range(50)
    ]


def test_weighted_random_picker_handles_extreme_totals() -> None:
    picker = WeightedRandomPicker(temperature=1e-6, seed=0)
    r = ranked(1000.0, 0.0)
    assert {picker.pick(request(), r).id for _ in range(50)} == {"e0"}
    hot = WeightedRandomPicker(temperature=1e6, seed=0)
    counts = Counter(hot.pick(request(), ranked(1.0, 0.0)).id for _ in range(400))
    assert min(counts.values()) > 150


def test_pickers_are_safe_to_share_between_threads() -> None:
    picker = MaxScorePicker(seed=9)
    r = ranked(1.0, 1.0, 1.0)
    seen: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        local = [picker.pick(request(), r).id for _ in range(500)]
        with lock:
            seen.extend(local)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 2000 and set(seen) == {"e0", "e1", "e2"}


# ---------------------------------------------------------------------------- kv-engine


def test_kv_engine_names_pod_models_in_the_index() -> None:
    p = Pipeline(
        quiet_config(endpoints=[{"id": "a", "models": ["llama"]}], scorers=[{"type": "kv-prefix"}]),
        load_entry_points=False,
    )
    chain = Chain(2)
    with p:
        # Events carry no model: the pod's blocks are keyed under the model it serves.
        p.index.apply("a", [chain.event(0, 2)])
        assert p.index.match(p.index.keys(chain.tokens, "llama"), ["a"])["a"].matched_blocks == 2


def test_kv_engine_speculation_can_be_turned_off() -> None:
    p = Pipeline(
        quiet_config(index={"speculative_ttl_s": 0}, endpoints=[{"id": "a"}]),
        load_entry_points=False,
    )
    with p:
        r = Chain(2).request()
        p.routed(r, p.route(r).endpoint)
        assert p.index.stats()["speculative_keys"] == 0
        assert p.index.pods() == []


# ---------------------------------------------------------------------------- session affinity


@pytest.fixture
def session_plugin() -> Iterator[Any]:
    require_session_plugin()
    from kvaware_session_affinity import plugin

    yield plugin


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SESSION_YAML = """
kvaware:
  listener: {enabled: false}
  load: {scrape: false}
  endpoints:
    - {id: a, models: [m]}
    - {id: b, models: [m]}
  scorers:
    - type: session-affinity
      weight: 5
      params: {ttl_s: 60}
    - type: queue
      weight: 1
"""


@pytest.fixture
def sticky(tmp_path: Path, session_plugin: Any) -> Iterator[tuple[Pipeline, Any, FakeClock]]:
    """A pipeline configured from YAML with session-affinity (weight 5) and queue (1),
    where the queue prefers b; the session scorer's clock is a fake one."""
    path = tmp_path / "router.yaml"
    path.write_text(SESSION_YAML)
    pipeline = Pipeline(load_config(path))
    name, weight, scorer = pipeline.scorers[0]
    assert (name, weight) == ("session-affinity", 5.0)
    assert isinstance(scorer, session_plugin.SessionAffinityScorer)
    clock = FakeClock()
    scorer.table.clock = clock
    pipeline.load.scraped("a", {"waiting": 3.0})
    pipeline.load.scraped("b", {"waiting": 0.0})
    with pipeline:
        yield pipeline, scorer, clock


def session_request(session: str | None, header: str = "x-session-id") -> RoutingRequest:
    headers = {header: session} if session is not None else {}
    return RoutingRequest(model=M, token_ids=[1, 2, 3], headers=headers)


def send(pipeline: Pipeline, session: str | None, to: str | None = None) -> str:
    """Route (or force, with ``to``) one request of ``session`` and report it routed."""
    r = session_request(session)
    decision = pipeline.route(r)
    endpoint = (
        decision.endpoint if to is None else next(e for e in pipeline.endpoints if e.id == to)
    )
    pipeline.routed(r, endpoint, decision)
    return endpoint.id


def test_session_affinity_is_discovered_and_configured_from_yaml(
    sticky: tuple[Pipeline, Any, FakeClock],
) -> None:
    pipeline, scorer, _ = sticky
    assert pipeline.registry.types[("scorer", "session-affinity")].plugin == "session-affinity"
    assert pipeline.pm.get_plugin("session-affinity") is not None
    assert scorer.header == "x-session-id"
    assert scorer.table.ttl_s == 60.0 and scorer.table.max_sessions == 100_000


def test_session_sticks_to_the_endpoint_that_served_it(
    sticky: tuple[Pipeline, Any, FakeClock],
) -> None:
    pipeline, _, _ = sticky
    assert send(pipeline, None) == "b"  # no session: the queue decides
    assert send(pipeline, "s1") == "b"  # unknown session: the queue decides
    send(pipeline, "s2", to="a")  # the router sent s2 to a (say, a retry)
    for _ in range(5):
        decision = pipeline.route(session_request("s2"))
        assert decision.endpoint.id == "a"  # 5 x 1.0 outweighs the queue's 1 x 1.0
        assert {s.endpoint.id: s.scores["session-affinity"] for s in decision.ranked} == {
            "a": 1.0,
            "b": 0.0,
        }
    assert pipeline.route(session_request("s1")).endpoint.id == "b"


def test_session_header_is_case_insensitive(sticky: tuple[Pipeline, Any, FakeClock]) -> None:
    pipeline, _, _ = sticky
    send(pipeline, "s9", to="a")
    assert pipeline.route(session_request("s9", header="X-Session-ID")).endpoint.id == "a"
    assert pipeline.route(session_request("s9", header="x-other")).endpoint.id == "b"


def test_session_expires_after_ttl(sticky: tuple[Pipeline, Any, FakeClock]) -> None:
    pipeline, _, clock = sticky
    send(pipeline, "s1", to="a")
    clock.now += 59.0
    assert pipeline.route(session_request("s1")).endpoint.id == "a"
    send(pipeline, "s1", to="a")  # every routed request renews the session
    clock.now += 59.0
    assert pipeline.route(session_request("s1")).endpoint.id == "a"
    clock.now += 1.0  # 60 s after the last routed request
    assert pipeline.route(session_request("s1")).endpoint.id == "b"


def test_session_forgotten_when_its_endpoint_leaves(
    sticky: tuple[Pipeline, Any, FakeClock],
) -> None:
    pipeline, scorer, _ = sticky
    send(pipeline, "s1", to="a")
    send(pipeline, "s2", to="b")
    a, b = pipeline.endpoints
    pipeline.set_endpoints([b])
    assert len(scorer.table) == 1 and scorer.table.lookup("s1") is None
    pipeline.set_endpoints([a, b])
    decision = pipeline.route(session_request("s1"))
    assert {s.endpoint.id: s.scores["session-affinity"] for s in decision.ranked} == {
        "a": 0.0,
        "b": 0.0,
    }


def test_session_table_is_bounded_lru(session_plugin: Any) -> None:
    clock = FakeClock()
    table = session_plugin.SessionTable(ttl_s=60.0, max_sessions=2, clock=clock)
    table.record("s1", "a")
    table.record("s2", "b")
    table.record("s1", "a")  # s1 is now the most recently routed
    table.record("s3", "c")  # over the bound: s2 goes
    assert len(table) == 2
    assert (table.lookup("s1"), table.lookup("s2"), table.lookup("s3")) == ("a", None, "c")


def test_session_table_purges_expired_entries_on_write(session_plugin: Any) -> None:
    clock = FakeClock()
    table = session_plugin.SessionTable(ttl_s=10.0, max_sessions=1000, clock=clock)
    for i in range(50):
        table.record(f"s{i}", "a")
    assert len(table) == 50
    clock.now += 10.0
    table.record("fresh", "b")
    assert len(table) == 1 and table.lookup("fresh") == "b"


def test_session_table_bound_from_yaml(session_plugin: Any) -> None:
    p = Pipeline(
        quiet_config(
            endpoints=[{"id": "a"}, {"id": "b"}],
            scorers=[{"type": "session-affinity", "params": {"max_sessions": 3}}],
        )
    )
    scorer = p.scorers[0][2]
    for i in range(10):
        send(p, f"s{i}", to="a")
    assert len(scorer.table) == 3
    assert [scorer.table.lookup(f"s{i}") for i in (6, 7, 8, 9)] == [None, "a", "a", "a"]


def test_session_custom_header(session_plugin: Any) -> None:
    p = Pipeline(
        quiet_config(
            endpoints=[{"id": "a"}, {"id": "b"}],
            scorers=[{"type": "session-affinity", "params": {"header": "X-Conversation"}}],
            picker={"type": "max-score", "params": {"seed": 4}},
        )
    )
    r = RoutingRequest(model=M, token_ids=[1], headers={"x-conversation": "c1"})
    first = p.route(r)
    p.routed(r, first.endpoint, first)
    again = RoutingRequest(model=M, token_ids=[1], headers={"X-Conversation": "c1"})
    assert all(p.route(again).endpoint == first.endpoint for _ in range(20))
    ignored = RoutingRequest(model=M, token_ids=[1], headers={"x-session-id": "c1"})
    assert {s.scores["session-affinity"] for s in p.route(ignored).ranked} == {0.0}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"ttl": 60},
         r"^scorers\[0\]\.params: unknown key\(s\) ttl; allowed: header, max_sessions, ttl_s$"),
        ({"ttl_s": 0}, r"^scorers\[0\]\.params\.ttl_s: must be >= 0\.001, got 0$"),
        ({"ttl_s": "1m"}, r"^scorers\[0\]\.params\.ttl_s: must be a number, got '1m'$"),
        ({"max_sessions": 0}, r"^scorers\[0\]\.params\.max_sessions: must be >= 1, got 0$"),
        ({"header": " "}, r"^scorers\[0\]\.params\.header: must be a header name, got ' '$"),
        ({"header": 5}, r"^scorers\[0\]\.params\.header: must be a string, got 5$"),
    ],
)  # fmt: skip
def test_session_params_are_checked(
    session_plugin: Any, params: dict[str, Any], message: str
) -> None:
    config = quiet_config(scorers=[{"type": "session-affinity", "params": params}])
    with pytest.raises(ConfigError, match=message):
        Pipeline(config)


def test_session_scorer_is_thread_safe(session_plugin: Any) -> None:
    table = session_plugin.SessionTable(ttl_s=1e9, max_sessions=64)
    scorer = session_plugin.SessionAffinityScorer("x-session-id", table)
    endpoints = [Endpoint("a"), Endpoint("b")]
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(2000):
                r = session_request(f"s{(n * 7 + i) % 200}")
                scorer.score(r, endpoints)
                scorer.observe(r, "a" if i % 2 else "b")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(table) == 64


def test_session_plugin_readme_documents_every_param(session_plugin: Any) -> None:
    probe = Params({}, "x")
    pipeline = Pipeline(quiet_config())
    session_plugin.build_scorer(pipeline, probe)
    readme = (PLUGIN_DIR / "README.md").read_text()
    for key, default in probe.asked.items():
        shown = f'"{default}"' if isinstance(default, str) else repr(default)
        assert f"| `{key}` | `{shown}` |" in readme, key
    assert math.isclose(probe.asked["ttl_s"], 300.0)


def test_session_plugin_distribution_is_separate() -> None:
    # The plugin ships as its own distribution; the main wheel holds only kvaware_scorer.
    import tomllib

    main = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert main["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["kvaware_scorer"]
    plugin = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())
    assert plugin["project"]["name"] == "kvaware-session-affinity"
    assert plugin["project"]["entry-points"]["kvaware_scorer"] == {
        "session-affinity": "kvaware_session_affinity.plugin"
    }
    assert any(d.startswith("kvaware-scorer") for d in plugin["project"]["dependencies"])
    assert plugin["build-system"]["build-backend"] == "hatchling.build"
    assert (PLUGIN_DIR / "kvaware_session_affinity" / "py.typed").is_file()
