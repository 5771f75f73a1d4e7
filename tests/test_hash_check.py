"""HashCheck: recompute sampled BlockStored events and name the misconfigured setting."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from conftest import CONFORMANCE_FILE, load_vectors, untag

from kvaware_scorer import hash_check as hash_check_module
from kvaware_scorer.events import BlockStored
from kvaware_scorer.hash_check import HashCheck, HashCheckResult
from kvaware_scorer.vllm_hash import (
    LoraSpec,
    VllmHashSettings,
    block_hashes,
    group_block_hashes,
)


def _event_ids() -> list[str]:
    if not CONFORMANCE_FILE.is_file():
        return ["vectors-missing"]
    return [
        case["id"]
        for case in load_vectors()["hash_cases"]
        if case["expected"].get("block_stored_event") is not None
    ]


def _case(vectors: dict[str, Any], case_id: str) -> dict[str, Any]:
    for case in vectors["hash_cases"]:
        if case["id"] == case_id:
            return dict(case)
    raise AssertionError(case_id)


def _event(raw: dict[str, Any]) -> BlockStored:
    fields = untag(raw)
    assert fields.pop("type") == "BlockStored"
    return BlockStored(**fields)


def _vector_event(case: dict[str, Any], max_blocks: int = 3) -> BlockStored:
    """The case's BlockStored event, or one built from its expected blocks (long inputs)."""
    raw = case["expected"].get("block_stored_event")
    if raw is not None:
        return _event(raw)
    blocks = case["expected"]["blocks"][:max_blocks]
    assert blocks, case["id"]
    assert case["inputs"]["lora"] is None
    assert not case["inputs"]["mm_features"]
    return BlockStored(
        block_hashes=[int(b["event_hash_int"]) for b in blocks],
        parent_block_hash=None,
        token_ids=case["inputs"]["token_ids"][: blocks[-1]["token_end"]],
        block_size=case["inputs"]["block_size"],
        medium="GPU",
        extra_keys=[untag(b["event_extra_keys"]) for b in blocks],
        group_idx=0,
    )


def _settings(inputs: dict[str, Any], **changes: Any) -> VllmHashSettings:
    settings = VllmHashSettings(
        inputs["hash_algo"],
        inputs["pythonhashseed"],
        inputs["block_size"],
        inputs["num_hash_lookahead_tokens"],
    )
    return dataclasses.replace(settings, **changes)


def _own_event(
    settings: VllmHashSettings,
    tokens: list[int],
    *,
    as_bytes: bool = False,
    lora: LoraSpec | None = None,
    cache_salt: str | None = None,
) -> BlockStored:
    """A BlockStored event as vLLM's block pool would emit it, from our own hasher."""
    blocks = block_hashes(settings, tokens, lora=lora, cache_salt=cache_salt)
    assert blocks
    return BlockStored(
        block_hashes=[b.digest if as_bytes else b.event_int for b in blocks],
        parent_block_hash=None,
        token_ids=tokens[: blocks[-1].token_end],
        block_size=settings.block_size,
        lora_id=None if lora is None else lora.int_id,
        medium="GPU",
        lora_name=None if lora is None else lora.name,
        extra_keys=[
            None if b.event_extra_keys is None else list(b.event_extra_keys) for b in blocks
        ],
        group_idx=0,
    )


TOKENS = [(i * 7919) % 150000 for i in range(64)]


# --- events from the vectors -------------------------------------------------------------


@pytest.mark.parametrize("case_id", _event_ids())
def test_vector_events_match_their_settings(vectors: dict[str, Any], case_id: str) -> None:
    case = _case(vectors, case_id)
    inputs = case["inputs"]
    event = _event(case["expected"]["block_stored_event"])
    lora_path = None if inputs["lora"] is None else inputs["lora"]["lora_path"]
    result = HashCheck(_settings(inputs)).check(event, lora_path=lora_path)
    if inputs["mm_features"]:
        assert result is None  # multimodal events are not checkable
        return
    assert result == HashCheckResult(
        ok=True,
        blocks_compared=len(event.block_hashes),
        hint=None,
        matched=_settings(inputs),
    )


