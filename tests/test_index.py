"""PrefixIndex: conformance scenarios, dual keys, tiers, capacity, speculation, orphans."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from builders import events_from_batch, stored

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.events import AllBlocksCleared, BlockRemoved, engine_key
from kvaware_scorer.index import PrefixIndex
from kvaware_scorer.keys import MultiModalItem


def _scenario_request(case: dict[str, Any], index: PrefixIndex, model: str) -> list[int]:
    inputs = case["inputs"]
    tokens = inputs["request_a_initial_token_ids"] + inputs["request_a_appended_token_ids"]
    lora = inputs["lora"]
    return index.keys(
        tokens,
        model,
        lora_name=lora["lora_name"] if lora else None,
        cache_salt=inputs["cache_salt"],
        mm_items=[
            MultiModalItem(m["identifier"], m["offset"], m["length"]) for m in inputs["mm_features"]
        ],
    )


def _block_size(case: dict[str, Any]) -> int:
    for step in case["steps"]:
        for event in (step["batch_input"] or {}).get("events", []):
            if event["type"] == "BlockStored":
                return int(event["block_size"])
    raise AssertionError("scenario has no BlockStored")


@pytest.mark.parametrize("case_no", range(4))
def test_scenarios_step_by_step(vectors: dict[str, Any], case_no: int) -> None:
    case = vectors["scenario_cases"][case_no]
    index = PrefixIndex(block_size=_block_size(case), default_model="m")
    keys = _scenario_request(case, index, "m")
    held: dict[int, int] = {}  # engine key -> stores not yet removed (ground truth)
    for step in case["steps"]:
        batch = step["batch_input"]
        if batch is None:
            continue
        events = events_from_batch(batch)
        index.apply("pod-a", events, rank=batch["data_parallel_rank"])
        # Ground truth, from the vLLM semantics: duplicates in one batch are two copies.
        seen_this_batch: set[int] = set()
        for event in events:
            if isinstance(event, AllBlocksCleared):
                held.clear()
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    held[engine_key(h)] -= 1
                    if not held[engine_key(h)]:
                        del held[engine_key(h)]
            else:
                for h in event.block_hashes:
                    ek = engine_key(h)
                    if ek not in held or ek in seen_this_batch:
                        held[ek] = held.get(ek, 0) + 1
                    seen_this_batch.add(ek)
        all_hashes = {engine_key(h) for e in events for h in getattr(e, "block_hashes", [])}
        for ek in all_hashes | set(held):
            assert index.holds("pod-a", ek) == (ek in held), (step["action"], ek)
        # End to end: the request's own keys match exactly the held prefix.
        result = index.match(keys, ["pod-a"])["pod-a"]
        assert result.matched_blocks == len(held), step["action"]
        assert result.total_blocks == len(keys)


def test_duplicate_scenario_keeps_block_until_second_removal(vectors: dict[str, Any]) -> None:
    case = next(c for c in vectors["scenario_cases"] if "duplicate" in c["id"])
    index = PrefixIndex(block_size=16)
    steps = [s for s in case["steps"] if s["batch_input"]]
    index.apply("p", events_from_batch(steps[0]["batch_input"]))
    first = events_from_batch(steps[0]["batch_input"])[0]
    index.apply("p", events_from_batch(steps[1]["batch_input"]))
    assert all(index.holds("p", h) for h in first.block_hashes)  # type: ignore[union-attr]
    index.apply("p", events_from_batch(steps[2]["batch_input"]))
    assert not any(index.holds("p", h) for h in first.block_hashes)  # type: ignore[union-attr]
    assert len(index) == 0


def test_reannounced_prefix_is_removed_by_one_eviction(vectors: dict[str, Any]) -> None:
    case = next(c for c in vectors["scenario_cases"] if "report_full" in c["id"])
    index = PrefixIndex(block_size=16, default_model="m")
    for step in case["steps"]:
        if step["batch_input"] and "evict" in step["action"]:
            index.apply("p", events_from_batch(step["batch_input"]))
            break
        if step["batch_input"]:
            index.apply("p", events_from_batch(step["batch_input"]))
    assert len(index) == 0, "a re-announcement must not count as a second copy"


def _chain(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    tokens = [rng.randrange(150_000) for _ in range(n * 16)]
    hashes = [rng.getrandbits(64) for _ in range(n)]
    return tokens, hashes


def test_match_longest_consecutive_prefix_and_drop_out() -> None:
    index = PrefixIndex(block_size=16, default_model="m")
    tokens, hashes = _chain(8)
    index.apply("a", [stored(hashes, tokens)])
    index.apply("b", [stored(hashes[:3], tokens[:48])])
    keys = index.keys(tokens, "m")
    result = index.match(keys)
    assert result["a"].matched_blocks == 8 and result["a"].score == 1.0
    assert result["b"].matched_blocks == 3 and result["b"].matched_tokens == 48
    assert result["b"].score == pytest.approx(3 / 8)
    # A middle block removed on a: a keeps only the blocks before it.
    index.apply("a", [BlockRemoved([hashes[4]], "GPU")])
    assert index.match(keys)["a"].matched_blocks == 4
    # Restricting candidates; unknown pods score zero.
    only = index.match(keys, ["b", "zzz"])
    assert set(only) == {"b", "zzz"} and only["zzz"].matched_blocks == 0
    # Another model never matches the same tokens.
    assert index.match(index.keys(tokens, "other"))["a"].matched_blocks == 0


def test_tiers_weighted_and_case_insensitive() -> None:
    index = PrefixIndex(block_size=16, default_model="m")
    tokens, hashes = _chain(4)
    index.apply("a", [stored(hashes[:2], tokens[:32], medium="GPU")])
    index.apply("a", [stored(hashes[2:], tokens[32:], parent=hashes[1], medium="cpu")])
    result = index.match(index.keys(tokens, "m"))["a"]
    assert result.matched_blocks == 4
    assert dict(result.blocks_by_tier) == {"gpu": 2, "cpu": 2}
    assert result.score == pytest.approx((2 * 1.0 + 2 * 0.8) / 4)
    # CPU removal leaves the GPU blocks.
    index.apply("a", [BlockRemoved([hashes[3]], "CPU")])
    assert index.match(index.keys(tokens, "m"))["a"].matched_blocks == 3


def test_placeholder_store_adds_tier_and_removal_keeps_other_tier() -> None:
    index = PrefixIndex(block_size=16, default_model="m")
    tokens, hashes = _chain(2)
    index.apply("a", [stored(hashes, tokens)])
    # Offload placeholder: no tokens, block_size 0, one hash.
    index.apply("a", [stored([hashes[0]], [], block_size=0, medium="CPU")])
    index.apply("a", [BlockRemoved([hashes[0]], "GPU")])
    result = index.match(index.keys(tokens, "m"))["a"]
    assert result.matched_blocks == 2
    assert dict(result.blocks_by_tier) == {"cpu": 1, "gpu": 1}
    index.apply("a", [stored([12345], [], block_size=0, medium="CPU")])
    assert index.counters["placeholder_unknown"] == 1


def test_named_tier_and_weights_config() -> None:
    index = PrefixIndex(
        block_size=16, default_model="m", tier_weights={"gpu": 1.0, "storage": 0.25}
    )
    tokens, hashes = _chain(2)
    index.apply("a", [stored(hashes, tokens, medium="STORAGE")])
    result = index.match(index.keys(tokens, "m"))["a"]
    assert dict(result.blocks_by_tier) == {"storage": 2}
    assert result.score == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="tier weight"):
        PrefixIndex(tier_weights={"gpu": 2.0})


@pytest.mark.parametrize(("engine", "index_size"), [(16, 64), (64, 16), (16, 32), (32, 16)])
def test_engine_and_index_block_sizes_may_differ(engine: int, index_size: int) -> None:
    rng = random.Random(7)
    tokens = [rng.randrange(1000) for _ in range(256)]
    n = len(tokens) // engine
    hashes = [rng.getrandbits(64) for _ in range(n)]
    index = PrefixIndex(block_size=index_size, default_model="m")
    # Deliver the chain in uneven events, each with its parent.
    cut = [0, 1, 4, n]
    for lo, hi in itertools.pairwise(cut):
        index.apply(
            "a",
            [
                stored(
                    hashes[lo:hi],
                    tokens[lo * engine : hi * engine],
                    block_size=engine,
                    parent=hashes[lo - 1] if lo else None,
                )
            ],
        )
    keys = index.keys(tokens, "m")
    assert index.match(keys)["a"].matched_blocks == len(tokens) // index_size
    # Evicting the last engine block removes the index blocks it covered.
    index.apply("a", [BlockRemoved([hashes[-1]])])
    expected = (len(tokens) - engine) // index_size
    assert index.match(keys)["a"].matched_blocks == expected


def test_incompatible_block_sizes_are_skipped_and_counted() -> None:
    index = PrefixIndex(block_size=24, default_model="m")
    tokens, hashes = _chain(2)
    index.apply("a", [stored(hashes, tokens)])
    assert len(index) == 0 and index.counters["skipped_block_size"] == 2


def test_multi_granularity_group_reports_coarse_blocks(vectors: dict[str, Any]) -> None:
    from builders import event_from_json

    for case in vectors["multi_granularity_cases"]:
        inputs = case["inputs"]
        event = event_from_json(case["expected"]["block_stored_event"])
        index = PrefixIndex(block_size=inputs["hash_block_size"], default_model="m")
        index.apply("a", [event])
        tokens = inputs["token_ids"]
        covered = len(event.token_ids)  # type: ignore[union-attr]
        result = index.match(index.keys(tokens, "m"))["a"]
        assert result.matched_blocks == covered // inputs["hash_block_size"], case["id"]


def test_sparse_and_non_prefix_groups_are_skipped() -> None:
    index = PrefixIndex(block_size=16, default_model="m")
    tokens, hashes = _chain(4)
    # Sliding window: fewer hashes than token blocks.
    index.apply("a", [stored(hashes[:2], tokens, group_idx=1)])
    index.apply("a", [stored(hashes, tokens, group_idx=2, kv_cache_spec_kind="mamba")])
    assert len(index) == 0
    assert index.counters["skipped_sparse"] == 2 and index.counters["skipped_group"] == 4
    index.apply("a", [stored(hashes, tokens, group_idx=0)])
    assert index.match(index.keys(tokens, "m"))["a"].matched_blocks == 4


def test_all_blocks_cleared_and_remove_pod() -> None:
    index = PrefixIndex(block_size=16, default_model="m")
    tokens, hashes = _chain(3)
    index.apply("a", [stored(hashes, tokens)], rank=0)
    index.apply("a", [stored(hashes, tokens)], rank=1)
    index.apply("b", [stored(hashes, tokens)])
    index.apply("a", [AllBlocksCleared()], rank=1)
    keys = index.keys(tokens, "m")
    assert index.match(keys)["a"].matched_blocks == 3  # rank 0 still holds it
    index.remove_pod("a")
    assert index.pods() == ["b"]
    assert index.match(keys)["b"].matched_blocks == 3
    index.clear_pod("b")
    assert len(index) == 0


def test_dp_ranks_report_best_rank() -> None:
    index = PrefixIndex(block_size=16, default_model="m")
    tokens, hashes = _chain(4)
    index.apply("a", [stored(hashes[:1], tokens[:16])], rank=0)
    index.apply("a", [stored(hashes, tokens)], rank=3)
    result = index.match(index.keys(tokens, "m"))["a"]
    assert result.matched_blocks == 4 and result.rank == 3


def test_lora_and_salt_namespaces() -> None:
    index = PrefixIndex(block_size=16, default_model="base")
    tokens, hashes = _chain(2)
    index.apply(
        "a",
        [
            stored(
                hashes, tokens, lora_name="sql", lora_id=1, extra_keys=[["sql", "salt-1"], ["sql"]]
            )
        ],
    )
    assert index.match(index.keys(tokens, "base"))["a"].matched_blocks == 0
    assert index.match(index.keys(tokens, "base", lora_name="sql"))["a"].matched_blocks == 0
    keys = index.keys(tokens, "base", lora_name="sql", cache_salt="salt-1")
    assert index.match(keys)["a"].matched_blocks == 2
    other_salt = index.keys(tokens, "base", lora_name="sql", cache_salt="salt-2")
    assert index.match(other_salt)["a"].matched_blocks == 0


def test_capacity_evicts_oldest_entries_of_that_pod_only() -> None:
    index = PrefixIndex(block_size=16, default_model="m", pod_capacity=64)
    tokens, hashes = _chain(100, seed=1)
    index.set_pod("small", capacity=32)
    for i in range(100):
        index.apply(
            "small",
            [
                stored(
                    [hashes[i]], tokens[i * 16 : (i + 1) * 16], parent=hashes[i - 1] if i else None
                )
            ],
        )
        index.apply(
            "big",
            [
                stored(
                    [hashes[i]], tokens[i * 16 : (i + 1) * 16], parent=hashes[i - 1] if i else None
                )
            ],
        )
    stats = index.stats()
    assert stats["pod_blocks"]["small"] <= 32
    assert stats["pod_blocks"]["big"] <= 64
    assert index.counters["evicted_capacity"] > 0
    # The newest blocks survive; the oldest were evicted, so no prefix from block 0.
    assert index.holds("small", hashes[99]) and not index.holds("small", hashes[0])


def test_global_cap_bounds_entries() -> None:
    index = PrefixIndex(block_size=16, default_model="m", max_entries=50)
    for pod in ("a", "b", "c"):
        tokens, hashes = _chain(40, seed=hash(pod) % 1000)
        index.apply(pod, [stored(hashes, tokens)])
    assert len(index) <= 50


def test_speculative_entries_score_then_confirm_or_expire() -> None:
    now = [100.0]
    index = PrefixIndex(block_size=16, default_model="m", clock=lambda: now[0])
    tokens, hashes = _chain(4)
    keys = index.keys(tokens, "m")
    index.add_speculative("a", keys)
    result = index.match(keys)["a"]
    assert result.matched_blocks == 4 and dict(result.blocks_by_tier) == {"speculative": 4}
    # An event confirms the first two blocks; the rest stay speculative.
    index.apply("a", [stored(hashes[:2], tokens[:32])])
    assert dict(index.match(keys)["a"].blocks_by_tier) == {"gpu": 2, "speculative": 2}
    now[0] += 2.5
    index.expire_speculative()
    assert index.match(keys)["a"].matched_blocks == 2
    assert index.stats()["speculative_keys"] == 0


def test_speculation_disabled_and_cleared_with_pod() -> None:
    index = PrefixIndex(block_size=16, default_model="m", speculative_ttl_s=0)
    tokens, _ = _chain(2)
    index.add_speculative("a", index.keys(tokens, "m"))
    assert len(index) == 0
    index2 = PrefixIndex(block_size=16, default_model="m")
    index2.add_speculative("a", index2.keys(tokens, "m"))
    index2.remove_pod("a")
    assert len(index2) == 0 and index2.stats()["speculative_keys"] == 0


def test_orphan_is_parked_then_resolved_when_parent_arrives() -> None:
    index = PrefixIndex(block_size=16, default_model="m")
    tokens, hashes = _chain(6)
    child = stored(hashes[3:], tokens[48:], parent=hashes[2])
    middle = stored(hashes[1:3], tokens[16:48], parent=hashes[0])
    index.apply("a", [child])
    index.apply("a", [middle])
    assert index.counters["orphans"] == 5
    assert index.stats()["orphans_pending"] == 5
    index.apply("a", [stored(hashes[:1], tokens[:16])])
    assert index.counters["orphans_resolved"] == 5
    assert index.match(index.keys(tokens, "m"))["a"].matched_blocks == 6


def test_orphan_buffer_is_bounded() -> None:
    index = PrefixIndex(block_size=16, default_model="m", max_orphan_blocks=4)
    tokens, hashes = _chain(10)
    for i in range(1, 10):
        index.apply(
            "a", [stored([hashes[i]], tokens[i * 16 : (i + 1) * 16], parent=hashes[i - 1] + 1)]
        )
    assert index.stats()["orphans_pending"] <= 4
    assert index.counters["orphans_dropped"] == 5


def test_bad_config_is_refused() -> None:
    with pytest.raises(ConfigError):
        PrefixIndex(pod_capacity=0)
    with pytest.raises(ConfigError):
        PrefixIndex(speculative_ttl_s=-1)
    with pytest.raises(Exception, match="block_size"):
        PrefixIndex(block_size=0)
