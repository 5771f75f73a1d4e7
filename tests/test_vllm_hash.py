"""vLLM 0.33.0 block hashing against the conformance vectors (read in place)."""

from __future__ import annotations

import pickle
from typing import Any

import cbor2
import pytest
from conftest import CONFORMANCE_FILE, load_vectors, untag

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.vllm_hash import (
    DEFAULT_NONE_HASH_SEED,
    HASH_ALGOS,
    PICKLE_PROTOCOL,
    LoraSpec,
    MultiModalSpan,
    VllmBlockHash,
    VllmHashSettings,
    block_hashes,
    event_hash_int,
    group_block_hashes,
    none_hash,
    none_hash_seed,
    reported_block_hashes,
    serialize_block_input,
    to_event_extra_keys,
)


def _ids(section: str, *, with_event: bool = False) -> list[str]:
    """Case ids for parametrisation; without the file, one id whose fixture skips or fails."""
    if not CONFORMANCE_FILE.is_file():
        return ["vectors-missing"]
    return [
        case["id"]
        for case in load_vectors()[section]
        if not with_event or case["expected"].get("block_stored_event") is not None
    ]


def _case(vectors: dict[str, Any], section: str, case_id: str) -> dict[str, Any]:
    for case in vectors[section]:
        if case["id"] == case_id:
            return dict(case)
    raise AssertionError(f"no {section} case {case_id}")


def _as_lists(value: Any) -> Any:
    """Tuples to lists, as the vectors write them."""
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    return value


def request_from_inputs(
    inputs: dict[str, Any],
) -> tuple[VllmHashSettings, dict[str, Any]]:
    """Settings and block_hashes keyword arguments from a hash_cases[].inputs entry."""
    settings = VllmHashSettings(
        hash_algo=inputs["hash_algo"],
        pythonhashseed=inputs["pythonhashseed"],
        block_size=inputs["block_size"],
        num_hash_lookahead_tokens=inputs.get("num_hash_lookahead_tokens", 0),
    )
    lora = inputs["lora"]
    kwargs: dict[str, Any] = {
        "lora": None
        if lora is None
        else LoraSpec(lora["lora_name"], lora["lora_int_id"], lora["lora_path"]),
        "cache_salt": inputs["cache_salt"],
        "mm_features": [
            MultiModalSpan(m["identifier"], m["offset"], m["length"]) for m in inputs["mm_features"]
        ],
    }
    embeds = inputs.get("prompt_embeds")
    if embeds is not None:
        kwargs["prompt_embeds_digests"] = {
            tuple(int(x) for x in key.split("-")): bytes.fromhex(digest)
            for key, digest in embeds["per_block_sha256_hex"].items()
        }
    return settings, kwargs


# --- root hash ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", _ids("none_hash_cases"))
def test_none_hash_cases(vectors: dict[str, Any], case_id: str) -> None:
    case = _case(vectors, "none_hash_cases", case_id)
    if not case["deterministic"]:
        with pytest.raises(ConfigError) as info:
            VllmHashSettings(hash_algo=case["hash_algo"], pythonhashseed=case["pythonhashseed"])
        message = str(info.value)
        assert "PYTHONHASHSEED" in message
        assert "sha256" in message  # names the algorithms that work without a seed
        assert "\n" not in message
        return
    settings = VllmHashSettings(hash_algo=case["hash_algo"], pythonhashseed=case["pythonhashseed"])
    assert none_hash_seed(settings) == case["seed_used"]
    root = none_hash(settings)
    assert root.hex() == case["none_hash_hex"]
    assert event_hash_int(root) == int(case["none_hash_event_int"])
    # the serialised seed is exactly what vLLM digested
    serialized = (
        pickle.dumps(case["seed_used"], protocol=PICKLE_PROTOCOL)
        if case["hash_algo"] in ("sha256", "xxhash")
        else cbor2.dumps(case["seed_used"], canonical=True)
    )
    assert serialized.hex() == case["serialized_seed_hex"]


def test_default_seed_is_literal_string() -> None:
    assert DEFAULT_NONE_HASH_SEED == "vllm-none-hash"
    unset = VllmHashSettings("sha256", None)
    literal = VllmHashSettings("sha256", "vllm-none-hash")
    assert none_hash(unset) == none_hash(literal)
    # "random" is a literal seed, not a request for randomness
    assert none_hash(VllmHashSettings("xxhash", "random")) == none_hash(
        VllmHashSettings("xxhash", "random")
    )


