"""The virtual-time fleet, the policies and the comparison: small, seeded, deterministic."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest

from kvaware_scorer.cli import main
from kvaware_scorer.errors import ConfigError
from kvaware_scorer.sim.compare import (
    Comparison,
    oracle_hit_rate,
    run_comparison,
    scale_engine,
    write_outputs,
)
from kvaware_scorer.sim.engine import SimRequest
from kvaware_scorer.sim.fleet import VirtualFleet
from kvaware_scorer.sim.policies import BUILTIN_POLICIES, make_policy
from kvaware_scorer.sim.profiles import profile
from kvaware_scorer.sim.workloads import RequestStream, workload

SMALL = workload("shared-prefix", num_groups=80, prompts_per_group=5, scale=0.05)
ENGINE = scale_engine(profile("qwen3-32b-2xh100"), 0.05)


def _run(policy_name: str, qps: float = 20.0, duration: float = 20.0) -> dict[str, float]:
    requests = RequestStream(SMALL, seed=3).requests(qps, duration)
    fleet = VirtualFleet(ENGINE, 4, make_policy(policy_name, seed=1))
    return fleet.run(requests).summary()


def test_every_request_completes_and_figures_are_consistent() -> None:
    summary = _run("precise+load")
    assert summary["completed"] == summary["requests"] > 100
    assert 0.0 < summary["hit_rate"] <= 1.0
    assert summary["ttft_p50_s"] <= summary["ttft_p90_s"] <= summary["ttft_p99_s"]
    assert summary["throughput_tok_s"] > 0


def test_runs_are_deterministic() -> None:
    assert _run("random") == _run("random")
    assert _run("precise") == _run("precise")


def test_precise_routing_beats_cache_blind_routing_on_hit_rate() -> None:
    blind = _run("round-robin")
    precise = _run("precise")
    approximate = _run("approximate")
    assert precise["hit_rate"] > blind["hit_rate"] + 0.2
    assert approximate["hit_rate"] > blind["hit_rate"]


def test_oracle_bounds_every_policy() -> None:
    requests = RequestStream(SMALL, seed=3).requests(20.0, 20.0)
    oracle = oracle_hit_rate(requests, ENGINE.block_size)
    for name in ("round-robin", "precise", "prefill-cost"):
        assert _run(name)["hit_rate"] <= oracle + 1e-9


def test_comparison_outputs(tmp_path: Path) -> None:
    comparison = Comparison(SMALL, ENGINE, 4, [10.0, 20.0], 10.0, warmup_s=5.0)
    factories = [lambda n=n: make_policy(n) for n in BUILTIN_POLICIES]
    results = run_comparison(comparison, factories, progress=None)
    assert set(results["policies"]) == set(BUILTIN_POLICIES)
    for entry in results["policies"].values():
        for key in ("hit_rate", "ttft_p50_s", "ttft_p90_s", "throughput_tok_s"):
            assert not math.isnan(entry[key])
        assert set(entry["by_qps"]) == {"10.0", "20.0"}
    paths = write_outputs(results, tmp_path / "out")
    data = json.loads(paths[0].read_text())
    assert data["policies"]["precise"]["hit_rate"] == results["policies"]["precise"]["hit_rate"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_and_bench_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--qps", "10", "--duration", "5", "--pods", "2", "--scale", "0.05", "--quiet"]
    assert (
        main(["demo", *args, "--policies", "round-robin,precise", "--output", str(tmp_path)]) == 0
    )
    out = capsys.readouterr().out
    assert "round-robin" in out and "precise" in out and "oracle hit rate" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["policies"]) == {"round-robin", "precise"}
    config = tmp_path / "mine.yaml"
    config.write_text("kvaware:\n  scorers:\n    - type: kv-prefix\n      weight: 1\n")
    assert main(["bench", "--config", str(config), *args, "--policies", "random"]) == 0
    assert "config:mine" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--qps", "x"], "--qps"),
        (["demo", "--qps", "-1"], "positive"),
        (["demo", "--pods", "0"], "--pods"),
        (["demo", "--policies", "magic"], "unknown magic"),
        (["demo", "--scale", "0"], "--scale"),
        (["bench", "--config", "/nonexistent.yaml"], "cannot read"),
    ],
)
def test_demo_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_unknown_workload_and_policy() -> None:
    with pytest.raises(ConfigError, match="allowed values"):
        workload("nope")
    with pytest.raises(ConfigError, match="allowed values"):
        make_policy("nope")


@pytest.mark.parametrize("name", ["gsp", "zipf", "multi-turn"])
def test_other_workloads_generate_seeded_requests(name: str) -> None:
    spec = workload(name, scale=0.05)
    first = RequestStream(spec, seed=1).requests(10.0, 10.0)
    second = RequestStream(spec, seed=1).requests(10.0, 10.0)
    assert [r.token_ids for r in first] == [r.token_ids for r in second]
    assert all(isinstance(r, SimRequest) and r.token_ids for r in first)
    assert all(a.arrival_s < b.arrival_s for a, b in itertools.pairwise(first))


def test_engine_parameters_from_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvaware_scorer.sim.profiles import engine_from_yaml

    good = tmp_path / "engine.yaml"
    good.write_text("profile: llama-8b-1xh100\nnum_gpu_blocks: 9000\nstep_time: {base_s: 0.02}\n")
    engine = engine_from_yaml(good)
    base = profile("llama-8b-1xh100")
    assert engine.num_gpu_blocks == 9000 and engine.step_time.base_s == 0.02
    assert engine.step_time.per_prefill_token_s == base.step_time.per_prefill_token_s
    args = ["--qps", "10", "--duration", "5", "--pods", "2", "--scale", "0.05", "--quiet"]
    assert main(["demo", *args, "--policies", "random", "--engine-config", str(good)]) == 0
    for text, message in [
        ("num_gpu_blockz: 5\n", "num_gpu_blockz"),
        ("step_time: {base: 1}\n", "step_time: unknown key(s) base"),
        ("profile: nope\n", "unknown engine profile"),
        ("num_gpu_blocks: 0\n", "num_gpu_blocks"),
        ("- a\n", "must be a mapping"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)):
            engine_from_yaml(bad)
    assert main(["demo", *args, "--engine-config", str(bad)]) == 2
    assert "must be a mapping" in capsys.readouterr().err