@pytest.mark.parametrize(
    ("case_id", "configured", "expected_hint"),
    [
        (  # wrong seed
            "hash/sha256/seed=0/bs=16/len=48/plain",
            {"pythonhashseed": None},
            "events match hash_algo='sha256' with PYTHONHASHSEED='0'; "
            "configured hash_algo='sha256' with PYTHONHASHSEED unset",
        ),
        (  # seed set in the scorer but not in the pods
            "hash/sha256_cbor/seed=unset/bs=16/len=48/plain",
            {"pythonhashseed": "0"},
            "events match hash_algo='sha256_cbor' with PYTHONHASHSEED unset; "
            "configured hash_algo='sha256_cbor' with PYTHONHASHSEED='0'",
        ),
        (  # wrong algorithm
            "hash/sha256_cbor/seed=0/bs=16/len=48/plain",
            {"hash_algo": "sha256"},
            "events match hash_algo='sha256_cbor' with PYTHONHASHSEED='0'; "
            "configured hash_algo='sha256' with PYTHONHASHSEED='0'",
        ),
        (  # wrong algorithm and seed
            "hash/sha256_cbor/seed=0/bs=16/len=48/plain",
            {"hash_algo": "sha256", "pythonhashseed": None},
            "events match hash_algo='sha256_cbor' with PYTHONHASHSEED='0'; "
            "configured hash_algo='sha256' with PYTHONHASHSEED unset",
        ),
        (  # xxhash pods, sha256 scorer
            "hash/xxhash/seed=0/bs=16/len=48/plain",
            {"hash_algo": "sha256"},
            "events match hash_algo='xxhash' with PYTHONHASHSEED='0'; "
            "configured hash_algo='sha256' with PYTHONHASHSEED='0'",
        ),
        (  # wrong block size
            "hash/sha256/seed=unset/bs=64/len=1000/plain",
            {"block_size": 16},
            "events match hash_algo='sha256' with PYTHONHASHSEED unset and block_size=64; "
            "configured hash_algo='sha256' with PYTHONHASHSEED unset and block_size=16",
        ),
        (
            "hash/sha256/seed=0/bs=16/len=1000/plain",
            {"block_size": 64},
            "events match hash_algo='sha256' with PYTHONHASHSEED='0' and block_size=16; "
            "configured hash_algo='sha256' with PYTHONHASHSEED='0' and block_size=64",
        ),
        (  # lookahead hashing on in the pods, off in the scorer
            "hash/sha256/seed=0/bs=16/len=50/lookahead=1/plain",
            {"num_hash_lookahead_tokens": 0},
            "events match hash_algo='sha256' with PYTHONHASHSEED='0' and "
            "num_hash_lookahead_tokens=1; configured hash_algo='sha256' with "
            "PYTHONHASHSEED='0' and num_hash_lookahead_tokens=0",
        ),
    ],
)
def test_wrong_setting_is_named(
    vectors: dict[str, Any], case_id: str, configured: dict[str, Any], expected_hint: str
) -> None:
    case = _case(vectors, case_id)
    inputs = case["inputs"]
    event = _vector_event(case)
    result = HashCheck(_settings(inputs, **configured)).check(event)
    assert result is not None
    assert result.ok is False
    assert result.blocks_compared == len(event.block_hashes)
    assert result.hint is not None
    assert result.hint.startswith(expected_hint), result.hint
    assert result.matched == _settings(inputs)


def test_lora_event_needs_path_and_the_right_one(vectors: dict[str, Any]) -> None:
    case = _case(vectors, "hash/sha256_cbor/seed=12345/bs=16/len=64/lookahead=1/lora")
    inputs = case["inputs"]
    event = _event(case["expected"]["block_stored_event"])
    check = HashCheck(_settings(inputs))
    assert check.check(event) is None  # vLLM >= 0.31 hashes the path; events lack it
    good = check.check(event, lora_path=inputs["lora"]["lora_path"])
    assert good is not None
    assert good.ok
    bad = check.check(event, lora_path="/adapters/other")
    assert bad is not None
    assert not bad.ok
    assert bad.matched is None
    assert bad.hint is not None
    assert "LoRA path" in bad.hint


