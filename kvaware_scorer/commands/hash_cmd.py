"""``kvaware-scorer hash``: print the vLLM prefix-cache block hashes of a token sequence.

Two input modes:

``--json``
    Read ONE JSON object on standard input with the field names of a conformance vector's
    ``hash_cases[].inputs``: ``hash_algo`` (default ``"sha256"``), ``pythonhashseed``
    (string, or null = unset; the default), ``block_size`` (default 16),
    ``num_hash_lookahead_tokens`` (default 0), ``token_ids`` (required), ``lora``
    (null or ``{"lora_name", "lora_int_id", "lora_path"}``), ``cache_salt`` (null or a
    string), ``mm_features`` (list of ``{"identifier", "offset", "length"}``) and
    ``prompt_embeds`` (null or an object whose ``per_block_sha256_hex`` maps
    ``"start-end"`` token spans to the hex SHA-256 of that block's embedding rows).
    ``token_ids_generator`` is accepted and ignored. Prints one line:
    ``{"blocks": [{"hash_hex": "...", "event_hash_int": N}, ...]}`` where ``N`` is a JSON
    integer (it may exceed 2**53).

flags
    ``--hash-algo``, ``--pythonhashseed``, ``--block-size``,
    ``--num-hash-lookahead-tokens``, ``--tokens "1,2,3"`` or ``--tokens-file PATH``
    (integers separated by commas and/or whitespace), ``--lora-name``/``--lora-id``/
    ``--lora-path`` and ``--cache-salt``. Prints an aligned table: block index, token
    range, event hash (the uint64 KV events carry by default) and the hash hex.

Bad input prints one line ``kvaware-scorer hash: error: ...`` on standard error, naming
the field and the allowed values, and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.vllm_hash import (
    HASH_ALGOS,
    LoraSpec,
    MultiModalSpan,
    VllmBlockHash,
    VllmHashSettings,
    block_hashes,
)

__all__ = ["add_arguments", "run"]

_PROG = "kvaware-scorer hash"
_JSON_FIELDS = (
    "hash_algo",
    "pythonhashseed",
    "block_size",
    "num_hash_lookahead_tokens",
    "token_ids",
    "lora",
    "cache_salt",
    "mm_features",
    "prompt_embeds",
    "token_ids_generator",
)
_FLAG_DESTS = (
    "hash_algo",
    "pythonhashseed",
    "block_size",
    "num_hash_lookahead_tokens",
    "tokens",
    "tokens_file",
    "lora_name",
    "lora_id",
    "lora_path",
    "cache_salt",
)
_SPAN_KEY = re.compile(r"^(\d+)-(\d+)$")
_HEX_DIGEST = re.compile(r"^[0-9a-fA-F]{64}$")


class _InputError(Exception):
    """Bad user input; the message is one line naming the field."""


@dataclass(frozen=True, slots=True)
class _HashRequest:
    settings: VllmHashSettings
    token_ids: list[int]
    lora: LoraSpec | None
    cache_salt: str | None
    mm_features: tuple[MultiModalSpan, ...]
    prompt_embeds_digests: dict[tuple[int, int], bytes] | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``hash`` command's options to ``parser``."""
    parser.add_argument(
        "--json",
        action="store_true",
        help="read one JSON object (a conformance hash_cases[].inputs entry) on stdin "
        "and print the blocks as one JSON line",
    )
    parser.add_argument(
        "--hash-algo",
        metavar="ALGO",
        help=f"vLLM's --prefix-caching-hash-algo: {', '.join(HASH_ALGOS)} (default sha256)",
    )
    parser.add_argument(
        "--pythonhashseed",
        metavar="SEED",
        help="PYTHONHASHSEED of the vLLM pods, taken literally (default: unset)",
    )
    parser.add_argument("--block-size", metavar="N", help="tokens per hashed block (default 16)")
    parser.add_argument(
        "--num-hash-lookahead-tokens",
        metavar="L",
        help="EAGLE lookahead tokens per block hash (default 0)",
    )
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--tokens", metavar="IDS", help='token ids, e.g. "1,2,3"')
    tokens.add_argument(
        "--tokens-file",
        metavar="PATH",
        help="file of token ids separated by commas and/or whitespace",
    )
    parser.add_argument("--lora-name", metavar="NAME", help="LoRA adapter name")
    parser.add_argument(
        "--lora-id", metavar="ID", help="LoRA adapter int id (not hashed; default 0)"
    )
    parser.add_argument(
        "--lora-path", metavar="PATH", help="LoRA adapter path (hashed since vLLM 0.31)"
    )
    parser.add_argument("--cache-salt", metavar="SALT", help="the request's cache_salt")


