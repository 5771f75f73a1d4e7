"""The YAML configuration: defaults, the ``kvaware:`` wrapper, files, strict errors naming
the YAML path and the allowed values, environment substitution; docs/configuration.md
covering every key and every built-in component parameter; the example config files."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from test_manager import quiet_config
from test_pipeline import Chain, live_threads, wait_for

from kvaware_scorer.config import (
    EndpointConfig,
    HashCheckConfig,
    KVEventsSource,
    PipelineConfig,
    ScorerConfig,
    TokenizerConfig,
    config_keys,
    load_config,
)
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.manager import BUILTIN_PLUGINS
from kvaware_scorer.pipeline import Pipeline
from kvaware_scorer.publisher import EventPublisher
from kvaware_scorer.registry import Params

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DOC = ROOT / "docs" / "configuration.md"
EXAMPLES = ROOT / "examples" / "configs"
TOP_KEYS = (
    "plugins, index, listener, endpoints, tokenizers, filters, scorers, picker, fallback, load"
)


def error_of(source: Any) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(source)
    return str(err.value)


# ---------------------------------------------------------------------------- defaults


def test_defaults() -> None:
    config = load_config(None)
    assert config == PipelineConfig() == load_config({})
    assert config.plugins.allow is None and config.plugins.block == []
    assert config.index.block_size == 16 and config.index.hash_seed == ""
    assert config.index.tier_weights == {"gpu": 1.0, "cpu": 0.8}
    assert config.index.speculative_ttl_s == 2.0
    assert config.listener.enabled is True and config.listener.bind == []
    assert config.listener.topic_filter == "kv@" and config.listener.hash_check is None
    assert config.endpoints == [] and config.tokenizers == []
    assert [f.type for f in config.filters] == ["model-match", "health"]
    assert config.scorers == [ScorerConfig("prefill-cost", 1.0, {})]
    assert (config.picker.type, config.picker.params) == ("max-score", {})
    assert config.fallback == "error"
    assert (config.load.scrape, config.load.scrape_interval_s) == (True, 1.0)


def test_defaults_are_not_shared_between_configs() -> None:
    one, two = load_config({}), load_config({})
    assert one.filters is not two.filters and one.index.tier_weights is not two.index.tier_weights


def test_nested_defaults_fill_in() -> None:
    config = load_config(
        {
            "endpoints": [{"id": "a", "kv_events": {"endpoint": "tcp://h:1"}}],
            "listener": {"hash_check": {}},
            "tokenizers": [{"model": "m", "source": "/t"}],
            "scorers": [{"type": "queue"}],
        }
    )
    assert config.endpoints == [
        EndpointConfig("a", "", [], [], {}, KVEventsSource("tcp://h:1", None, 1, ""))
    ]
    assert config.listener.hash_check == HashCheckConfig("sha256", None, 16)
    assert config.tokenizers == [TokenizerConfig("m", "/t", None, [])]
    assert config.scorers == [ScorerConfig("queue", 1.0, {})]


def test_values_are_converted() -> None:
    config = load_config(
        {
            "scorers": [{"type": "kv-prefix", "weight": 2, "params": {"length_weight": 0.5}}],
            "index": {"tier_weights": {"gpu": 1, "disk": 0.25}, "speculative_ttl_s": 0},
            "listener": {"bind_replay_port": 5558, "hash_check": {"pythonhashseed": "0"}},
        }
    )
    assert config.scorers[0].weight == 2.0 and isinstance(config.scorers[0].weight, float)
    assert config.scorers[0].params == {"length_weight": 0.5}
    assert config.index.tier_weights == {"gpu": 1.0, "disk": 0.25}
    assert isinstance(config.index.speculative_ttl_s, float)
    assert config.listener.bind_replay_port == 5558
    assert config.listener.hash_check is not None
    assert config.listener.hash_check.pythonhashseed == "0"


# ---------------------------------------------------------------------------- wrapper, files


def test_kvaware_wrapper_is_unwrapped_and_other_keys_ignored() -> None:
    config = load_config(
        {"kvaware": {"index": {"block_size": 32}}, "router": {"port": 8080}, "logging": None}
    )
    assert config.index.block_size == 32
    assert load_config({"kvaware": None}) == PipelineConfig()


def test_errors_inside_the_wrapper_name_the_full_path() -> None:
    assert error_of({"kvaware": {"scorers": [{"type": "queue", "weight": -2}]}}) == (
        "kvaware.scorers[0].weight: -2 is out of range; allowed: [0.0, inf]"
    )
    assert error_of({"kvaware": {"endpoints": [{"id": "a", "models": ["m", 3]}]}}) == (
        "kvaware.endpoints[0].models[1]: must be a string, got 3 (int)"
    )
    assert error_of({"kvaware": {"lisener": {}}}) == (
        f"kvaware: unknown key(s) lisener; allowed: {TOP_KEYS}"
    )
    assert error_of({"kvaware": [1, 2]}) == "kvaware: must be a mapping, got [1, 2] (list)"


def test_yaml_file_path(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(
        "kvaware:\n"
        "  index: {block_size: 64}\n"
        "  scorers:\n"
        "    - {type: kv-prefix, weight: 2}\n"
        "    - type: queue\n"
        "router:\n"
        "  port: 8080\n"
    )
    for source in (path, str(path)):
        config = load_config(source)
        assert config.index.block_size == 64
        assert [(s.type, s.weight) for s in config.scorers] == [("kv-prefix", 2.0), ("queue", 1.0)]
    plain = tmp_path / "plain.yaml"
    plain.write_text("fallback: unfiltered\n")
    assert load_config(plain).fallback == "unfiltered"
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing configured\n")
    assert load_config(empty) == PipelineConfig()


def test_yaml_file_errors_name_the_yaml_path(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("kvaware:\n  endpoints:\n    - id: a\n      model: [m]\n")
    assert error_of(path) == (
        "kvaware.endpoints[0]: unknown key(s) model; "
        "allowed: id, url, models, adapters, labels, kv_events"
    )


def test_invalid_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("kvaware:\n  index: {block_size: 16\n  scorers: [\n")
    message = error_of(path)
    assert message.startswith(f"{path}: not valid YAML: ")
    assert "line" in message  # the parser's position comes along


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert error_of(path) == f"cannot read config file {path}: No such file or directory"
    assert error_of(tmp_path).startswith(f"cannot read config file {tmp_path}: ")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert error_of(path) == "(top level): must be a mapping, got ['a', 'b'] (list)"
    assert error_of(["x"]) == "(top level): must be a mapping, got ['x'] (list)"


# ---------------------------------------------------------------------------- strict errors


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"scorer": []}, f"(top level): unknown key(s) scorer; allowed: {TOP_KEYS}"),
        ({"plugins": {"alow": []}}, "plugins: unknown key(s) alow; allowed: allow, block"),
        (
            {"index": {"blok_size": 8, "zz": 1}},
            "index: unknown key(s) blok_size, zz; allowed: block_size, hash_seed, tier_weights, "
            "other_tier_weight, pod_capacity, max_entries, speculative_ttl_s, max_orphan_blocks",
        ),
        (
            {"listener": {"bind_port": 1}},
            "listener: unknown key(s) bind_port; allowed: enabled, bind, topic_filter, "
            "bind_replay_port, replay, replay_timeout_s, max_message_bytes, max_queued_messages, "
            "unknown_pods, hash_check",
        ),
        (
            {"listener": {"hash_check": {"algo": "sha256"}}},
            "listener.hash_check: unknown key(s) algo; allowed: hash_algo, pythonhashseed, "
            "block_size",
        ),
        (
            {"endpoints": [{"id": "a"}, {"id": "b", "adapter": ["x"]}]},
            "endpoints[1]: unknown key(s) adapter; "
            "allowed: id, url, models, adapters, labels, kv_events",
        ),
        (
            {"endpoints": [{"id": "a", "kv_events": {"endpoint": "tcp://h:1", "rank": 2}}]},
            "endpoints[0].kv_events: unknown key(s) rank; "
            "allowed: endpoint, replay_endpoint, dp_size, topic",
        ),
        (
            {"tokenizers": [{"model": "m", "source": "/x", "template": "t"}]},
            "tokenizers[0]: unknown key(s) template; "
            "allowed: model, source, chat_template, adapters",
        ),
        (
            {"filters": [{"type": "health", "param": {}}]},
            "filters[0]: unknown key(s) param; allowed: type, params",
        ),
        (
            {"scorers": [{"type": "queue", "wieght": 2}]},
            "scorers[0]: unknown key(s) wieght; allowed: type, weight, params",
        ),
        (
            {"picker": {"type": "max-score", "seed": 1}},
            "picker: unknown key(s) seed; allowed: type, params",
        ),
        (
            {"load": {"interval": 1}},
            "load: unknown key(s) interval; allowed: scrape, scrape_interval_s, scrape_timeout_s",
        ),
    ],
)
def test_unknown_keys_at_every_level(config: dict[str, Any], message: str) -> None:
    assert error_of(config) == message


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"index": "big"}, "index: must be a mapping, got 'big' (str)"),
        ({"index": {"block_size": "sixteen"}}, "index.block_size: must be a number, got 'sixteen'"),
        ({"index": {"block_size": 1.5}}, "index.block_size: must be an integer, got 1.5 (float)"),
        ({"index": {"block_size": True}}, "index.block_size: must be an integer, got True (bool)"),
        ({"index": {"hash_seed": 5}}, "index.hash_seed: must be a string, got 5 (int)"),
        (
            {"index": {"tier_weights": [1.0]}},
            "index.tier_weights: must be a mapping, got [1.0] (list)",
        ),
        (
            {"index": {"tier_weights": {"gpu": "high"}}},
            "index.tier_weights.gpu: must be a number, got 'high'",
        ),
        (
            {"listener": {"enabled": "yes"}},
            "listener.enabled: must be true or false, got 'yes' (str)",
        ),
        (
            {"listener": {"bind": "tcp://*:5557"}},
            "listener.bind: must be a list, got 'tcp://*:5557' (str)",
        ),
        ({"listener": {"bind": [5557]}}, "listener.bind[0]: must be a string, got 5557 (int)"),
        ({"plugins": {"allow": "x"}}, "plugins.allow: must be a list, got 'x' (str)"),
        ({"endpoints": {"a": {}}}, "endpoints: must be a list, got {'a': {}} (dict)"),
        ({"endpoints": ["a"]}, "endpoints[0]: must be a mapping, got 'a' (str)"),
        ({"endpoints": [{"id": 7}]}, "endpoints[0].id: must be a string, got 7 (int)"),
        (
            {"endpoints": [{"id": "a", "labels": {"zone": 1}}]},
            "endpoints[0].labels.zone: must be a string, got 1 (int)",
        ),
        (
            {"endpoints": [{"id": "a", "kv_events": "tcp://h:1"}]},
            "endpoints[0].kv_events: must be a mapping, got 'tcp://h:1' (str)",
        ),
        (
            {"scorers": [{"type": "queue", "weight": True}]},
            "scorers[0].weight: must be a number, got True (bool)",
        ),
        (
            {"scorers": [{"type": "queue", "params": [1]}]},
            "scorers[0].params: must be a mapping, got [1] (list)",
        ),
        ({"picker": "max-score"}, "picker: must be a mapping, got 'max-score' (str)"),
        ({"fallback": None}, "fallback: must be a string, got None (NoneType)"),
        ({"load": {"scrape": 1}}, "load.scrape: must be true or false, got 1 (int)"),
    ],
)
def test_wrong_types_name_the_path(config: dict[str, Any], message: str) -> None:
    assert error_of(config) == message


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"index": {"block_size": 0}}, "index.block_size: 0 is out of range; allowed: [1, inf]"),
        (
            {"index": {"other_tier_weight": 1.5}},
            "index.other_tier_weight: 1.5 is out of range; allowed: [0.0, 1.0]",
        ),
        (
            {"index": {"speculative_ttl_s": -1}},
            "index.speculative_ttl_s: -1 is out of range; allowed: [0.0, inf]",
        ),
        (
            {"index": {"max_orphan_blocks": -1}},
            "index.max_orphan_blocks: -1 is out of range; allowed: [0, inf]",
        ),
        (
            {"listener": {"bind_replay_port": 70000}},
            "listener.bind_replay_port: 70000 is out of range; allowed: [1, 65535]",
        ),
        (
            {"listener": {"replay_timeout_s": 0}},
            "listener.replay_timeout_s: 0 is out of range; allowed: [0.01, inf]",
        ),
        (
            {"listener": {"max_message_bytes": 100}},
            "listener.max_message_bytes: 100 is out of range; allowed: [1024, inf]",
        ),
        (
            {"listener": {"hash_check": {"block_size": 0}}},
            "listener.hash_check.block_size: 0 is out of range; allowed: [1, inf]",
        ),
        (
            {"endpoints": [{"id": "a", "kv_events": {"endpoint": "e", "dp_size": 0}}]},
            "endpoints[0].kv_events.dp_size: 0 is out of range; allowed: [1, inf]",
        ),
        (
            {"scorers": [{"type": "queue", "weight": -1}]},
            "scorers[0].weight: -1 is out of range; allowed: [0.0, inf]",
        ),
        (
            {"load": {"scrape_interval_s": 0.01}},
            "load.scrape_interval_s: 0.01 is out of range; allowed: [0.05, inf]",
        ),
        (
            {"load": {"scrape_timeout_s": 0}},
            "load.scrape_timeout_s: 0 is out of range; allowed: [0.01, inf]",
        ),
        (
            {"index": {"tier_weights": {"cpu": 1.5}}},
            "index.tier_weights.cpu: 1.5 is out of range; allowed: [0.0, 1.0]",
        ),
    ],
)
def test_out_of_range_values_name_the_bounds(config: dict[str, Any], message: str) -> None:
    assert error_of(config) == message


def test_range_bounds_are_inclusive() -> None:
    config = load_config(
        {
            "index": {"block_size": 1, "other_tier_weight": 1.0, "tier_weights": {"gpu": 0}},
            "listener": {"bind_replay_port": 65535},
        }
    )
    assert config.index.block_size == 1 and config.listener.bind_replay_port == 65535


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"fallback": "retry"},
            "fallback: 'retry' is not allowed; allowed values: error, unfiltered",
        ),
        (
            {"listener": {"hash_check": {"hash_algo": "md5"}}},
            "listener.hash_check.hash_algo: 'md5' is not allowed; "
            "allowed values: sha256, sha256_cbor, xxhash, xxhash_cbor",
        ),
        (
            {"listener": {"unknown_pods": "drop"}},
            "listener.unknown_pods: 'drop' is not allowed; allowed values: auto, accept, reject",
        ),
    ],
)
def test_bad_choices_list_the_allowed_values(config: dict[str, Any], message: str) -> None:
    assert error_of(config) == message


def test_every_hash_algo_is_accepted() -> None:
    for algo in ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor"):
        hc = load_config({"listener": {"hash_check": {"hash_algo": algo}}}).listener.hash_check
        assert hc is not None and hc.hash_algo == algo


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"endpoints": [{"url": "http://x"}]},
            "endpoints[0].id: required (the endpoint id (the pod name in KV-event topics))",
        ),
        ({"endpoints": [{"id": "a"}, {}]}, "endpoints[1].id: required"),
        (
            {"endpoints": [{"id": "a", "kv_events": {}}]},
            "endpoints[0].kv_events.endpoint: required",
        ),
        (
            {"tokenizers": [{"model": "m"}]},
            "tokenizers[0].source: required "
            "(local directory, or a hub name already in the local HF cache)",
        ),
        ({"tokenizers": [{"source": "/t"}]}, "tokenizers[0].model: required"),
        ({"filters": [{"params": {}}]}, "filters[0].type: required"),
        ({"scorers": [{"weight": 2}]}, "scorers[0].type: required"),
        ({"picker": {"params": {"seed": 1}}}, "picker.type: required"),
    ],
)
def test_missing_required_keys(config: dict[str, Any], message: str) -> None:
    assert error_of(config).startswith(message)


def test_unknown_component_type_lists_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as err:
        Pipeline(quiet_config(scorers=[{"type": "kv-prefx"}]), load_entry_points=False)
    assert str(err.value) == (
        "scorers[0].type: unknown scorer 'kv-prefx'; allowed values: approx-prefix, in-flight, "
        "kv-prefix, kv-usage, prefill-cost, queue"
    )


def test_unknown_component_params_list_the_accepted_ones() -> None:
    config = quiet_config(scorers=[{"type": "kv-prefix", "params": {"lenght_weight": 1}}])
    with pytest.raises(ConfigError) as err:
        Pipeline(config, load_entry_points=False)
    assert str(err.value) == (
        "scorers[0].params: unknown key(s) lenght_weight; allowed: length_scale_tokens, "
        "length_weight"
    )


# ---------------------------------------------------------------------------- environment


def test_env_substitution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KV_SEED", "fleet-7")
    monkeypatch.setenv("KV_HOST", "10.1.2.3")
    monkeypatch.setenv("KV_BLOCK", "32")
    monkeypatch.setenv("KV_WEIGHT", "2.5")
    monkeypatch.setenv("KV_SCALE", "4096")
    config = load_config(
        {
            "index": {"hash_seed": "${KV_SEED}", "block_size": "${KV_BLOCK}"},
            "listener": {"bind": ["tcp://${KV_HOST}:5557"]},
            "endpoints": [
                {
                    "id": "${KV_HOST}:8000",
                    "url": "http://${KV_HOST}:8000",
                    "labels": {"seed": "${KV_SEED}"},
                }
            ],
            "scorers": [
                {
                    "type": "kv-prefix",
                    "weight": "${KV_WEIGHT}",
                    "params": {"note": "${KV_SEED}/${KV_HOST}", "n": 3},
                }
            ],
        }
    )
    assert config.index.hash_seed == "fleet-7"
    assert config.index.block_size == 32
    assert config.listener.bind == ["tcp://10.1.2.3:5557"]
    assert config.endpoints[0].id == "10.1.2.3:8000"
    assert config.endpoints[0].url == "http://10.1.2.3:8000"
    assert config.endpoints[0].labels == {"seed": "fleet-7"}
    assert config.scorers[0].weight == 2.5
    assert config.scorers[0].params == {"note": "fleet-7/10.1.2.3", "n": 3}


def test_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KV_UNSET", raising=False)
    monkeypatch.setenv("KV_SET", "given")
    monkeypatch.setenv("KV_EMPTY", "")
    config = load_config(
        {
            "index": {"hash_seed": "${KV_UNSET:-fallback}", "block_size": "${KV_UNSET:-64}"},
            "listener": {
                "bind": ["${KV_SET:-unused}", "${KV_UNSET:-}x", "${KV_EMPTY:-d}"],
                "topic_filter": "${KV_UNSET:-kv@pods}",
            },
        }
    )
    assert config.index.hash_seed == "fallback"
    assert config.index.block_size == 64
    assert config.listener.bind == ["given", "x", "d"]  # set-but-empty takes the default, as in sh
    assert config.listener.topic_filter == "kv@pods"


def test_env_missing_variable_names_the_path_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KV_NOT_SET", raising=False)
    assert error_of({"kvaware": {"endpoints": [{"id": "a", "url": "http://${KV_NOT_SET}"}]}}) == (
        "kvaware.endpoints[0].url: environment variable KV_NOT_SET is not set; "
        "set it or write ${KV_NOT_SET:-default}"
    )
    assert error_of({"index": {"block_size": "${KV_NOT_SET}"}}).startswith(
        "index.block_size: environment variable KV_NOT_SET is not set"
    )
    assert error_of({"scorers": [{"type": "q", "params": {"p": "${KV_NOT_SET}"}}]}).startswith(
        "scorers[0].params.p: environment variable KV_NOT_SET is not set"
    )


def test_env_value_must_still_fit_the_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KV_BAD", "lots")
    monkeypatch.setenv("KV_ZERO", "0")
    assert error_of({"index": {"block_size": "${KV_BAD}"}}) == (
        "index.block_size: must be a number, got 'lots'"
    )
    assert error_of({"index": {"block_size": "${KV_ZERO}"}}) == (
        "index.block_size: 0 is out of range; allowed: [1, inf]"
    )
    monkeypatch.setenv("KV_ALGO", "md5")
    assert error_of({"listener": {"hash_check": {"hash_algo": "${KV_ALGO}"}}}).startswith(
        "listener.hash_check.hash_algo: 'md5' is not allowed; allowed values: sha256"
    )


def test_env_substitution_in_a_yaml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KV_POD_URL", "http://10.0.0.9:8000")
    path = tmp_path / "router.yaml"
    path.write_text("endpoints:\n  - id: pod-9\n    url: ${KV_POD_URL}\n")
    assert load_config(path).endpoints[0].url == "http://10.0.0.9:8000"


def test_env_substitution_in_nested_params(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KV_ZONE", "eu-1")
    config = load_config(
        {
            "filters": [
                {"type": "label-selector", "params": {"match_labels": {"zone": "${KV_ZONE}"}}}
            ]
        }
    )
    assert config.filters[0].params == {"match_labels": {"zone": "eu-1"}}


# ---------------------------------------------------------------------------- reference doc


def doc_text() -> str:
    return CONFIG_DOC.read_text()


def render(value: Any) -> str | None:
    """A default as docs/configuration.md shows it, or None when the doc describes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict) and all(isinstance(v, (int, float, str)) for v in value.values()):
        return "{" + ", ".join(f"{k}: {render(v)}" for k, v in value.items()) + "}"
    if value == []:
        return "[]"
    return None