# --- hash cases --------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", _ids("hash_cases"))
def test_hash_cases(vectors: dict[str, Any], case_id: str) -> None:
    case = _case(vectors, "hash_cases", case_id)
    inputs = case["inputs"]
    expected = case["expected"]
    settings, kwargs = request_from_inputs(inputs)
    assert none_hash(settings).hex() == expected["none_hash_hex"]

    blocks = block_hashes(settings, inputs["token_ids"], **kwargs)
    assert len(blocks) == expected["num_full_blocks"] == len(expected["blocks"])
    parent = none_hash(settings)
    for got, want in zip(blocks, expected["blocks"], strict=True):
        where = f"{case_id} block {want['index']}"
        assert got.index == want["index"], where
        assert (got.token_start, got.token_end) == (want["token_start"], want["token_end"]), where
        assert _as_lists(got.hash_extra_keys) == untag(want["hash_extra_keys"]), where
        assert _as_lists(got.event_extra_keys) == untag(want["event_extra_keys"]), where
        if "lookahead_token_ids" in want:
            assert list(got.lookahead_token_ids) == want["lookahead_token_ids"], where
        else:
            assert got.lookahead_token_ids == ()
        if "hash_input_hex" in want:
            serialized = serialize_block_input(
                settings.hash_algo,
                parent,
                inputs["token_ids"][got.token_start : got.token_end],
                got.hash_extra_keys,
            )
            assert serialized.hex() == want["hash_input_hex"], where
        assert got.hex == want["hash_hex"], where
        assert got.event_int == int(want["event_hash_int"]), where
        assert got.event_int == event_hash_int(got.digest)
        parent = got.digest


@pytest.mark.parametrize("case_id", _ids("hash_cases", with_event=True))
def test_hash_cases_block_stored_event(vectors: dict[str, Any], case_id: str) -> None:
    """The event vLLM's block pool emits carries our event ints and untagged extra keys."""
    case = _case(vectors, "hash_cases", case_id)
    event = untag(case["expected"]["block_stored_event"])
    settings, kwargs = request_from_inputs(case["inputs"])
    blocks = block_hashes(settings, case["inputs"]["token_ids"], **kwargs)
    assert event["block_hashes"] == [b.event_int for b in blocks]
    assert event["extra_keys"] == [_as_lists(b.event_extra_keys) for b in blocks]
    assert event["token_ids"] == case["inputs"]["token_ids"][: blocks[-1].token_end]


def test_pickle_memoisation_needs_interned_tags(vectors: dict[str, Any]) -> None:
    """A block touching two images pickles "mm" once: equal-but-distinct tags break it."""
    case = _case(vectors, "hash_cases", "hash/sha256/seed=0/bs=16/len=48/lora+mm+cache_salt")
    settings, kwargs = request_from_inputs(case["inputs"])
    first = block_hashes(settings, case["inputs"]["token_ids"], **kwargs)[0]
    keys = first.hash_extra_keys
    assert keys is not None
    assert keys[1][0] is keys[2][0]  # the same interned "mm"
    uninterned = tuple(("".join(["m", "m"]), *key[1:]) if key[0] == "mm" else key for key in keys)
    tokens = case["inputs"]["token_ids"][:16]
    good = serialize_block_input("sha256", none_hash(settings), tokens, keys)
    bad = serialize_block_input("sha256", none_hash(settings), tokens, uninterned)
    assert good.hex() == case["expected"]["blocks"][0]["hash_input_hex"]
    assert bad != good


# --- multi-granularity -------------------------------------------------------------------


@pytest.mark.parametrize("case_id", _ids("multi_granularity_cases"))
def test_multi_granularity_cases(vectors: dict[str, Any], case_id: str) -> None:
    case = _case(vectors, "multi_granularity_cases", case_id)
    inputs = case["inputs"]
    expected = case["expected"]
    settings = VllmHashSettings(
        inputs["hash_algo"], inputs["pythonhashseed"], inputs["hash_block_size"]
    )
    assert none_hash(settings).hex() == expected["none_hash_hex"]
    fine = block_hashes(settings, inputs["token_ids"])
    assert [b.hex for b in fine] == expected["fine_hashes_hex"]
    assert [b.event_int for b in fine] == [int(x) for x in expected["fine_event_hash_ints"]]

    event = untag(expected["block_stored_event"])
    reported = reported_block_hashes(
        fine, hash_block_size=inputs["hash_block_size"], block_size=inputs["block_size"]
    )
    assert [b.event_int for b in reported] == event["block_hashes"]
    assert event["block_size"] == inputs["block_size"]
    assert event["group_idx"] == inputs["kv_cache_group_id"]
    assert event["token_ids"] == inputs["token_ids"][: reported[-1].token_end]
    for index, block in enumerate(reported):
        assert block.index == index
        assert block.token_start == index * inputs["block_size"]
        assert block.token_end == (index + 1) * inputs["block_size"]

    direct = group_block_hashes(
        settings, inputs["token_ids"], group_block_size=inputs["block_size"]
    )
    assert direct == reported
    # hashing in the group's own block size gives different (wrong) hashes
    coarse = block_hashes(
        VllmHashSettings(inputs["hash_algo"], inputs["pythonhashseed"], inputs["block_size"]),
        inputs["token_ids"],
    )
    assert [b.event_int for b in coarse] != event["block_hashes"]


