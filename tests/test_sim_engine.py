"""The simulated vLLM engine: block pool, scheduler, events, step time, profiles.

Real objects only: the engine, the wire codec and the prefix index. The optimised engine
is also checked against ``_ReferenceEngine`` below, a straightforward transliteration of
vLLM's scheduler and block pool (one Python iteration per request per step).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
)
from kvaware_scorer.index import PrefixIndex
from kvaware_scorer.sim import (
    PROFILES,
    EngineConfig,
    SimEngine,
    SimRequest,
    StepResult,
    StepTimeModel,
    profile,
)
from kvaware_scorer.sim.engine import generated_tokens
from kvaware_scorer.vllm_hash import LoraSpec, VllmHashSettings, block_hashes
from kvaware_scorer.wire import decode_payload, encode_batch

ZERO_TIME = StepTimeModel(0.01, 0.0, 0.0, 0.0)  # every step takes 10 ms


def engine(
    num_gpu_blocks: int = 64, *, step_time: StepTimeModel = ZERO_TIME, **kw: Any
) -> tuple[SimEngine, list[EventBatch]]:
    batches: list[EventBatch] = []
    config = EngineConfig(num_gpu_blocks=num_gpu_blocks, step_time=step_time, **kw)
    return SimEngine("pod", config, event_sink=batches.append), batches


def toks(n: int, base: int = 1000) -> list[int]:
    return list(range(base, base + n))


def run(eng: SimEngine, now: float = 0.0, max_steps: int = 100_000) -> float:
    """Step until idle; return the end time."""
    for _ in range(max_steps):
        if not eng.has_work():
            return now
        now += max(eng.step(now).duration_s, 1e-6)
    raise AssertionError("engine did not finish")


def flat(batches: list[EventBatch]) -> list[KVEvent]:
    return [e for b in batches for e in b.events]


def stored(events: list[KVEvent]) -> list[BlockStored]:
    return [e for e in events if isinstance(e, BlockStored)]


def removed(events: list[KVEvent]) -> list[int]:
    return [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]


# ------------------------------------------------------------------ step time and config


def test_step_time_arithmetic() -> None:
    model = StepTimeModel(0.01, 1e-4, 4e-5, 5e-8)
    assert model.step_time(0, 0, 0) == 0.01
    assert math.isclose(model.step_time(1000, 10, 100_000), 0.01 + 0.1 + 0.0004 + 0.005)
    assert math.isclose(model.prefill_tokens_per_s(), 10_000)
    assert math.isclose(model.itl_s(2, 1000), 0.01 + 2 * 4e-5 + 2000 * 5e-8)
    assert StepTimeModel(0, 0, 0, 0).prefill_tokens_per_s() == math.inf


@pytest.mark.parametrize(
    "field_name", ["base_s", "per_prefill_token_s", "per_decode_seq_s", "per_context_token_s"]
)
@pytest.mark.parametrize("value", [-1e-3, math.nan, math.inf, "1"])
def test_step_time_refuses_bad_coefficients(field_name: str, value: Any) -> None:
    kwargs: dict[str, Any] = dict.fromkeys(
        ("base_s", "per_prefill_token_s", "per_decode_seq_s", "per_context_token_s"), 0.0
    )
    kwargs[field_name] = value
    with pytest.raises(ConfigError, match=field_name):
        StepTimeModel(**kwargs)


def test_step_durations_follow_the_model() -> None:
    model = StepTimeModel(0.01, 1e-3, 1e-4, 1e-6)
    eng, _ = engine(step_time=model, max_num_batched_tokens=64, max_num_seqs=4)
    eng.add_request(SimRequest("a", toks(100), 3, 0.0))
    r1 = eng.step(0.0)
    assert (r1.prefill_tokens, r1.decode_seqs, r1.decode_context_tokens) == (64, 0, 0)
    assert math.isclose(r1.duration_s, 0.01 + 64e-3)
    r2 = eng.step(r1.end_s)
    assert (r2.prefill_tokens, r2.decode_seqs) == (36, 0)
    assert r2.first_tokens and r2.first_tokens[0].first_token_s == r2.end_s
    r3 = eng.step(r2.end_s)  # decodes the first output token: context 101 tokens
    assert (r3.prefill_tokens, r3.decode_seqs, r3.decode_context_tokens) == (0, 1, 101)
    assert math.isclose(r3.duration_s, 0.01 + 1e-4 + 101e-6)
    r4 = eng.step(r3.end_s)
    assert r4.decode_context_tokens == 102
    assert [r.request_id for r in r4.finished] == ["a"]
    req = r4.finished[0]
    assert (req.scheduled_s, req.finished_s, req.output_tokens) == (0.0, r4.end_s, 3)
    idle = eng.step(r4.end_s)
    assert idle.duration_s == 0.0 and not eng.has_work()
    assert math.isclose(
        eng.stats()["busy_s"], r1.duration_s + r2.duration_s + r3.duration_s + r4.duration_s
    )


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [
        ({"num_gpu_blocks": 0}, "num_gpu_blocks"),
        ({"num_gpu_blocks": -5}, "num_gpu_blocks"),
        ({"num_gpu_blocks": 1}, "num_gpu_blocks"),  # only the null block
        ({"num_gpu_blocks": 10.5}, "num_gpu_blocks"),
        ({"num_gpu_blocks": 10, "block_size": 0}, "block_size"),
        ({"num_gpu_blocks": 10, "block_size": True}, "block_size"),
        ({"num_gpu_blocks": 10, "max_num_seqs": 0}, "max_num_seqs"),
        ({"num_gpu_blocks": 10, "max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"num_gpu_blocks": 10, "max_num_batched_tokens": -1}, "max_num_batched_tokens"),
        (
            {"num_gpu_blocks": 10, "max_num_seqs": 64, "max_num_batched_tokens": 32},
            "max_num_batched_tokens",
        ),
        ({"num_gpu_blocks": 10, "hash_algo": "md5"}, "hash_algo"),
        ({"num_gpu_blocks": 10, "hash_algo": "xxhash", "pythonhashseed": None}, "pythonhashseed"),
        ({"num_gpu_blocks": 10, "max_model_len": 0}, "max_model_len"),
        ({"num_gpu_blocks": 10, "max_model_len": 10 * 16}, "max_model_len"),  # 9 usable
        ({"num_gpu_blocks": 10, "model": ""}, "model"),
        ({"num_gpu_blocks": 10, "step_time": 0.01}, "step_time"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, Any], field_name: str) -> None:
    with pytest.raises(ConfigError, match=field_name):
        EngineConfig(**kwargs)


def test_config_capacity_figures() -> None:
    config = EngineConfig(num_gpu_blocks=10)
    assert (config.usable_blocks, config.kv_capacity_tokens) == (9, 160)
    assert config.effective_max_model_len == 144
    assert EngineConfig(num_gpu_blocks=10, max_model_len=100).effective_max_model_len == 100


def test_profiles_are_calibrated() -> None:
    assert set(PROFILES) == {"qwen3-32b-2xh100", "llama-8b-1xh100"}
    qwen = profile("qwen3-32b-2xh100")
    assert (qwen.num_gpu_blocks, qwen.block_size, qwen.kv_capacity_tokens) == (19_208, 16, 307_328)
    # llm-d §8.1: ITL ~25 ms with ~28 sequences of ~7,700 tokens decoding per pod.
    assert 0.023 <= qwen.step_time.itl_s(28, 7_700) <= 0.027
    assert 8_000 <= qwen.step_time.prefill_tokens_per_s() <= 12_000
    llama = profile("llama-8b-1xh100")
    assert llama.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert llama.step_time.itl_s(28, 7_700) < qwen.step_time.itl_s(28, 7_700)
    assert llama.step_time.prefill_tokens_per_s() > qwen.step_time.prefill_tokens_per_s()
    for config in PROFILES.values():
        assert config.max_num_batched_tokens >= config.max_num_seqs
        SimEngine("x", config)  # constructible


def test_profile_overrides_and_errors() -> None:
    small = profile("qwen3-32b-2xh100", num_gpu_blocks=100, max_model_len=None)
    assert small.num_gpu_blocks == 100 and small.model == "Qwen/Qwen3-32B"
    with pytest.raises(ConfigError, match=r"llama-8b-1xh100, qwen3-32b-2xh100"):
        profile("gpt-5")
    with pytest.raises(ConfigError, match="num_gpu_block"):
        profile("llama-8b-1xh100", num_gpu_block=5)
    with pytest.raises(ConfigError, match="num_gpu_blocks"):
        profile("llama-8b-1xh100", num_gpu_blocks=0)


def test_add_request_refuses_what_vllm_refuses() -> None:
    eng, _ = engine(num_gpu_blocks=11)  # 10 usable blocks = 160 tokens
    with pytest.raises(ValueError, match="empty"):
        eng.add_request(SimRequest("a", [], 1, 0.0))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request(SimRequest("a", [1], 0, 0.0))
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request(SimRequest("a", toks(150), 11, 0.0))
    with pytest.raises(ValueError, match="2\\*\\*32"):
        eng.add_request(SimRequest("a", [2**40] * 16, 1, 0.0))
    eng.add_request(SimRequest("a", toks(150), 10, 0.0))
    with pytest.raises(ValueError, match="already"):
        eng.add_request(SimRequest("a", toks(5), 1, 0.0))
    run(eng)
    assert eng.stats()["requests_finished"] == 1
    eng.add_request(SimRequest("a", toks(5), 1, 0.0))  # the id is free again


# ------------------------------------------------------------------ prefix caching


def test_prefix_reuse_and_the_last_token_rule() -> None:
    eng, batches = engine()
    prompt = toks(40)  # 2 full blocks + 8 tokens
    h = eng.block_hashes(prompt)
    assert len(h) == 2
    a = SimRequest("a", prompt, 1, 0.0)
    eng.add_request(a)
    run(eng)
    assert a.cached_tokens == 0
    first = stored(flat(batches))
    assert [(e.block_hashes, e.parent_block_hash) for e in first] == [(h, None)]
    assert first[0].token_ids == prompt[:32]
    assert eng.cached_block_hashes() == set(h)  # freed, still cached

    batches.clear()
    b = SimRequest("b", prompt[:32] + toks(3, 5000), 1, 1.0)  # shares both full blocks
    eng.add_request(b)
    run(eng, 1.0)
    assert b.cached_tokens == 32
    assert stored(flat(batches)) == []  # hits are not announced; 35 tokens fill no new block

    batches.clear()
    aligned = SimRequest("c", prompt[:32], 1, 2.0)  # the whole prompt is cached
    eng.add_request(aligned)
    run(eng, 2.0)
    assert aligned.cached_tokens == 16  # the last token (so its block) is recomputed
    again = stored(flat(batches))
    assert [(e.block_hashes, e.parent_block_hash) for e in again] == [([h[1]], h[0])]
    assert eng.cached_hash_counts() == {h[0]: 1, h[1]: 2}  # a duplicate copy
    stats = eng.stats()
    assert stats["prompt_tokens"] == 40 + 35 + 32
    assert stats["cached_tokens"] == 48
    assert math.isclose(stats["hit_rate"], 48 / 107)
    assert stats["duplicate_stores"] == 1


def test_lora_and_salt_never_share_and_carry_vllm_event_extra_keys() -> None:
    eng, batches = engine()
    prompt = toks(33)
    variants: list[tuple[str | None, str | None]] = [
        (None, None),
        ("adapter-a", None),
        ("adapter-b", None),
        (None, "tenant-1"),
        ("adapter-a", "tenant-1"),
    ]
    hashes = [eng.block_hashes(prompt, lora_name=lo, cache_salt=sa) for lo, sa in variants]
    assert len({h for hs in hashes for h in hs}) == 2 * len(variants)
    for i, (lora, salt) in enumerate(variants):
        req = SimRequest(f"r{i}", prompt, 1, 0.0, lora, salt)
        eng.add_request(req)
    run(eng)
    requests_events = stored(flat(batches))
    assert all(e.parent_block_hash is None and len(e.block_hashes) == 2 for e in requests_events)
    forms = {(e.lora_name, str(e.extra_keys)) for e in requests_events}
    assert forms == {
        (None, "[None, None]"),
        ("adapter-a", "[['adapter-a'], ['adapter-a']]"),
        ("adapter-b", "[['adapter-b'], ['adapter-b']]"),
        (None, "[['tenant-1'], None]"),
        ("adapter-a", "[['adapter-a', 'tenant-1'], ['adapter-a']]"),
    }
    for e in requests_events:
        assert (e.lora_id, e.medium, e.group_idx, e.block_size) == (None, "GPU", 0, 16)
    # Each variant hits only its own blocks.
    for i, (lora, salt) in enumerate(variants):
        req = SimRequest(f"again{i}", prompt, 1, 1.0, lora, salt)
        eng.add_request(req)
        run(eng, 1.0)
        assert req.cached_tokens == 32


def test_vllm_exact_hashes() -> None:
    prompt = toks(50, 7)
    for algo, seed in [("sha256", "0"), ("sha256_cbor", None), ("xxhash", "42")]:
        eng, batches = engine(hash_algo=algo, pythonhashseed=seed)
        settings = VllmHashSettings(algo, seed, 16)
        lora = LoraSpec("sql-lora", 1, "/adapters/sql")
        expected = block_hashes(settings, prompt, lora=lora, cache_salt="t")
        got = eng.block_hashes(prompt, lora_name="sql-lora", cache_salt="t", lora_path=lora.path)
        assert got == [b.event_int for b in expected]
        assert eng.block_hashes(prompt) == [b.event_int for b in block_hashes(settings, prompt)]
        eng.add_request(SimRequest("a", prompt, 20, 0.0, "sql-lora", "t", lora.path))
        run(eng)
        events = stored(flat(batches))
        assert events[0].block_hashes == got
        assert events[0].extra_keys == [list(b.event_extra_keys or ()) for b in expected]
        # generated blocks keep chaining with vLLM's hash
        out = generated_tokens("a", 20)
        full = block_hashes(settings, prompt + out[:19], lora=lora, cache_salt="t")
        assert eng.cached_block_hashes() == {b.event_int for b in full}


# ------------------------------------------------------------------ eviction order


def test_lru_eviction_order_tail_first_and_touch() -> None:
    eng, batches = engine(num_gpu_blocks=7)  # usable blocks 1..6
    a, b = toks(32, 100), toks(32, 200)
    ha, hb = eng.block_hashes(a), eng.block_hashes(b)
    eng.add_request(SimRequest("a", a, 1, 0.0))  # blocks 1, 2; freed as 2, 1
    run(eng)
    eng.add_request(SimRequest("b", b, 1, 1.0))  # blocks 3, 4; freed as 4, 3
    run(eng, 1.0)
    assert eng.kv_usage == 0.0
    batches.clear()
    c = toks(64, 300)  # needs 4 blocks: 5, 6 (never cached), then A's tail, then A's head
    hc = eng.block_hashes(c)
    eng.add_request(SimRequest("c", c, 1, 2.0))
    eng.step(2.0)
    events = flat(batches)
    assert removed(events) == [ha[1], ha[0]]
    assert isinstance(events[0], BlockRemoved) and isinstance(events[1], BlockRemoved)
    assert events[0].medium == "GPU" and events[0].group_idx == 0
    assert isinstance(events[2], BlockStored) and events[2].block_hashes == hc
    assert eng.cached_block_hashes() == set(hb) | set(hc)
    assert eng.stats()["evictions"] == 2
    # Free queue now: B's 4, 3, then C's blocks tail first. D hits B's head block (3):
    # touching it takes it out of the queue, so B's tail (4) and C's tail go instead.
    batches.clear()
    d = b[:16] + toks(20, 400)
    hd = eng.block_hashes(d)
    req = SimRequest("d", d, 1, 3.0)
    eng.add_request(req)
    eng.step(3.0)
    events = flat(batches)
    assert req.cached_tokens == 16
    assert removed(events) == [hb[1], hc[3]]
    assert [(e.block_hashes, e.parent_block_hash) for e in stored(events)] == [([hd[1]], hb[0])]
    assert events.index(stored(events)[0]) == 2  # evictions come before the store


def test_duplicates_in_one_step_are_stored_and_removed_twice() -> None:
    eng, batches = engine(num_gpu_blocks=9)  # 8 usable blocks
    prompt = toks(32)
    h = eng.block_hashes(prompt)
    eng.add_request(SimRequest("x", prompt, 1, 0.0))
    eng.add_request(SimRequest("y", prompt, 1, 0.0))
    eng.step(0.0)
    assert len(batches) == 1
    # x caches both blocks at scheduling time; y, admitted later in the same step, hits
    # block 0 and recomputes block 1 (last-token rule): h1 is stored twice in one batch.
    assert [(e.block_hashes, e.parent_block_hash) for e in stored(batches[0].events)] == [
        (h, None),
        ([h[1]], h[0]),
    ]
    assert eng.cached_hash_counts() == {h[0]: 1, h[1]: 2}
    index = PrefixIndex(block_size=16, default_model="sim-model")
    index.apply("pod", batches[0].events)
    batches.clear()
    # Fill the pool with unrelated prompts until both copies of h1 are evicted.
    eng.add_request(SimRequest("z", toks(7 * 16 + 1, 9000), 1, 1.0))
    run(eng, 1.0)
    gone = removed(flat(batches))
    assert gone.count(h[1]) == 2 and gone.count(h[0]) == 1
    first_removal = next(i for i, e in enumerate(flat(batches)) if isinstance(e, BlockRemoved))
    events = flat(batches)
    index.apply("pod", events[: first_removal + 1])
    assert index.holds("pod", h[1])  # one copy is left
    index.apply("pod", events[first_removal + 1 :])
    assert not index.holds("pod", h[1]) and not index.holds("pod", h[0])


def test_shared_prefix_in_one_step_is_hit_not_duplicated() -> None:
    eng, batches = engine()
    shared = toks(48)
    eng.add_request(SimRequest("x", [*shared, 1], 1, 0.0))
    y = SimRequest("y", [*shared, 2, 3], 1, 0.0)
    eng.add_request(y)
    eng.step(0.0)
    assert y.cached_tokens == 48  # blocks are cached when scheduled, as vLLM does
    assert len(stored(batches[0].events)) == 1
    assert eng.stats()["duplicate_stores"] == 0


def test_generated_token_blocks_are_cached_and_announced() -> None:
    eng, batches = engine()
    prompt = toks(20)
    req = SimRequest("g", prompt, 30, 0.0)
    eng.add_request(req)
    run(eng)
    out = generated_tokens("g", 30)
    assert req.output_token_ids == out and req.output_tokens == 30
    everything = prompt + out[:29]  # the last sampled token is never computed
    h = eng.block_hashes(everything)
    assert len(h) == 3
    events = stored(flat(batches))
    assert [(e.block_hashes, e.parent_block_hash) for e in events] == [
        ([h[0]], None),
        ([h[1]], h[0]),
        ([h[2]], h[1]),
    ]
    assert events[1].token_ids == everything[16:32]
    assert eng.cached_block_hashes() == set(h)
    # A follow-up turn (prompt + answer) finds all three blocks.
    assert eng.cached_prefix_blocks([*prompt, *out, 5, 6]) == 3
    assert eng.cached_prefix_blocks(toks(40, 77)) == 0


# ------------------------------------------------------------------ scheduling


def test_chunked_prefill_spans_steps_within_the_budget() -> None:
    eng, batches = engine(max_num_batched_tokens=64, max_num_seqs=4)
    prompt = toks(200)
    h = eng.block_hashes(prompt)
    long_req = SimRequest("long", prompt, 2, 0.0)
    short = SimRequest("short", toks(10, 5000), 1, 0.0)
    eng.add_request(long_req)
    eng.add_request(short)
    results: list[StepResult] = []
    now = 0.0
    while eng.has_work():
        results.append(eng.step(now))
        now = results[-1].end_s
    assert [r.prefill_tokens for r in results[:4]] == [64, 64, 64, 18]  # 8 + short's 10
    assert long_req.first_token_s == results[3].end_s
    assert short.first_token_s == results[3].end_s  # admitted once budget was left
    assert long_req.scheduled_s == 0.0 and short.scheduled_s == results[3].start_s
    assert results[4].decode_seqs == 1 and results[4].prefill_tokens == 0
    chain = [(e.block_hashes, e.parent_block_hash) for b in batches[:3] for e in b.events]
    assert chain == [(h[0:4], None), (h[4:8], h[3]), (h[8:12], h[7])]


def test_max_num_seqs_caps_the_running_set() -> None:
    eng, _ = engine(max_num_seqs=2, max_num_batched_tokens=64)
    reqs = [SimRequest(f"r{i}", toks(8, 100 * i), 3 + 2 * i, 0.0) for i in range(3)]
    for req in reqs:
        eng.add_request(req)
    first = eng.step(0.0)
    assert (eng.num_running, eng.num_waiting) == (2, 1)
    assert first.scheduled_seqs == 2
    now = first.end_s
    while reqs[0].finished_s is None:
        now = eng.step(now).end_s
        assert eng.num_running <= 2
    assert reqs[2].scheduled_s is None
    now = eng.step(now).end_s
    assert reqs[2].scheduled_s is not None
    run(eng, now)
    assert all(r.output_tokens == r.max_tokens for r in reqs)


def test_preemption_under_block_pressure_and_recovery() -> None:
    # 8 usable blocks; two requests that would need 5 blocks each by the end.
    eng, batches = engine(num_gpu_blocks=9, max_num_seqs=4, max_num_batched_tokens=64)
    first = SimRequest("first", toks(30, 100), 50, 0.0)
    second = SimRequest("second", toks(30, 300), 50, 0.0)
    eng.add_request(first)
    eng.add_request(second)
    preempted: list[str] = []
    now = 0.0
    while eng.has_work():
        result = eng.step(now)
        preempted += [r.request_id for r in result.preempted]
        if result.preempted:
            assert eng.num_waiting >= 1 and result.prefill_tokens == 0
        now = result.end_s
    assert preempted and set(preempted) == {"second"}  # the most recently admitted one
    assert first.preemptions == 0 and second.preemptions == len(preempted)
    for req in (first, second):
        assert req.output_tokens == 50
        assert req.output_token_ids == generated_tokens(req.request_id, 50)
    assert second.cached_tokens == 0  # recorded at the first admission only
    assert first.finished_s is not None and second.finished_s is not None
    assert first.finished_s < second.finished_s
    stats = eng.stats()
    assert stats["preemptions"] == len(preempted)
    assert stats["prefix_cache_hits"] > 0  # the re-admission hit its own freed blocks
    # The engine still holds exactly what a ref-counting reader of its events would.
    counts: dict[int, int] = {}
    for event in flat(batches):
        apply_refcount(counts, event)
    assert counts == eng.cached_hash_counts()


def test_decoding_request_preempts_the_newest_and_it_resumes_where_it_was() -> None:
    eng, _ = engine(num_gpu_blocks=7, max_num_seqs=3, max_num_batched_tokens=64)
    reqs = [SimRequest(f"r{i}", toks(20, 1000 * i), 40, 0.0) for i in range(3)]
    for req in reqs:
        eng.add_request(req)
    run(eng)
    assert reqs[0].preemptions == 0
    assert reqs[2].preemptions >= 1
    for req in reqs:
        assert req.output_token_ids == generated_tokens(req.request_id, 40)
        assert req.first_token_s is not None and req.finished_s is not None


def test_kv_usage_counts_blocks_in_use() -> None:
    eng, _ = engine(num_gpu_blocks=11)
    eng.add_request(SimRequest("a", toks(40), 100, 0.0))
    eng.step(0.0)
    assert math.isclose(eng.kv_usage, 3 / 10)  # 41 tokens after sampling -> 3 blocks
    run(eng)
    assert eng.kv_usage == 0.0
    assert eng.stats()["kv_usage"] == 0.0


def test_reset_prefix_cache_refused_while_blocks_are_in_use() -> None:
    eng, batches = engine()
    prompt = toks(40)
    eng.add_request(SimRequest("a", prompt, 5, 0.0))
    eng.step(0.0)
    n = len(batches)
    assert eng.reset_prefix_cache() is False
    assert len(batches) == n and eng.cached_block_hashes()
    end = run(eng)
    index = PrefixIndex(block_size=16, default_model="sim-model")
    for batch in batches:
        index.apply("pod", batch.events)
    assert index.holds("pod", eng.block_hashes(prompt)[0])
    assert eng.reset_prefix_cache(now_s=end + 1) is True
    assert batches[-1].events == [AllBlocksCleared()] and batches[-1].ts == end + 1
    index.apply("pod", batches[-1].events)
    assert not index.holds("pod", eng.block_hashes(prompt)[0])
    assert eng.cached_block_hashes() == set() and eng.cached_hash_counts() == {}
    again = SimRequest("b", prompt, 1, end + 2)
    eng.add_request(again)
    batches.clear()
    run(eng, end + 2)
    assert again.cached_tokens == 0
    assert removed(flat(batches)) == []  # nothing cached is left to evict
    assert eng.stats()["resets"] == 1


# ------------------------------------------------------------------ events, index, truth


def apply_refcount(counts: dict[int, int], event: KVEvent) -> None:
    """A consumer that reference-counts every store (what the engine's truth is)."""
    if isinstance(event, BlockStored):
        for h in event.block_hashes:
            assert isinstance(h, int)
            counts[h] = counts.get(h, 0) + 1
    elif isinstance(event, BlockRemoved):
        for h in event.block_hashes:
            assert isinstance(h, int)
            counts[h] -= 1
            if not counts[h]:
                del counts[h]
    else:
        counts.clear()


@dataclass
class _Workload:
    """Seeded random traffic with shared prefixes, LoRA, salts and identical pairs."""

    seed: int
    aligned_prompts: bool = False  # allow block-aligned prompts (cross-step duplicates)
    pairs: bool = True  # add identical block-aligned pairs at random times
    prompts: list[tuple[list[int], str | None, str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.prefixes = [
            [self.rng.randrange(5000) for _ in range(self.rng.randrange(8, 90))] for _ in range(8)
        ]
        self.count = 0

    def arrivals(self, now: float) -> list[SimRequest]:
        rng = self.rng
        out: list[SimRequest] = []
        if rng.random() < 0.35:
            prompt = rng.choice(self.prefixes) + [
                rng.randrange(5000) for _ in range(rng.randrange(40))
            ]
            if not self.aligned_prompts and len(prompt) % 16 == 0:
                prompt.append(7)
            lora = rng.choice([None, None, "adapter-a"])
            salt = rng.choice([None, None, None, "tenant-1"])
            out.append(SimRequest(f"q{self.count}", prompt, rng.randrange(1, 200), now, lora, salt))
            self.prompts.append((prompt, lora, salt))
        if self.pairs and rng.random() < 0.04:
            out += self.pair(now)
        self.count += 1
        return out

    def pair(self, now: float) -> list[SimRequest]:
        """Two requests with one identical, block-aligned prompt that is never reused."""
        rng = self.rng
        prompt = [rng.randrange(5000, 9000) for _ in range(16 * rng.randrange(1, 4))]
        self.count += 1
        return [
            SimRequest(f"pair{self.count}{twin}", prompt, rng.randrange(1, 30), now)
            for twin in "ab"
        ]


def test_events_round_trip_and_index_agrees_with_engine_truth() -> None:
    index = PrefixIndex(block_size=16, default_model="sim-model")
    counts: dict[int, int] = {}
    held_since: dict[int, int] = {}  # hash -> batch number of its first live copy
    cross_step_duplicates = 0
    same_step_duplicates = 0
    batch_no = 0

    def sink(batch: EventBatch) -> None:
        nonlocal batch_no, cross_step_duplicates, same_step_duplicates
        batch_no += 1
        payload = encode_batch(batch)
        decoded = decode_payload(payload)
        assert decoded == batch  # unchanged through the wire
        assert decoded.data_parallel_rank == 0
        for event in decoded.events:
            if isinstance(event, BlockStored):
                for h in event.block_hashes:
                    assert isinstance(h, int)
                    if counts.get(h):
                        if held_since[h] == batch_no:
                            same_step_duplicates += 1
                        else:
                            cross_step_duplicates += 1
                    else:
                        held_since[h] = batch_no
            apply_refcount(counts, event)
        index.apply("pod", decoded.events, rank=decoded.data_parallel_rank)

    config = EngineConfig(
        num_gpu_blocks=121, max_num_seqs=16, max_num_batched_tokens=96, step_time=ZERO_TIME
    )
    eng = SimEngine("pod", config, event_sink=sink)
    # Pairs are sent to an idle engine, so both twins are admitted in the same step (a
    # twin admitted a step later would be a cross-step duplicate; see the xfail below).
    workload = _Workload(seed=11, pairs=False)
    now = 0.0
    for step in range(4000):
        arrivals = workload.arrivals(now)
        if step % 250 == 249:
            now = run(eng, now)
            arrivals += workload.pair(now)
        for req in arrivals:
            eng.add_request(req)
        now = eng.step(now).end_s + 1e-3
        truth = eng.cached_block_hashes()
        assert counts == eng.cached_hash_counts()
        assert index.stats()["pod_blocks"].get("pod", 0) == len(truth)
        assert all(index.holds("pod", h) for h in truth)
        for prompt, lora, salt in workload.rng.sample(
            workload.prompts, min(3, len(workload.prompts))
        ):
            keys = index.keys(prompt, "sim-model", lora_name=lora, cache_salt=salt)
            matched = index.match(keys, ["pod"])["pod"].matched_blocks
            assert matched == eng.cached_prefix_blocks(prompt, lora_name=lora, cache_salt=salt)
    stats = eng.stats()
    assert stats["evictions"] > 1000 and stats["preemptions"] > 100
    assert same_step_duplicates > 5 and cross_step_duplicates == 0
    assert stats["duplicate_stores"] == same_step_duplicates
    assert stats["requests_finished"] > 300


def test_cross_step_duplicate_is_kept_by_the_index() -> None:
    """A cached two-block prompt sent again recomputes its last block (vLLM's last-token
    rule) and stores a second copy of it in a later step; the index must count that copy,
    and must still hold the hash after the first copy is evicted, exactly as the engine."""
    eng, batches = engine(num_gpu_blocks=16)
    prompt = toks(32)
    h0, h1 = eng.block_hashes(prompt)[:2]
    eng.add_request(SimRequest("a", prompt, 1, 0.0))
    now = run(eng)
    eng.add_request(SimRequest("b", prompt, 1, now + 1.0))
    now = run(eng, now + 1.0)
    assert eng.cached_hash_counts()[h1] == 2
    index = PrefixIndex(block_size=16, default_model="sim-model")
    for batch in batches:
        index.apply("pod", batch.events)
    # The engine evicts one copy of h1: the index must keep the hash while a copy remains.
    index.apply("pod", [BlockRemoved([h1], "GPU", 0)])
    assert index.holds("pod", h1) and index.holds("pod", h0)
    index.apply("pod", [BlockRemoved([h1], "GPU", 0)])
    assert not index.holds("pod", h1)


def _trace(seed: int, aligned: bool) -> tuple[list[bytes], dict[str, Any], list[tuple[Any, ...]]]:
    batches: list[EventBatch] = []
    config = EngineConfig(
        num_gpu_blocks=61,
        max_num_seqs=8,
        max_num_batched_tokens=80,
        step_time=StepTimeModel(0.005, 1e-4, 1e-4, 1e-6),
    )
    eng = SimEngine("pod", config, event_sink=batches.append)
    workload = _Workload(seed=seed, aligned_prompts=aligned)
    requests: list[SimRequest] = []
    now = 0.0
    for _ in range(1500):
        for req in workload.arrivals(now):
            eng.add_request(req)
            requests.append(req)
        now = eng.step(now).end_s + 1e-3
    now = run(eng, now)
    outcome = [
        (r.request_id, r.cached_tokens, r.scheduled_s, r.first_token_s, r.finished_s,
         r.preemptions, r.output_tokens, tuple(r.output_token_ids))
        for r in requests
    ]  # fmt: skip
    return [encode_batch(b) for b in batches], eng.stats(), outcome


def test_determinism_same_inputs_same_outputs() -> None:
    first = _trace(5, aligned=True)
    second = _trace(5, aligned=True)
    assert first == second
    assert first[0] != _trace(6, aligned=True)[0]


# ------------------------------------------------------------------ reference model


class _ReferenceEngine:
    """vLLM's v1 scheduler and block pool, transliterated without any optimisation.

    One loop iteration per running request per step, hashes recomputed from the full
    token list, the duplicate map as vLLM's ``{hash: {block_id: block}}``.
    """

    def __init__(self, config: EngineConfig, hasher: SimEngine, sink: Callable[[EventBatch], None]):
        self.B = config.block_size
        self.budget = config.max_num_batched_tokens
        self.max_seqs = config.max_num_seqs
        self.model = config.step_time
        n = config.num_gpu_blocks
        self.hash_of: list[int | None] = [None] * n
        self.ref = [0] * n
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, n))
        self.cached: dict[int, dict[int, None]] = {}
        self.events: list[KVEvent] = []
        self.waiting: deque[dict[str, Any]] = deque()
        self.running: list[dict[str, Any]] = []
        self.hasher = hasher
        self.sink = sink

    def add_request(self, req: SimRequest) -> None:
        self.waiting.append(
            {"req": req, "tokens": list(req.token_ids), "P": len(req.token_ids), "blocks": [],
             "computed": 0, "ncached": 0, "decoding": False, "seen": False,
             "out": generated_tokens(req.request_id, req.max_tokens)}
        )  # fmt: skip

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def hashes(self, st: dict[str, Any]) -> list[int]:
        req = st["req"]
        return self.hasher.block_hashes(
            st["tokens"], lora_name=req.lora_name, cache_salt=req.cache_salt
        )

    def find_hits(self, st: dict[str, Any]) -> list[int]:
        hits = []
        for h in self.hashes(st)[: (len(st["tokens"]) - 1) // self.B]:
            if h not in self.cached:
                break
            hits.append(next(iter(self.cached[h])))
        return hits

    def allocate(self, st: dict[str, Any], num_new: int, hits: list[int]) -> bool:
        need = st["computed"] + len(hits) * self.B + num_new
        new = -(-need // self.B) - len(hits) - len(st["blocks"])
        if new + sum(1 for b in hits if self.ref[b] == 0) > len(self.free):
            return False
        for b in hits:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        if hits:
            st["blocks"] += hits
            st["ncached"] = len(hits)
        for _ in range(max(new, 0)):
            b, _ = self.free.popitem(last=False)
            h = self.hash_of[b]
            if h is not None:
                del self.cached[h][b]
                if not self.cached[h]:
                    del self.cached[h]
                self.hash_of[b] = None
                self.events.append(BlockRemoved([h], "GPU", 0))
            self.ref[b] = 1
            st["blocks"].append(b)
        full = min(need, len(st["tokens"])) // self.B
        start = st["ncached"]
        if full > start:
            hs = self.hashes(st)[:full]
            for b, h in zip(st["blocks"][start:full], hs[start:], strict=True):
                self.hash_of[b] = h
                self.cached.setdefault(h, {})[b] = None
            req = st["req"]
            lora = req.lora_name
            extra: list[Any] = []
            for i in range(start, full):
                keys = [k for k in (lora, req.cache_salt if i == 0 else None) if k]
                extra.append(keys or None)
            self.events.append(
                BlockStored(hs[start:], hs[start - 1] if start else None,
                            st["tokens"][start * self.B : full * self.B], self.B, None, "GPU",
                            lora, extra, 0)
            )  # fmt: skip
            st["ncached"] = full
        return True

    def free_request(self, st: dict[str, Any]) -> None:
        for b in reversed(st["blocks"]):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
        st["blocks"] = []
        st["ncached"] = 0

    def step(self, now: float) -> StepResult:
        budget = self.budget
        scheduled: list[tuple[dict[str, Any], int]] = []
        preempted: list[SimRequest] = []
        i = 0
        while i < len(self.running) and budget > 0:
            st = self.running[i]
            num_new = min(len(st["tokens"]) - st["computed"], budget)
            ok = True
            while not self.allocate(st, num_new, []):
                victim = self.running.pop()
                self.free_request(victim)
                victim["computed"] = 0
                victim["decoding"] = False
                victim["req"].preemptions += 1
                victim["req"].output_tokens = len(victim["tokens"]) - victim["P"]
                self.waiting.appendleft(victim)
                preempted.append(victim["req"])
                if victim is st:
                    ok = False
                    break
            if not ok:
                break
            scheduled.append((st, num_new))
            budget -= num_new
            i += 1
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
                st = self.waiting[0]
                hits = self.find_hits(st)
                num_new = min(len(st["tokens"]) - len(hits) * self.B, budget)
                if not self.allocate(st, num_new, hits):
                    break
                self.waiting.popleft()
                self.running.append(st)
                st["computed"] = len(hits) * self.B
                if not st["seen"]:
                    st["seen"] = True
                    st["req"].cached_tokens = len(hits) * self.B
                    st["req"].scheduled_s = now
                scheduled.append((st, num_new))
                budget -= num_new
        decoders = [st for st, _ in scheduled if st["decoding"]]
        prefill = sum(n for st, n in scheduled if not st["decoding"])
        context = sum(len(st["tokens"]) for st in decoders)
        duration = self.model.step_time(prefill, len(decoders), context) if scheduled else 0.0
        end = now + duration
        first: list[SimRequest] = []
        finished: list[SimRequest] = []
        for st, n in scheduled:
            st["computed"] += n
            if st["computed"] < len(st["tokens"]):
                continue
            req = st["req"]
            st["tokens"].append(st["out"][len(st["tokens"]) - st["P"]])
            req.output_tokens = len(st["tokens"]) - st["P"]
            if req.first_token_s is None:
                req.first_token_s = end
                first.append(req)
            if req.output_tokens == req.max_tokens:
                req.finished_s = end
                req.output_token_ids = st["out"]
                finished.append(req)
                self.free_request(st)
                self.running.remove(st)
            else:
                st["decoding"] = True
        if self.events:
            self.sink(EventBatch(end, self.events, 0))
            self.events = []
        return StepResult(now, duration, prefill, len(decoders), first, finished, context,
                          len(scheduled), preempted)  # fmt: skip


@pytest.mark.parametrize(("seed", "aligned"), [(1, False), (2, True), (3, True)])
def test_engine_matches_the_reference_scheduler(seed: int, aligned: bool) -> None:
    config = EngineConfig(
        num_gpu_blocks=61,
        max_num_seqs=8,
        max_num_batched_tokens=80,
        step_time=StepTimeModel(0.005, 1e-4, 1e-4, 1e-6),
    )
    fast_batches: list[EventBatch] = []
    ref_batches: list[EventBatch] = []
    fast = SimEngine("pod", config, event_sink=fast_batches.append)
    ref = _ReferenceEngine(config, SimEngine("hasher", config), ref_batches.append)
    load_a, load_b = (
        _Workload(seed, aligned_prompts=aligned),
        _Workload(seed, aligned_prompts=aligned),
    )
    fast_reqs: list[SimRequest] = []
    ref_reqs: list[SimRequest] = []
    now_a = now_b = 0.0
    for step in range(20_000):
        arriving = step < 1200
        if arriving:
            for req in load_a.arrivals(now_a):
                fast.add_request(req)
                fast_reqs.append(req)
            for req in load_b.arrivals(now_b):
                ref.add_request(req)
                ref_reqs.append(req)
        a, b = fast.step(now_a), ref.step(now_b)
        assert (a.prefill_tokens, a.decode_seqs, a.decode_context_tokens, a.scheduled_seqs) == (
            b.prefill_tokens, b.decode_seqs, b.decode_context_tokens, b.scheduled_seqs
        ), f"step {step}"  # fmt: skip
        assert a.duration_s == b.duration_s
        assert [r.request_id for r in a.finished] == [r.request_id for r in b.finished]
        assert [r.request_id for r in a.preempted] == [r.request_id for r in b.preempted]
        assert [r.request_id for r in a.first_tokens] == [r.request_id for r in b.first_tokens]
        assert fast.num_running == len(ref.running) and fast.num_waiting == len(ref.waiting)
        assert fast.kv_usage == (len(ref.ref) - 1 - len(ref.free)) / (len(ref.ref) - 1)
        now_a, now_b = a.end_s + 1e-3, b.end_s + 1e-3
        if not arriving and not fast.has_work():
            break
    assert not fast.has_work() and not ref.has_work()
    assert [encode_batch(x) for x in fast_batches] == [encode_batch(x) for x in ref_batches]

    def outcome(r: SimRequest) -> tuple[Any, ...]:
        return (r.request_id, r.cached_tokens, r.scheduled_s, r.first_token_s, r.finished_s,
                r.preemptions, r.output_tokens, r.output_token_ids)  # fmt: skip

    assert [outcome(r) for r in fast_reqs] == [outcome(r) for r in ref_reqs]
    stats = fast.stats()
    assert stats["preemptions"] > 20 and stats["evictions"] > 500
    if aligned:
        assert stats["duplicate_stores"] > 0