def required_paths(tp: Any = PipelineConfig, prefix: str = "") -> set[str]:
    import typing

    out: set[str] = set()
    hints = typing.get_type_hints(tp)
    for f in dataclasses.fields(tp):
        path = f"{prefix}.{f.name}" if prefix else f.name
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            out.add(path)
        inner = hints[f.name]
        args = [a for a in typing.get_args(inner) if a is not type(None)]
        if typing.get_origin(inner) is list and args and dataclasses.is_dataclass(args[0]):
            out |= required_paths(args[0], path + "[]")
        elif dataclasses.is_dataclass(inner):
            out |= required_paths(inner, path)
        elif args and dataclasses.is_dataclass(args[0]) and typing.get_origin(inner) is not dict:
            out |= required_paths(args[0], path)
    return out


def table_rows(text: str) -> dict[str, list[str]]:
    """First cell (a `code` name) -> the row's cells, for every table row in ``text``."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^\| `([^`]+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [c.strip() for c in match.group(2).split("|")]
    return rows


def keys_section() -> str:
    text = doc_text()
    return text[text.index("## Keys") : text.index("## Components")]


@pytest.mark.parametrize("key", [k for k, _, _ in config_keys()])
def test_every_config_key_is_documented_with_its_default(key: str) -> None:
    defaults = {k: d for k, d, _ in config_keys()}
    rows = table_rows(keys_section())
    assert key in rows, f"docs/configuration.md has no row for `{key}`"
    default_cell, meaning = rows[key][0], rows[key][1]
    assert len(meaning) > 10, f"`{key}` needs a meaning"
    if key in required_paths():
        assert default_cell == "`required`", key
        return
    shown = render(defaults[key])
    if shown is not None:
        assert default_cell == f"`{shown}`", f"`{key}`: default should read `{shown}`"
    elif dataclasses.is_dataclass(defaults[key]) and not isinstance(defaults[key], list):
        assert default_cell.startswith(("(section)", "`{type:")), key


def test_documented_keys_all_exist() -> None:
    assert set(table_rows(keys_section())) == {k for k, _, _ in config_keys()}


def builtin_component_params() -> list[tuple[str, str, dict[str, Any]]]:
    """(kind, type, {param: default}) for every built-in type, from ``Params.asked``."""
    pipeline = Pipeline(quiet_config(), load_entry_points=False)
    out = []
    for (kind, name), entry in sorted(pipeline.registry.types.items()):
        assert entry.plugin in BUILTIN_PLUGINS
        params = Params({}, f"{kind}.params")
        entry.factory(pipeline, params)
        out.append((kind, name, dict(params.asked)))
    return out


def component_section(kind: str, name: str) -> str:
    text = doc_text()
    heading = f"#### `{name}` ({kind})"
    assert heading in text, f"docs/configuration.md has no '{heading}' section"
    start = text.index(heading) + len(heading)
    end = min((i for i in (text.find("\n#", start),) if i >= 0), default=len(text))
    return text[start:end]


@pytest.mark.parametrize(
    ("kind", "name", "params"),
    builtin_component_params(),
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_every_builtin_component_param_is_documented(
    kind: str, name: str, params: dict[str, Any]
) -> None:
    section = component_section(kind, name)
    rows = table_rows(section)
    assert set(rows) == set(params), f"{name}: documented {sorted(rows)}, asked {sorted(params)}"
    for param, default in params.items():
        shown = render(default)
        assert rows[param][0] == f"`{shown}`", f"{name}.{param}: default should read `{shown}`"
        assert len(rows[param][1]) > 10, f"{name}.{param} needs a meaning"
    if not params:
        assert "No parameters." in section


def test_the_components_documented_are_the_builtin_ones() -> None:
    documented = set(
        re.findall(r"^#### `([a-z0-9-]+)` \((filter|scorer|picker)\)$", doc_text(), re.M)
    )
    assert documented == {(name, kind) for kind, name, _ in builtin_component_params()}


def doc_example() -> str:
    text = doc_text()
    start = text.index("## Complete example")
    block = re.search(r"```yaml\n(.*?)```", text[start:], re.S)
    assert block is not None
    return block.group(1)


def test_the_complete_example_loads_and_builds(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(doc_example())
    config = load_config(path)
    covered = {k.split(".")[0].split("[")[0] for k, _, _ in config_keys()}
    assert covered <= set(_example_top_keys()), "the complete example must show every section"
    assert [s.type for s in config.scorers] == ["kv-prefix", "kv-usage", "queue"]
    assert config.listener.bind == ["tcp://*:5557"]  # the ${...:-default}
    assert config.endpoints[1].kv_events is not None
    pipeline = Pipeline(config)  # nothing binds until start()
    assert pipeline.listener is not None and not pipeline.listener.running


def _example_top_keys() -> list[str]:
    import yaml

    loaded = yaml.safe_load(doc_example())
    return list(loaded["kvaware"])


# ---------------------------------------------------------------------------- examples


def _local_run(config: PipelineConfig) -> PipelineConfig:
    """The example with scraping off (its URLs are not ours to call)."""
    return dataclasses.replace(config, load=dataclasses.replace(config.load, scrape=False))


def test_example_precise_plus_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVAWARE_EVENTS_BIND", "tcp://127.0.0.1:0")
    config = load_config(EXAMPLES / "precise-plus-load.yaml")
    assert [(s.type, s.weight) for s in config.scorers] == [
        ("kv-prefix", 2.0),
        ("kv-usage", 1.0),
        ("queue", 1.0),
    ]
    assert config.picker.type == "max-score"
    before = live_threads()
    pipeline = Pipeline(_local_run(config))
    pipeline.start()
    pub = None
    try:
        assert pipeline.listener is not None
        pod = "10.0.0.6:8000"
        pub = EventPublisher(
            pipeline.listener.bound_endpoints[0],
            topic=f"kv@{pod}@meta-llama/Llama-3.1-8B-Instruct",
        )
        pub.start()
        assert pub.wait_subscribed()
        chain = Chain(4)
        pub.publish(chain.batch(0, 4))
        wait_for(lambda: pipeline.index.pods() == [pod], "the pod's events")
        decision = pipeline.route(chain.request(model="meta-llama/Llama-3.1-8B-Instruct"))
        assert decision.endpoint.id == pod
        assert {s.endpoint.id: s.total for s in decision.ranked}[pod] == 4.0  # 2 x 1 + 1 + 1
    finally:
        if pub is not None:
            pub.stop()
        pipeline.stop()
    wait_for(lambda: not (live_threads() - before), "threads to end")


def test_example_prefill_cost() -> None:
    config = load_config(EXAMPLES / "prefill-cost.yaml")
    assert [(s.type, s.params) for s in config.scorers] == [
        (
            "prefill-cost",
            {"prefill_scale": 1.0, "load_scale": 1.0, "decode_tokens": 16, "waiting_tokens": 512},
        )
    ]
    assert all(e.kv_events is not None for e in config.endpoints)
    before = live_threads()
    # Stand-ins for the pods' publishers on 127.0.0.1; the example's addresses swapped for them.
    pubs = {
        e.id: EventPublisher("tcp://127.0.0.1:0", bind=True, replay_endpoint="tcp://127.0.0.1:0")
        for e in config.endpoints
    }
    for pub in pubs.values():
        pub.start()
    endpoints = [
        dataclasses.replace(
            e,
            kv_events=dataclasses.replace(
                e.kv_events,
                endpoint=pubs[e.id].endpoint,
                replay_endpoint=pubs[e.id].replay_endpoint,
            ),
        )
        for e in config.endpoints
        if e.kv_events is not None
    ]
    pipeline = Pipeline(dataclasses.replace(_local_run(config), endpoints=endpoints))
    pipeline.start()
    try:
        assert all(pub.wait_subscribed() for pub in pubs.values())
        chain = Chain(8)
        pubs["pod-b"].publish(chain.batch(0, 8))
        wait_for(lambda: pipeline.index.pods() == ["pod-b"], "pod-b's events")
        request = chain.request(model="Qwen/Qwen3-8B")
        decision = pipeline.route(request)
        assert decision.endpoint.id == "pod-b"
        assert decision.predicted_cached_tokens == 128
        pipeline.routed(request, decision.endpoint, decision)
        # pod-b: 16 for the request decoding + 512 for one scraped waiting request > 128.
        pipeline.load.scraped("pod-b", {"waiting": 1.0})
        assert pipeline.route(chain.request(model="Qwen/Qwen3-8B")).endpoint.id == "pod-a"
    finally:
        pipeline.stop()
        for pub in pubs.values():
            pub.stop()
    wait_for(lambda: not (live_threads() - before), "threads to end")


def test_every_example_config_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == [
        "precise-plus-load.yaml",
        "prefill-cost.yaml",
    ]