def test_reported_block_hashes_rejects_non_multiple() -> None:
    fine = block_hashes(VllmHashSettings(block_size=16), range(64))
    with pytest.raises(ConfigError, match="multiple of hash_block_size=16"):
        reported_block_hashes(fine, hash_block_size=16, block_size=24)
    with pytest.raises(ConfigError, match="hash_block_size"):
        reported_block_hashes(fine, hash_block_size=0, block_size=16)
    assert reported_block_hashes(fine, hash_block_size=16, block_size=16) == fine


# --- settings validation -----------------------------------------------------------------


@pytest.mark.parametrize("algo", ["md5", "SHA256", "", "builtin", "sha256_cbor_64bit"])
def test_unknown_algorithm_lists_allowed_values(algo: str) -> None:
    with pytest.raises(ConfigError) as info:
        VllmHashSettings(hash_algo=algo, pythonhashseed="0")
    message = str(info.value)
    assert "hash_algo" in message
    for allowed in HASH_ALGOS:
        assert allowed in message


@pytest.mark.parametrize("algo", ["xxhash", "xxhash_cbor"])
def test_xxhash_without_seed_refused_with_fix(algo: str) -> None:
    with pytest.raises(ConfigError) as info:
        VllmHashSettings(hash_algo=algo)
    message = str(info.value)
    assert "PYTHONHASHSEED" in message
    assert "sha256 or sha256_cbor" in message
    VllmHashSettings(hash_algo=algo, pythonhashseed="0")  # fine with a seed


@pytest.mark.parametrize("size", [0, -16, True, 16.0, "16", None])
def test_block_size_must_be_positive_int(size: Any) -> None:
    with pytest.raises(ConfigError, match="block_size"):
        VllmHashSettings(block_size=size)


@pytest.mark.parametrize("lookahead", [-1, 1.0, None, False])
def test_lookahead_must_be_non_negative_int(lookahead: Any) -> None:
    with pytest.raises(ConfigError, match="num_hash_lookahead_tokens"):
        VllmHashSettings(num_hash_lookahead_tokens=lookahead)


def test_seed_must_be_string() -> None:
    with pytest.raises(ConfigError, match="pythonhashseed"):
        VllmHashSettings(pythonhashseed=0)  # type: ignore[arg-type]


def test_settings_are_frozen_with_defaults() -> None:
    settings = VllmHashSettings()
    assert settings == VllmHashSettings("sha256", None, 16, 0)
    with pytest.raises(AttributeError):
        settings.block_size = 32  # type: ignore[misc]


# --- hasher details ----------------------------------------------------------------------


def test_partial_and_short_sequences() -> None:
    settings = VllmHashSettings(block_size=4)
    assert block_hashes(settings, []) == []
    assert block_hashes(settings, [1, 2, 3]) == []
    assert len(block_hashes(settings, range(11))) == 2
    lookahead = VllmHashSettings(block_size=4, num_hash_lookahead_tokens=2)
    assert len(block_hashes(lookahead, range(9))) == 1  # (9 - 2) // 4
    assert len(block_hashes(lookahead, range(10))) == 2
    assert block_hashes(lookahead, [1]) == []


def test_chain_prefix_property() -> None:
    """Hashes of a prefix are the leading hashes of the longer sequence."""
    settings = VllmHashSettings("sha256_cbor", "0", 16)
    long = block_hashes(settings, range(100, 196))
    short = block_hashes(settings, range(100, 148))
    assert short == long[:3]


def test_numpy_like_ints_are_hashed_as_python_ints() -> None:
    class Token:
        def __init__(self, value: int) -> None:
            self.value = value

        def __index__(self) -> int:
            return self.value

    settings = VllmHashSettings()
    plain = block_hashes(settings, range(32))
    wrapped = block_hashes(settings, [Token(i) for i in range(32)])  # type: ignore[misc]
    assert plain == wrapped
    with pytest.raises(TypeError):
        block_hashes(settings, [1.5] * 16)  # type: ignore[list-item]


def test_cache_salt_only_on_block_zero_and_empty_salt_ignored() -> None:
    settings = VllmHashSettings()
    salted = block_hashes(settings, range(48), cache_salt="s")
    assert salted[0].hash_extra_keys == (("cache_salt", "s"),)
    assert salted[0].event_extra_keys == ("s",)
    assert salted[1].hash_extra_keys is None
    assert salted[1].event_extra_keys is None
    plain = block_hashes(settings, range(48))
    assert all(a.digest != b.digest for a, b in zip(salted, plain, strict=True))
    assert block_hashes(settings, range(48), cache_salt="") == plain


