"""How long one scheduler step of a simulated vLLM engine takes.

vLLM v1 runs one forward pass per scheduler step over every scheduled token: the decode
token of each running sequence plus the prefill chunks admitted under the step's token
budget. Its duration is modelled as a linear function of the work in the step::

    duration = base_s
             + per_prefill_token_s * prefill_tokens          # compute-bound (GEMMs)
             + per_decode_seq_s    * decode_seqs             # per-sequence overhead
             + per_context_token_s * decode_context_tokens   # memory-bound KV reads

``base_s`` is the weight-read floor of a forward pass plus fixed launch, all-reduce and
scheduler overhead; the prefill term is the compute of uncached prompt tokens; the two
decode terms are the per-sequence cost (sampling, logits) and the attention read of every
decoding sequence's KV cache. The calibrated constants live here (so the engine can use
one as its default without importing the profiles); their derivation is in
:mod:`kvaware_scorer.sim.profiles` and ``docs/simulator-engine.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Final

from kvaware_scorer.errors import ConfigError

__all__ = ["LLAMA_8B_1XH100_STEP", "QWEN3_32B_2XH100_STEP", "StepTimeModel"]


@dataclass(frozen=True, slots=True)
class StepTimeModel:
    """Linear step-time model (seconds); every coefficient must be finite and >= 0.

    ``base_s``: fixed cost of a step. ``per_prefill_token_s``: cost per prefill
    (uncached) token computed in the step. ``per_decode_seq_s``: cost per decoding
    sequence. ``per_context_token_s``: attention cost per context token of the decoding
    sequences (their KV cache is read once per step).
    """

    base_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_context_token_s: float

    def __post_init__(self) -> None:
        """Refuse negative, non-finite or non-numeric coefficients, naming the field."""
        for f in fields(self):
            value = getattr(self, f.name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ConfigError(
                    f"step_time.{f.name}: must be a finite number >= 0 (seconds), got {value!r}"
                )

    def step_time(self, prefill_tokens: int, decode_seqs: int, decode_context_tokens: int) -> float:
        """Duration in seconds of a step with this much work."""
        return (
            self.base_s
            + self.per_prefill_token_s * prefill_tokens
            + self.per_decode_seq_s * decode_seqs
            + self.per_context_token_s * decode_context_tokens
        )

    def prefill_tokens_per_s(self) -> float:
        """Asymptotic prefill throughput (tokens/s) of large prefill-only steps."""
        if self.per_prefill_token_s == 0:
            return math.inf
        return 1.0 / self.per_prefill_token_s

    def itl_s(self, decode_seqs: int, context_tokens_per_seq: int) -> float:
        """Inter-token latency of a decode-only step: ``decode_seqs`` sequences of that context."""
        return self.step_time(0, decode_seqs, decode_seqs * context_tokens_per_seq)


QWEN3_32B_2XH100_STEP: Final = StepTimeModel(
    base_s=0.013,
    per_prefill_token_s=1.0e-4,
    per_decode_seq_s=4.0e-5,
    per_context_token_s=5.0e-8,
)
"""Qwen3-32B, BF16, TP=2 on 2 x H100 SXM 80 GB (llm-d's published benchmark pods).

13 ms floor (32.8 GB of weights per GPU at ~2.7 TB/s effective HBM, plus TP all-reduce
and launch overhead); 10,000 prefill tokens/s (~73 GFLOP/token with attention on
2 x 989 TFLOPS BF16 at ~37% MFU); 40 us per decoding sequence; 5e-8 s per context token
(128 KiB of KV per token per GPU at ~2.6 TB/s). At llm-d's typical batch (28 sequences
of ~7,700 tokens of context) a decode step takes 25 ms, the published ITL.
"""

LLAMA_8B_1XH100_STEP: Final = StepTimeModel(
    base_s=0.007,
    per_prefill_token_s=4.0e-5,
    per_decode_seq_s=3.0e-5,
    per_context_token_s=5.0e-8,
)
"""Llama-3.1-8B-Instruct, BF16, on one H100 SXM 80 GB.

7 ms floor (16 GB of weights at ~2.7 TB/s effective HBM, plus launch overhead); 25,000
prefill tokens/s (~18 GFLOP/token with attention at ~45% MFU); 30 us per decoding
sequence; 5e-8 s per context token (128 KiB of KV per token: 32 layers x 8 KV heads x
128 x 2 x 2 bytes).
"""
