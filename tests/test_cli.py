"""The console script: selfcheck, listen, and the subcommand wiring."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from kvaware_scorer.cli import main
from kvaware_scorer.commands.listen_cmd import parse_connect
from kvaware_scorer.errors import ConfigError


def test_selfcheck_passes_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["selfcheck"]) == 0
    out = capsys.readouterr().out
    assert "selfcheck passed" in out
    assert "[FAILED]" not in out
    assert "pod-0" in out


def test_console_script_is_installed() -> None:
    exe = shutil.which("kvaware-scorer") or str(
        __import__("pathlib").Path(sys.executable).with_name("kvaware-scorer")
    )
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0
    for command in ("hash", "decode", "listen", "selfcheck"):
        assert command in done.stdout


def test_listen_runs_for_a_duration_and_prints_stats(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "listen",
            "--bind",
            "tcp://127.0.0.1:0",
            "--duration",
            "0.3",
            "--stats-interval",
            "0.1",
            "--quiet",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err.splitlines()
    first = json.loads(err[0])
    assert first["listening"]["bound"][0].startswith("tcp://127.0.0.1:")
    stats = [json.loads(line)["stats"] for line in err[1:] if line.startswith('{"stats"')]
    assert stats and stats[-1]["batches"] == 0 and stats[-1]["entries"] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["listen"], "--bind ADDR or --connect SPEC"),
        (["listen", "--connect", "pod=http://x:1"], "must start with tcp://"),
        (["listen", "--connect", "tcp://x:1,bogus=1"], "unknown option"),
        (["listen", "--connect", "tcp://x:1,dp=two"], "dp must be an integer"),
        (["listen", "--connect", "ipc:///tmp/x,dp=2"], "tcp:// or inproc://"),
        (["listen", "--bind", "tcp://127.0.0.1:0", "--vllm-hash-algo", "md5"], "md5"),
        (["listen", "--bind", "tcp://127.0.0.1:0", "--block-size", "0"], "block_size"),
    ],
)
def test_listen_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_parse_connect() -> None:
    source = parse_connect("pod-a=tcp://10.0.0.5:5557,replay=tcp://10.0.0.5:5558,dp=2,model=llama")
    assert (source.pod, source.endpoint, source.replay_endpoint) == (
        "pod-a",
        "tcp://10.0.0.5:5557",
        "tcp://10.0.0.5:5558",
    )
    assert (source.dp_size, source.model) == (2, "llama")
    bare = parse_connect("tcp://10.0.0.5:5557")
    assert bare.pod == "tcp://10.0.0.5:5557" and bare.dp_size == 1
    with pytest.raises(ConfigError):
        parse_connect("pod=tcp://h:1,dp=0")
