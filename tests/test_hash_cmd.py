"""``kvaware-scorer hash``: JSON mode against the vectors, table mode, every bad input."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import CONFORMANCE_FILE, load_vectors

from kvaware_scorer.commands import hash_cmd
from kvaware_scorer.vllm_hash import VllmHashSettings, block_hashes

# A spread of inputs: every algorithm, seeds, block sizes, extras, lookahead, empty.
CLI_CASES = [
    "hash/sha256/seed=unset/bs=16/len=0/plain",
    "hash/sha256/seed=unset/bs=16/len=48/plain",
    "hash/sha256/seed=0/bs=64/len=1000/plain",
    "hash/sha256_cbor/seed=0/bs=64/len=1000/lora+mm+cache_salt",
    "hash/sha256_cbor/seed=0/bs=64/len=1000/prompt_embeds",
    "hash/xxhash/seed=0/bs=16/len=48/lora+mm+cache_salt",
    "hash/xxhash/seed=0/bs=16/len=1000/prompt_embeds",
    "hash/xxhash_cbor/seed=0/bs=16/len=1000/mm",
    "hash/sha256/seed=0/bs=16/len=50/lookahead=2/mm",
    "hash/sha256_cbor/seed=12345/bs=16/len=64/lookahead=1/lora",
]


def _cli_ids() -> list[str]:
    if not CONFORMANCE_FILE.is_file():
        return ["vectors-missing"]
    known = {case["id"] for case in load_vectors()["hash_cases"]}
    return [case_id for case_id in CLI_CASES if case_id in known]


def _case(vectors: dict[str, Any], case_id: str) -> dict[str, Any]:
    for case in vectors["hash_cases"]:
        if case["id"] == case_id:
            return dict(case)
    raise AssertionError(case_id)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kvaware-scorer hash")
    hash_cmd.add_arguments(parser)
    return parser.parse_args(argv)


def _run(
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stdin: str | io.TextIOBase = "",
) -> tuple[int, str, str]:
    stream = io.StringIO(stdin) if isinstance(stdin, str) else stdin
    monkeypatch.setattr("sys.stdin", stream)
    code = hash_cmd.run(_parse(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_input_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2
    assert out == ""
    assert err.startswith("kvaware-scorer hash: error: ")
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


# --- JSON mode ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", _cli_ids())
def test_json_reproduces_vectors(
    vectors: dict[str, Any],
    case_id: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    case = _case(vectors, case_id)
    code, out, err = _run(["--json"], monkeypatch, capsys, json.dumps(case["inputs"]))
    assert (code, err) == (0, "")
    assert out.endswith("\n")
    assert out.count("\n") == 1
    doc = json.loads(out)
    assert doc == {
        "blocks": [
            {"hash_hex": b["hash_hex"], "event_hash_int": int(b["event_hash_int"])}
            for b in case["expected"]["blocks"]
        ]
    }
    for block in doc["blocks"]:
        assert type(block["event_hash_int"]) is int  # a JSON integer, not a string
    # the integers are written exactly (no float rounding above 2**53)
    for block in case["expected"]["blocks"]:
        assert f'"event_hash_int": {block["event_hash_int"]}' in out


def test_json_defaults(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    tokens = list(range(40))
    code, out, err = _run(["--json"], monkeypatch, capsys, json.dumps({"token_ids": tokens}))
    assert (code, err) == (0, "")
    expected = block_hashes(VllmHashSettings("sha256", None, 16), tokens)
    assert json.loads(out) == {
        "blocks": [{"hash_hex": b.hex, "event_hash_int": b.event_int} for b in expected]
    }
    nulls = {"token_ids": tokens, "hash_algo": None, "block_size": None, "lora": None}
    code, out2, err = _run(["--json"], monkeypatch, capsys, json.dumps(nulls))
    assert (code, err, out2) == (0, "", out)


@pytest.mark.parametrize(
    ("payload", "needles"),
    [
        ("", ["stdin", "not valid JSON"]),
        ("{", ["stdin", "not valid JSON"]),
        ("[1, 2]", ["stdin", "one JSON object"]),
        ("[" * 100000, ["stdin"]),
        ('{"token_ids": [1], "blocksize": 4}', ["blocksize", "unknown field", "block_size"]),
        ('{"hash_algo": "md5", "token_ids": [1]}', ["hash_algo", "'md5'", "sha256, sha256_cbor"]),
        ('{"hash_algo": 5, "token_ids": [1]}', ["hash_algo", "xxhash_cbor"]),
        ('{"hash_algo": "xxhash", "token_ids": [1]}', ["PYTHONHASHSEED", "sha256_cbor"]),
        ('{"hash_algo": "xxhash_cbor", "token_ids": [1]}', ["PYTHONHASHSEED"]),
        ('{"pythonhashseed": 0, "token_ids": [1]}', ["pythonhashseed", "string or null"]),
        ('{"block_size": 0, "token_ids": [1]}', ["block_size", "positive integer"]),
        ('{"block_size": "16", "token_ids": [1]}', ["block_size", "positive integer"]),
        ('{"block_size": true, "token_ids": [1]}', ["block_size", "positive integer"]),
        ('{"block_size": 16.0, "token_ids": [1]}', ["block_size", "positive integer"]),
        ('{"num_hash_lookahead_tokens": -1, "token_ids": [1]}', ["num_hash_lookahead_tokens"]),
        ("{}", ["token_ids", "required"]),
        ('{"token_ids": "1,2"}', ["token_ids", "non-negative integers"]),
        ('{"token_ids": [1, -2]}', ["token_ids", "non-negative integers"]),
        ('{"token_ids": [1, 2.5]}', ["token_ids", "non-negative integers"]),
        ('{"token_ids": [1, true]}', ["token_ids", "non-negative integers"]),
        ('{"token_ids": [1], "lora": "sql"}', ["lora", "lora_name", "lora_path"]),
        ('{"token_ids": [1], "lora": {"lora_name": "a"}}', ["lora.lora_path", "adapter path"]),
        ('{"token_ids": [1], "lora": {"lora_path": "/a"}}', ["lora.lora_name"]),
        (
            '{"token_ids": [1], "lora": {"lora_name": "a", "lora_path": "/a", "id": 1}}',
            ["lora.id", "unknown field"],
        ),
        (
            '{"token_ids": [1], "lora": {"lora_name": "a", "lora_path": "/a", "lora_int_id": "1"}}',
            ["lora.lora_int_id", "integer"],
        ),
        ('{"token_ids": [1], "cache_salt": 5}', ["cache_salt", "string or null"]),
        ('{"token_ids": [1], "mm_features": {}}', ["mm_features", "identifier"]),
        ('{"token_ids": [1], "mm_features": [{"identifier": "x"}]}', ["mm_features[0]"]),
        (
            '{"token_ids": [1], "mm_features": [{"identifier": "x", "offset": -1, "length": 2}]}',
            ["mm_features[0]", "offset"],
        ),
        (
            '{"token_ids": [1], "mm_features": [{"identifier": "x", "offset": 4, "length": 1},'
            ' {"identifier": "y", "offset": 1, "length": 1}]}',
            ["mm_features", "prompt order"],
        ),
        ('{"token_ids": [1], "prompt_embeds": []}', ["prompt_embeds", "per_block_sha256_hex"]),
        (
            '{"token_ids": [1], "prompt_embeds": {"per_block_sha256_hex": {"a-b": "00"}}}',
            ["prompt_embeds.per_block_sha256_hex", "'a-b'"],
        ),
        (
            '{"token_ids": [1], "prompt_embeds": {"per_block_sha256_hex": {"0-16": "zz"}}}',
            ["prompt_embeds.per_block_sha256_hex['0-16']", "64 hex digits"],
        ),
        (
            '{"token_ids": ' + json.dumps(list(range(32))) + ', "prompt_embeds": '
            '{"per_block_sha256_hex": {"0-16": "' + "ab" * 32 + '"}}}',
            ["prompt_embeds", "16-32"],
        ),
    ],
)
def test_json_bad_input(
    payload: str,
    needles: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _run(["--json"], monkeypatch, capsys, payload)
    _assert_input_error(code, out, err, *needles)


def test_json_undecodable_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(b'{"token_ids": [1]}\xff\xfe'), encoding="utf-8")
    code, out, err = _run(["--json"], monkeypatch, capsys, stdin)
    _assert_input_error(code, out, err, "stdin")


def test_json_refuses_flags(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(
        ["--json", "--block-size", "32", "--tokens", "1"], monkeypatch, capsys, '{"token_ids": []}'
    )
    _assert_input_error(code, out, err, "--json", "--block-size", "--tokens")


# --- table mode --------------------------------------------------------------------------


def _table_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    assert lines[0].startswith("# ")
    return [line.split() for line in lines[1:]]


def test_table_matches_vectors(
    vectors: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    case = _case(vectors, "hash/sha256_cbor/seed=0/bs=16/len=48/lora")
    inputs = case["inputs"]
    lora = inputs["lora"]
    argv = [
        "--hash-algo",
        "sha256_cbor",
        "--pythonhashseed",
        "0",
        "--block-size",
        "16",
        "--tokens",
        ",".join(str(t) for t in inputs["token_ids"]),
        "--lora-name",
        lora["lora_name"],
        "--lora-id",
        str(lora["lora_int_id"]),
        "--lora-path",
        lora["lora_path"],
    ]
    code, out, err = _run(argv, monkeypatch, capsys)
    assert (code, err) == (0, "")
    rows = _table_rows(out)
    assert rows[0] == ["block", "tokens", "event_hash_int", "hash_hex"]
    assert rows[1:] == [
        [
            str(b["index"]),
            f"{b['token_start']}-{b['token_end']}",
            b["event_hash_int"],
            b["hash_hex"],
        ]
        for b in case["expected"]["blocks"]
    ]
    # aligned: every row has the hash hex starting at the same column
    lines = out.splitlines()[1:]
    starts = {line.index(row[3]) for line, row in zip(lines, rows, strict=True)}
    assert len(starts) == 1
    assert "sha256_cbor" in out.splitlines()[0]


def test_table_cache_salt_and_tokens_file(
    vectors: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    case = _case(vectors, "hash/xxhash/seed=0/bs=16/len=48/cache_salt")
    tokens = case["inputs"]["token_ids"]
    path = tmp_path / "tokens.txt"
    # mixed separators: newlines, commas, spaces
    path.write_text(
        "\n".join(", ".join(str(t) for t in tokens[i : i + 5]) for i in range(0, 48, 5))
    )
    argv = [
        "--hash-algo",
        "xxhash",
        "--pythonhashseed",
        "0",
        "--tokens-file",
        str(path),
        "--cache-salt",
        case["inputs"]["cache_salt"],
    ]
    code, out, err = _run(argv, monkeypatch, capsys)
    assert (code, err) == (0, "")
    rows = _table_rows(out)
    assert [row[2] for row in rows[1:]] == [b["event_hash_int"] for b in case["expected"]["blocks"]]
    assert [row[3] for row in rows[1:]] == [b["hash_hex"] for b in case["expected"]["blocks"]]


def test_table_no_full_block(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(["--tokens", "1, 2 3"], monkeypatch, capsys)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "# hash_algo='sha256', PYTHONHASHSEED unset, block_size=16; 3 tokens, 0 full blocks"
    ]


def test_table_lookahead(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = list(range(1, 19))
    code, out, err = _run(
        [
            "--tokens",
            ",".join(map(str, tokens)),
            "--block-size",
            "8",
            "--num-hash-lookahead-tokens",
            "2",
        ],
        monkeypatch,
        capsys,
    )
    assert (code, err) == (0, "")
    expected = block_hashes(VllmHashSettings(block_size=8, num_hash_lookahead_tokens=2), tokens)
    assert [row[3] for row in _table_rows(out)[1:]] == [b.hex for b in expected]
    assert len(expected) == 2


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        ([], ["--tokens", "--tokens-file", "--json"]),
        (["--tokens", "1,x,3"], ["--tokens", "'x'"]),
        (["--tokens", "1,-3"], ["--tokens", "'-3'"]),
        (["--tokens", "1.5"], ["--tokens", "'1.5'"]),
        (
            ["--tokens", "1", "--hash-algo", "md5"],
            ["--hash-algo", "'md5'", "sha256_cbor", "xxhash"],
        ),
        (["--tokens", "1", "--hash-algo", "xxhash"], ["PYTHONHASHSEED", "sha256 or sha256_cbor"]),
        (["--tokens", "1", "--block-size", "0"], ["--block-size", "positive integer"]),
        (["--tokens", "1", "--block-size", "abc"], ["--block-size", "positive integer", "'abc'"]),
        (
            ["--tokens", "1", "--num-hash-lookahead-tokens", "-1"],
            ["--num-hash-lookahead-tokens", "non-negative"],
        ),
        (["--tokens", "1", "--lora-name", "a"], ["--lora-name/--lora-path", "adapter path"]),
        (["--tokens", "1", "--lora-path", "/a"], ["--lora-name/--lora-path"]),
        (["--tokens", "1", "--lora-id", "3"], ["--lora-name/--lora-path"]),
        (
            ["--tokens", "1", "--lora-name", "a", "--lora-path", "/a", "--lora-id", "x"],
            ["--lora-id", "non-negative integer"],
        ),
        (["--tokens-file", "/nonexistent/tokens.txt"], ["--tokens-file", "cannot read"]),
    ],
)
def test_flags_bad_input(
    argv: list[str],
    needles: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _run(argv, monkeypatch, capsys)
    _assert_input_error(code, out, err, *needles)


def test_tokens_file_not_utf8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(b"1,2,\xff")
    code, out, err = _run(["--tokens-file", str(path)], monkeypatch, capsys)
    _assert_input_error(code, out, err, "--tokens-file")


def test_tokens_and_tokens_file_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        _parse(["--tokens", "1", "--tokens-file", str(tmp_path / "t")])
    assert info.value.code == 2


def test_run_tolerates_namespace_without_optional_attributes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """run() only needs the attributes add_arguments defines, and reads them defensively."""
    monkeypatch.setattr("sys.stdin", io.StringIO('{"token_ids": [1, 2]}'))
    assert hash_cmd.run(argparse.Namespace(json=True)) == 0
    assert json.loads(capsys.readouterr().out) == {"blocks": []}
