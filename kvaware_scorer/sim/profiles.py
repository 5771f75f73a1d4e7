"""Calibrated engine profiles: KV capacity, scheduler limits and step time of real pods.

``qwen3-32b-2xh100``: llm-d's published benchmark pod (``shared/research/llm-d.md`` §8.1:
8 pods x 2 H100 TP=2, Qwen3-32B, 307,328 KV tokens per pod, ITL 24-26 ms).

* KV: 307,328 tokens / 16 = **19,208 blocks** (vLLM's "GPU KV cache size" is
  ``num_gpu_blocks * block_size``). Cross-check: Qwen3-32B has 64 layers, 8 KV heads of
  128 dims, so a token's KV is 2 x 64 x 8 x 128 x 2 bytes = 256 KiB (128 KiB per GPU at
  TP=2); 2 x 80 GiB x 0.9 - 61 GiB of weights - ~7 GiB activations/graphs leaves ~75 GiB
  = ~307k tokens.
* Scheduler: vLLM's API-server defaults on H100 (``max_num_seqs`` 1024,
  ``max_num_batched_tokens`` 8192, chunked prefill); ``max_model_len`` 40,960 (the model's
  context length).
* Decode: ``base_s`` 13 ms (32.8 GB of BF16 weights per GPU read once per step at ~2.7 TB/s
  effective of H100's 3.35 TB/s = ~12 ms, plus TP all-reduce and launch overhead);
  ``per_context_token_s`` 5e-8 s (128 KiB per token per GPU at ~2.6 TB/s);
  ``per_decode_seq_s`` 40 us (sampling, logits, bookkeeping). From llm-d's precise run,
  8,730 output tok/s over 8 pods at ITL 26 ms means ~28 sequences decoding per pod, each
  with ~7,700 tokens of context (7,200 prompt + half the 1,000-token output): 13 + 28 x
  0.04 + 215,600 x 5e-8 = 24.9 ms per step, the published ITL.
* Prefill: ``per_prefill_token_s`` 1e-4 s = **10,000 tokens/s** per pod. Qwen3-32B needs
  ~2 x 32.8 GFLOP per token for its weights plus ~7.5 GFLOP of attention at a 7,200-token
  prompt; 2 x 989 TFLOPS of dense BF16 at ~37% MFU (typical for TP=2 prefill) gives
  ~10k tokens/s, the middle of the 8-12k range. Checked against llm-d's precise run: a
  1,200-token uncached question arriving in a step with 28 decodes takes 145 ms, which
  with queueing for the current step gives TTFT near the published 0.30 s mean / 0.54 s
  p90. (The "KV-Cache Wins" blog's single-pod 10k-token TTFT of 4.3 s implies ~2.7k
  tokens/s; it looks measured under load, as its 0.6 s cached TTFT is ~20 steps, so it
  was not used.)

``llama-8b-1xh100``: Llama-3.1-8B-Instruct on one H100 SXM 80 GB (public figures, no
llm-d run): KV 128 KiB per token (32 layers x 8 KV heads x 128 x 2 x 2 bytes); 80 GiB x
0.9 - 15 GiB of weights - ~3.4 GiB overhead = ~53 GiB = **436,800 tokens = 27,300
blocks**; ``base_s`` 7 ms (16 GB of weights at ~2.7 TB/s plus overhead), 5e-8 s per context
token, 30 us per sequence, 25,000 prefill tokens/s (~18 GFLOP per token at ~45% MFU).

Every figure is an assumption to override when you have a measurement:
``profile("qwen3-32b-2xh100", num_gpu_blocks=10_000)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.sim.engine import EngineConfig
from kvaware_scorer.sim.steptime import (
    LLAMA_8B_1XH100_STEP,
    QWEN3_32B_2XH100_STEP,
    StepTimeModel,
)

__all__ = ["PROFILES", "engine_from_yaml", "profile"]

QWEN3_32B_2XH100: Final = EngineConfig(
    num_gpu_blocks=19_208,
    block_size=16,
    max_num_seqs=1024,
    max_num_batched_tokens=8192,
    step_time=QWEN3_32B_2XH100_STEP,
    model="Qwen/Qwen3-32B",
    max_model_len=40_960,
)

LLAMA_8B_1XH100: Final = EngineConfig(
    num_gpu_blocks=27_300,
    block_size=16,
    max_num_seqs=1024,
    max_num_batched_tokens=8192,
    step_time=LLAMA_8B_1XH100_STEP,
    model="meta-llama/Llama-3.1-8B-Instruct",
    max_model_len=131_072,
)

PROFILES: Final[Mapping[str, EngineConfig]] = MappingProxyType(
    {
        "qwen3-32b-2xh100": QWEN3_32B_2XH100,
        "llama-8b-1xh100": LLAMA_8B_1XH100,
    }
)
"""Named engine profiles (read-only); see the module docstring for their sources."""


def profile(name: str, **overrides: Any) -> EngineConfig:
    """The named profile's :class:`EngineConfig`, with any field overridden.

    Raises :class:`ConfigError` for an unknown name (listing the known ones), an unknown
    field, or an override value the config refuses.
    """
    try:
        base = PROFILES[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown engine profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}"
        ) from None
    if not overrides:
        return base
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"profile {name!r}: unknown EngineConfig field(s) {', '.join(unknown)}; "
            f"fields: {', '.join(sorted(known))}"
        )
    return dataclasses.replace(base, **overrides)


def engine_from_yaml(path: str | Path, default_profile: str = "qwen3-32b-2xh100") -> EngineConfig:
    """An engine from a YAML file: ``profile`` (a name above, default ``default_profile``),
    then any :class:`EngineConfig` field to override, with ``step_time`` as a mapping of
    :class:`StepTimeModel` fields, e.g.::

        profile: qwen3-32b-2xh100
        num_gpu_blocks: 12000
        step_time: {base_s: 0.015, per_prefill_token_s: 0.00012}

    Unknown keys and bad values raise :class:`ConfigError` naming the key.
    """
    from kvaware_scorer.config import read_yaml

    raw = read_yaml(Path(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of engine settings")
    fields = dict(raw)
    name = fields.pop("profile", default_profile)
    base = profile(str(name))
    step = fields.pop("step_time", None)
    if step is not None:
        if not isinstance(step, dict):
            raise ConfigError(f"{path}: step_time must be a mapping")
        known = {f.name for f in dataclasses.fields(StepTimeModel)}
        unknown = sorted(set(step) - known)
        if unknown:
            raise ConfigError(
                f"{path}: step_time: unknown key(s) {', '.join(map(str, unknown))}; "
                f"allowed: {', '.join(sorted(known))}"
            )
        fields["step_time"] = dataclasses.replace(base.step_time, **step)
    try:
        return profile(str(name), **fields)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