def test_cache_salt_from_event_or_argument(vectors: dict[str, Any]) -> None:
    case = _case(vectors, "hash/sha256/seed=0/bs=16/len=48/cache_salt")
    inputs = case["inputs"]
    event = _event(case["expected"]["block_stored_event"])
    check = HashCheck(_settings(inputs))
    result = check.check(event)  # the salt is read from the block-0 extra keys
    assert result is not None
    assert result.ok
    assert check.check(event, cache_salt=inputs["cache_salt"]) == result
    wrong = check.check(event, cache_salt="not-the-salt")
    assert wrong is not None
    assert not wrong.ok
    # events without extra keys (vLLM < 0.17): only the argument gives the salt
    bare = dataclasses.replace(event, extra_keys=None)
    unsalted = check.check(bare)
    assert unsalted is not None
    assert not unsalted.ok
    salted = check.check(bare, cache_salt=inputs["cache_salt"])
    assert salted is not None
    assert salted.ok


def test_multi_granularity_events(vectors: dict[str, Any]) -> None:
    for case in vectors["multi_granularity_cases"]:
        inputs = case["inputs"]
        event = _event(case["expected"]["block_stored_event"])
        fine = VllmHashSettings(
            inputs["hash_algo"], inputs["pythonhashseed"], inputs["hash_block_size"]
        )
        result = HashCheck(fine).check(event)
        assert result is not None
        assert result.ok, case["id"]
        assert result.blocks_compared == len(event.block_hashes)
        # configured with the group's block size: the chain granularity is named
        coarse = dataclasses.replace(fine, block_size=inputs["block_size"])
        wrong = HashCheck(coarse).check(event)
        assert wrong is not None
        assert not wrong.ok
        assert wrong.matched == fine
        assert wrong.hint is not None
        assert f"block_size={inputs['hash_block_size']};" in wrong.hint
        assert "vLLM chains the hashes in steps of" in wrong.hint


# --- events from our own hasher ----------------------------------------------------------


@pytest.mark.parametrize("as_bytes", [False, True])
def test_int_and_bytes_hashes(as_bytes: bool) -> None:
    actual = VllmHashSettings("xxhash_cbor", "12345", 16)
    event = _own_event(actual, TOKENS, as_bytes=as_bytes)
    ok = HashCheck(actual).check(event)
    assert ok == HashCheckResult(True, 4, None, actual)
    wrong = HashCheck(VllmHashSettings("xxhash", "12345", 16)).check(event)
    assert wrong is not None
    assert not wrong.ok
    assert wrong.matched == actual
    assert wrong.hint is not None
    assert wrong.hint.startswith("events match hash_algo='xxhash_cbor' with PYTHONHASHSEED='12345'")


def test_bytes_hash_compared_exactly() -> None:
    """A digest whose last 8 bytes match is still a different hash in bytes mode."""
    settings = VllmHashSettings()
    event = _own_event(settings, TOKENS, as_bytes=True)
    first = event.block_hashes[0]
    assert isinstance(first, bytes)
    forged = b"\x00" * 24 + first[-8:]
    result = HashCheck(settings).check(dataclasses.replace(event, block_hashes=[forged]))
    # token_ids no longer fit one block: not checkable; trim them to keep it checkable
    assert result is None
    single = dataclasses.replace(
        event, block_hashes=[forged], token_ids=event.token_ids[:16], extra_keys=[None]
    )
    result = HashCheck(settings).check(single)
    assert result is not None
    assert not result.ok


def test_lora_event_from_own_hasher() -> None:
    actual = VllmHashSettings("sha256", "0", 16)
    lora = LoraSpec("sql", 3, "/adapters/sql")
    event = _own_event(actual, TOKENS, lora=lora, cache_salt="salt")
    result = HashCheck(VllmHashSettings("sha256", None, 16)).check(event, lora_path=lora.path)
    assert result is not None
    assert not result.ok
    assert result.matched == actual


def test_nothing_reproduces_lists_what_was_tried() -> None:
    actual = VllmHashSettings("sha256", "777", 16)
    event = _own_event(actual, TOKENS)
    configured = VllmHashSettings("sha256_cbor", "12345", 16)
    result = HashCheck(configured).check(event)
    assert result is not None
    assert not result.ok
    assert result.matched is None
    hint = result.hint
    assert hint is not None
    assert hint.startswith("no tried setting reproduces the events")
    for tried in ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor", "'12345'", "'0'", "unset"):
        assert tried in hint
    assert "configured hash_algo='sha256_cbor' with PYTHONHASHSEED='12345'" in hint
    assert "\n" not in hint