def run(args: argparse.Namespace) -> int:
    """Run the command; 0 on success, 2 on bad input (one line on stderr)."""
    try:
        if getattr(args, "json", False):
            used = [d for d in _FLAG_DESTS if getattr(args, d, None) is not None]
            if used:
                flags = ", ".join("--" + d.replace("_", "-") for d in used)
                raise _InputError(f"--json reads every input from stdin; drop {flags}")
            request = _request_from_json(_read_stdin())
            blocks = _hash(request)
            _write_json(blocks, sys.stdout)
        else:
            request = _request_from_flags(args)
            blocks = _hash(request)
            _write_table(request, blocks, sys.stdout)
    except (_InputError, ConfigError) as exc:
        print(f"{_PROG}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    return 0


def _read_stdin() -> str:
    try:
        return sys.stdin.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise _InputError(f"stdin: cannot read the JSON input ({exc})") from exc


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _hash(request: _HashRequest) -> list[VllmBlockHash]:
    try:
        return block_hashes(
            request.settings,
            request.token_ids,
            lora=request.lora,
            cache_salt=request.cache_salt,
            mm_features=request.mm_features,
            prompt_embeds_digests=request.prompt_embeds_digests,
        )
    except ConfigError:
        raise
    except ValueError as exc:
        raise _InputError(str(exc)) from exc


# --- JSON mode ---------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _request_from_json(text: str) -> _HashRequest:
    try:
        data = json.loads(text)
    except RecursionError as exc:
        raise _InputError("stdin: JSON nested too deeply") from exc
    except ValueError as exc:
        raise _InputError(f"stdin: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise _InputError(
            "stdin: expected one JSON object with the fields of a hash_cases[].inputs entry"
        )
    unknown = sorted(k for k in data if k not in _JSON_FIELDS)
    if unknown:
        raise _InputError(f"{unknown[0]}: unknown field; allowed fields: {', '.join(_JSON_FIELDS)}")

    algo = data.get("hash_algo", "sha256")
    if algo is None:
        algo = "sha256"
    if not isinstance(algo, str) or algo not in HASH_ALGOS:
        raise _InputError(
            f"hash_algo: unknown algorithm {algo!r}; allowed values: {', '.join(HASH_ALGOS)}"
        )
    seed = data.get("pythonhashseed")
    if seed is not None and not isinstance(seed, str):
        raise _InputError(
            f"pythonhashseed: must be a string or null (unset), got {json.dumps(seed)}"
        )
    block_size = data.get("block_size", 16)
    if block_size is None:
        block_size = 16
    if not _is_int(block_size) or block_size <= 0:
        raise _InputError(f"block_size: must be a positive integer, got {json.dumps(block_size)}")
    lookahead = data.get("num_hash_lookahead_tokens", 0)
    if lookahead is None:
        lookahead = 0
    if not _is_int(lookahead) or lookahead < 0:
        raise _InputError(
            "num_hash_lookahead_tokens: must be a non-negative integer, got "
            f"{json.dumps(lookahead)}"
        )
    settings = VllmHashSettings(algo, seed, block_size, lookahead)

    if "token_ids" not in data:
        raise _InputError("token_ids: required, a list of non-negative integers")
    tokens = data["token_ids"]
    if not isinstance(tokens, list) or not all(_is_int(t) and t >= 0 for t in tokens):
        raise _InputError("token_ids: must be a list of non-negative integers")

    return _HashRequest(
        settings=settings,
        token_ids=tokens,
        lora=_lora_from_json(data.get("lora")),
        cache_salt=_salt_from_json(data.get("cache_salt")),
        mm_features=_mm_from_json(data.get("mm_features")),
        prompt_embeds_digests=_embeds_from_json(data.get("prompt_embeds")),
    )


def _lora_from_json(value: object) -> LoraSpec | None:
    if value is None:
        return None
    shape = 'null or {"lora_name": str, "lora_int_id": int, "lora_path": str}'
    if not isinstance(value, dict):
        raise _InputError(f"lora: must be {shape}")
    unknown = sorted(k for k in value if k not in ("lora_name", "lora_int_id", "lora_path"))
    if unknown:
        raise _InputError(f"lora.{unknown[0]}: unknown field; lora must be {shape}")
    name = value.get("lora_name")
    path = value.get("lora_path")
    int_id = value.get("lora_int_id", 0)
    if not isinstance(name, str):
        raise _InputError(f"lora.lora_name: must be a string; lora must be {shape}")
    if not isinstance(path, str):
        raise _InputError(
            "lora.lora_path: must be a string (vLLM >= 0.31 hashes the adapter path); "
            f"lora must be {shape}"
        )
    if not _is_int(int_id):
        raise _InputError(f"lora.lora_int_id: must be an integer; lora must be {shape}")
    return LoraSpec(name, int_id, path)


def _salt_from_json(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise _InputError(f"cache_salt: must be a string or null, got {json.dumps(value)}")


def _mm_from_json(value: object) -> tuple[MultiModalSpan, ...]:
    if value is None:
        return ()
    shape = 'a list of {"identifier": str, "offset": int >= 0, "length": int > 0}'
    if not isinstance(value, list):
        raise _InputError(f"mm_features: must be {shape}")
    spans: list[MultiModalSpan] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"identifier", "offset", "length"}:
            raise _InputError(f"mm_features[{index}]: must be {shape}")
        try:
            spans.append(MultiModalSpan(item["identifier"], item["offset"], item["length"]))
        except ValueError as exc:
            raise _InputError(f"mm_features[{index}]: {exc}; must be {shape}") from exc
    return tuple(spans)


def _embeds_from_json(value: object) -> dict[tuple[int, int], bytes] | None:
    if value is None:
        return None
    shape = 'null or {"per_block_sha256_hex": {"START-END": "<64 hex digits>", ...}}'
    if not isinstance(value, dict) or not isinstance(value.get("per_block_sha256_hex"), dict):
        raise _InputError(f"prompt_embeds: must be {shape}")
    digests: dict[tuple[int, int], bytes] = {}
    for key, hex_digest in value["per_block_sha256_hex"].items():
        match = _SPAN_KEY.match(key)
        if match is None:
            raise _InputError(f"prompt_embeds.per_block_sha256_hex: bad key {key!r}; {shape}")
        if not isinstance(hex_digest, str) or not _HEX_DIGEST.match(hex_digest):
            raise _InputError(
                f"prompt_embeds.per_block_sha256_hex[{key!r}]: must be 64 hex digits; {shape}"
            )
        digests[(int(match.group(1)), int(match.group(2)))] = bytes.fromhex(hex_digest)
    return digests


def _write_json(blocks: Sequence[VllmBlockHash], out: TextIO) -> None:
    doc = {"blocks": [{"hash_hex": b.hex, "event_hash_int": b.event_int} for b in blocks]}
    out.write(json.dumps(doc) + "\n")


# --- flag mode ---------------------------------------------------------------------------


def _int_flag(name: str, text: str | None, default: int, *, minimum: int) -> int:
    if text is None:
        return default
    try:
        value = int(text.strip())
    except ValueError:
        value = minimum - 1
    if value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise _InputError(f"{name}: must be {kind} integer, got {text!r}")
    return value


def _parse_tokens(source: str, text: str) -> list[int]:
    tokens: list[int] = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        if not item.isascii() or not item.isdigit():
            raise _InputError(f"{source}: {item!r} is not a non-negative integer token id")
        tokens.append(int(item))
    return tokens


def _request_from_flags(args: argparse.Namespace) -> _HashRequest:
    algo = getattr(args, "hash_algo", None) or "sha256"
    if algo not in HASH_ALGOS:
        raise _InputError(
            f"--hash-algo: unknown algorithm {algo!r}; allowed values: {', '.join(HASH_ALGOS)}"
        )
    settings = VllmHashSettings(
        algo,
        getattr(args, "pythonhashseed", None),
        _int_flag("--block-size", getattr(args, "block_size", None), 16, minimum=1),
        _int_flag(
            "--num-hash-lookahead-tokens",
            getattr(args, "num_hash_lookahead_tokens", None),
            0,
            minimum=0,
        ),
    )

    tokens_text = getattr(args, "tokens", None)
    tokens_file = getattr(args, "tokens_file", None)
    if tokens_text is not None and tokens_file is not None:
        raise _InputError("--tokens and --tokens-file: give only one of them")
    if tokens_text is not None:
        tokens = _parse_tokens("--tokens", tokens_text)
    elif tokens_file is not None:
        try:
            with open(tokens_file, encoding="utf-8") as handle:
                content = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise _InputError(f"--tokens-file: cannot read {tokens_file!r}: {exc}") from exc
        tokens = _parse_tokens("--tokens-file", content)
    else:
        raise _InputError('tokens: give --tokens "1,2,3", --tokens-file PATH, or --json')

    lora_name = getattr(args, "lora_name", None)
    lora_path = getattr(args, "lora_path", None)
    lora_id_text = getattr(args, "lora_id", None)
    lora: LoraSpec | None = None
    if lora_name is not None or lora_path is not None or lora_id_text is not None:
        if lora_name is None or lora_path is None:
            raise _InputError(
                "--lora-name/--lora-path: give both (vLLM >= 0.31 hashes the adapter path); "
                "--lora-id is optional"
            )
        lora = LoraSpec(lora_name, _int_flag("--lora-id", lora_id_text, 0, minimum=0), lora_path)

    return _HashRequest(
        settings=settings,
        token_ids=tokens,
        lora=lora,
        cache_salt=getattr(args, "cache_salt", None),
        mm_features=(),
        prompt_embeds_digests=None,
    )


def _write_table(request: _HashRequest, blocks: Sequence[VllmBlockHash], out: TextIO) -> None:
    settings = request.settings
    header = f"# {settings.describe()}; {len(request.token_ids)} tokens, {len(blocks)} full blocks"
    extras = _describe_extras(request)
    if extras:
        header += f"; {extras}"
    lines = [header]
    if blocks:
        rows = [("block", "tokens", "event_hash_int", "hash_hex")]
        rows += [
            (str(b.index), f"{b.token_start}-{b.token_end}", str(b.event_int), b.hex)
            for b in blocks
        ]
        widths = [max(len(row[col]) for row in rows) for col in range(3)]
        for row in rows:
            lines.append(
                f"{row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}"
            )
    out.write("\n".join(lines) + "\n")


def _describe_extras(request: _HashRequest) -> str:
    parts: list[str] = []
    if request.lora is not None:
        parts.append(f"lora {request.lora.name!r} at {request.lora.path!r}")
    if request.cache_salt:
        parts.append("cache_salt set")
    return ", ".join(parts)