def test_lora_path_changes_hashes() -> None:
    settings = VllmHashSettings()
    one = block_hashes(settings, range(32), lora=LoraSpec("a", 1, "/p1"))
    two = block_hashes(settings, range(32), lora=LoraSpec("a", 1, "/p2"))
    other_id = block_hashes(settings, range(32), lora=LoraSpec("a", 7, "/p1"))
    assert [b.digest for b in one] != [b.digest for b in two]
    assert one == other_id  # the int id is not hashed
    assert one[1].hash_extra_keys == (("lora", "a", "/p1"),)
    assert one[1].event_extra_keys == ("a",)


def test_mm_negative_relative_offset_and_ordering() -> None:
    settings = VllmHashSettings(block_size=8)
    spans = [MultiModalSpan("img", 6, 12)]
    blocks = block_hashes(settings, range(24), mm_features=spans)
    assert [b.hash_extra_keys for b in blocks] == [
        (("mm", "img", 6),),
        (("mm", "img", -2),),
        (("mm", "img", -10),),
    ]
    assert blocks[2].event_extra_keys == (("img", -10),)
    with pytest.raises(ValueError, match="prompt order"):
        block_hashes(
            settings,
            range(24),
            mm_features=[MultiModalSpan("b", 10, 2), MultiModalSpan("a", 2, 2)],
        )


@pytest.mark.parametrize(
    ("identifier", "offset", "length"),
    [(1, 0, 1), ("x", -1, 1), ("x", 0, 0), ("x", True, 1), ("x", 0, 1.0)],
)
def test_multimodal_span_validation(identifier: Any, offset: Any, length: Any) -> None:
    with pytest.raises(ValueError, match="mm_features"):
        MultiModalSpan(identifier, offset, length)


def test_lora_spec_validation() -> None:
    with pytest.raises(ValueError, match="lora"):
        LoraSpec("a", 1, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="int_id"):
        LoraSpec("a", "1", "/p")  # type: ignore[arg-type]


def test_prompt_embeds_digest_required_per_block() -> None:
    settings = VllmHashSettings(block_size=4)
    digests = {(0, 4): b"\x01" * 32}
    with pytest.raises(ValueError, match="4-8"):
        block_hashes(settings, range(8), prompt_embeds_digests=digests)
    blocks = block_hashes(settings, range(4), prompt_embeds_digests=digests)
    assert blocks[0].hash_extra_keys == (("prompt_embeds", b"\x01" * 32),)
    assert blocks[0].event_extra_keys == (b"\x01" * 32,)


def test_lookahead_extra_keys_shape() -> None:
    one = block_hashes(VllmHashSettings(block_size=4, num_hash_lookahead_tokens=1), range(9))
    assert one[0].hash_extra_keys == (None, 4)
    assert one[1].hash_extra_keys == (None, 8)
    assert one[0].event_extra_keys is None
    assert one[1].lookahead_token_ids == (8,)
    three = block_hashes(
        VllmHashSettings(block_size=4, num_hash_lookahead_tokens=3),
        range(10, 20),
        lora=LoraSpec("l", 1, "/l"),
    )
    assert three[0].hash_extra_keys == ((("lora", "l", "/l"),), 14, 15, 16)
    assert three[0].event_extra_keys == ("l",)


def test_to_event_extra_keys() -> None:
    assert to_event_extra_keys(None) is None
    keys = (("lora", "n", "/p"), ("mm", "id", -3), ("cache_salt", "s"), ("prompt_embeds", b"d"))
    assert to_event_extra_keys(keys) == ("n", ("id", -3), "s", b"d")
    with pytest.raises(ValueError, match="unknown extra-key tag"):
        to_event_extra_keys((("other", 1),))


def test_serialize_block_input_rejects_unknown_algorithm() -> None:
    with pytest.raises(ConfigError, match="allowed values"):
        serialize_block_input("md5", b"", [1], None)


def test_event_hash_int_is_last_eight_bytes() -> None:
    digest = bytes(range(32))
    assert event_hash_int(digest) == int.from_bytes(digest[-8:], "big")
    assert event_hash_int(b"\xff" * 16) == 2**64 - 1
    assert event_hash_int(b"\x00" * 16) == 0


def test_block_hash_is_immutable_value() -> None:
    block = block_hashes(VllmHashSettings(), range(16))[0]
    assert isinstance(block, VllmBlockHash)
    assert block.hex == block.digest.hex()
    assert len(block.digest) == 32
    assert hash(block) == hash(block_hashes(VllmHashSettings(), range(16))[0])
    xx = block_hashes(VllmHashSettings("xxhash", "0"), range(16))[0]
    assert len(xx.digest) == 16