def test_first_block_filter_keeps_the_search_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = hash_check_module.block_hashes

    def counting(settings: VllmHashSettings, tokens: Any, **kwargs: Any) -> Any:
        calls.append(len(tokens))
        return real(settings, tokens, **kwargs)

    monkeypatch.setattr(hash_check_module, "block_hashes", counting)
    tokens = [(i * 31) % 150000 for i in range(64 * 40)]
    event = _own_event(VllmHashSettings("sha256", "999", 64), tokens)
    result = HashCheck(VllmHashSettings("sha256_cbor", "0", 16)).check(event)
    assert result is not None
    assert not result.ok
    # the configured check hashes the whole event once; every alternative hashes at most
    # the tokens of the event's first block (plus lookahead)
    assert calls[0] == len(tokens)
    assert all(n <= 64 for n in calls[1:])
    assert len(calls) <= 1 + 4 * 3 * 3 * 2


def test_prefers_fewest_changed_settings() -> None:
    actual = VllmHashSettings("sha256", None, 16)
    event = _own_event(actual, TOKENS)
    # "0" differs in the seed only from the configured sha256/"0"
    result = HashCheck(VllmHashSettings("sha256", "0", 16)).check(event)
    assert result is not None
    assert result.matched == actual


def test_group_events_from_own_hasher() -> None:
    fine = VllmHashSettings("sha256_cbor", "0", 16)
    reported = group_block_hashes(fine, TOKENS, group_block_size=32)
    event = BlockStored(
        block_hashes=[b.event_int for b in reported],
        parent_block_hash=None,
        token_ids=TOKENS[:64],
        block_size=32,
        extra_keys=[None, None],
        group_idx=1,
    )
    result = HashCheck(fine).check(event)
    assert result is not None
    assert result.ok


# --- events that cannot be checked -------------------------------------------------------


def _base_event() -> BlockStored:
    return _own_event(VllmHashSettings(), TOKENS[:32])


@pytest.mark.parametrize(
    "changes",
    [
        {"parent_block_hash": 12345},  # does not start at block 0
        {"block_size": 0, "token_ids": []},  # placeholder offload store
        {"token_ids": []},
        {"block_hashes": []},
        {"token_ids": TOKENS[:31]},  # tokens do not fit the blocks
        {"extra_keys": [[["img", 3]], None]},  # multimodal
        {"extra_keys": [None]},  # one entry per block expected
        {"extra_keys": [["x"], ["y"]]},  # a bare string after block 0
        {"extra_keys": [[3], None]},  # an unknown key form
        {"lora_name": "sql", "lora_id": 1},  # LoRA without the adapter path
        {"lora_id": 1},  # LoRA int id only (vLLM < 0.14)
        {"block_hashes": [1.5, 2.5]},
        {"token_ids": [1.0] * 32},
        {"lookahead_token_ids": [[1], [2, 3]]},  # ragged lookahead
        {"lookahead_token_ids": [[1]]},  # one entry per block expected
    ],
)
def test_not_checkable(changes: dict[str, Any]) -> None:
    event = dataclasses.replace(_base_event(), **changes)
    assert HashCheck(VllmHashSettings()).check(event) is None


def test_lora_event_with_wrong_name_in_keys_not_checkable() -> None:
    lora = LoraSpec("sql", 1, "/p")
    event = _own_event(VllmHashSettings(), TOKENS[:32], lora=lora)
    check = HashCheck(VllmHashSettings())
    assert check.check(event, lora_path="/p") is not None
    renamed = dataclasses.replace(event, extra_keys=[["other"], ["other"]])
    assert check.check(renamed, lora_path="/p") is None
    missing = dataclasses.replace(event, extra_keys=[None, None])
    assert check.check(missing, lora_path="/p") is None


def test_settings_property() -> None:
    settings = VllmHashSettings("sha256_cbor", "0", 32)
    assert HashCheck(settings).settings is settings


def test_lora_path_must_be_a_string() -> None:
    event = _own_event(VllmHashSettings(), TOKENS[:32], lora=LoraSpec("sql", 1, "/p"))
    assert HashCheck(VllmHashSettings()).check(event, lora_path=123) is None  # type: ignore[arg-type]


def test_hint_lists_only_block_sizes_that_fit_the_event() -> None:
    event = _own_event(VllmHashSettings("sha256", "4242", 16), TOKENS[:32])
    result = HashCheck(VllmHashSettings("sha256", None, 64)).check(event)
    assert result is not None
    assert result.hint is not None
    assert "block_size 16;" in result.hint  # 64 cannot chain a 16-token event
