"""Seeded workloads for the simulated fleet, shaped like the field's published benchmarks.

Each workload yields :class:`~kvaware_scorer.sim.engine.SimRequest` objects with Poisson
arrivals at a given rate. Token ids are drawn from a seeded RNG; equal seeds give equal
requests, so every policy in a comparison sees the same arrivals.

* ``shared-prefix`` (llm-d's b2b-SaaS benchmark, inference-perf ``shared_prefix``): G
  groups x P prompts; every prompt of a group starts with the group's system prompt and
  ends with its own question; each request picks one of the G·P prompts uniformly.
  Defaults 150 x 5, 6,000 / 1,200 / 1,000 tokens (system / question / output), scaled by
  ``scale``.
* ``gsp`` (SGLang generated-shared-prefix): 64 groups x 16 prompts, 2,048 / 128 / 256,
  requests shuffled so groups interleave; each prompt is sent once.
* ``zipf``: shared-prefix groups chosen with a Zipf(alpha) popularity (hot groups).
* ``multi-turn`` (production-stack multi-round QA): users with a shared system prompt and
  a private history; each turn appends the previous answer and a new question.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from kvaware_scorer.errors import ConfigError
from kvaware_scorer.sim.engine import SimRequest

VOCAB = 32_000


@dataclass(frozen=True)
class WorkloadSpec:
    """Workload shape; lengths in tokens (before ``scale``)."""

    name: str = "shared-prefix"
    num_groups: int = 150
    prompts_per_group: int = 5
    system_len: int = 6000
    question_len: int = 1200
    output_len: int = 1000
    zipf_alpha: float = 1.0
    turns: int = 5
    scale: float = 1.0
    model: str = "sim-model"

    def scaled(self, n: int) -> int:
        return max(1, round(n * self.scale))


WORKLOADS: dict[str, WorkloadSpec] = {
    "shared-prefix": WorkloadSpec(),
    "gsp": WorkloadSpec("gsp", 64, 16, 2048, 128, 256),
    "zipf": WorkloadSpec("zipf", 150, 5, 6000, 1200, 1000, zipf_alpha=1.0),
    "multi-turn": WorkloadSpec("multi-turn", 64, 1, 1000, 500, 200, turns=5),
}


def workload(name: str, **overrides: object) -> WorkloadSpec:
    """A named workload with some fields overridden."""
    spec = WORKLOADS.get(name)
    if spec is None:
        raise ConfigError(f"unknown workload {name!r}; allowed values: {', '.join(WORKLOADS)}")
    fields = {**spec.__dict__, **overrides}
    return WorkloadSpec(**fields)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


class RequestStream:
    """Generates the requests of one run: ``requests(qps, duration_s)``."""

    def __init__(self, spec: WorkloadSpec, seed: int = 0) -> None:
        self.spec = spec
        self.seed = seed
        rng = random.Random(seed)
        s = spec
        self.systems = [_tokens(rng, s.scaled(s.system_len)) for _ in range(s.num_groups)]
        self.questions = [
            [_tokens(rng, s.scaled(s.question_len)) for _ in range(s.prompts_per_group)]
            for _ in range(s.num_groups)
        ]

    def requests(
        self, qps: float, duration_s: float, *, max_requests: int | None = None
    ) -> list[SimRequest]:
        if qps <= 0 or duration_s <= 0:
            raise ConfigError("qps and duration must be positive")
        rng = random.Random(self.seed * 7919 + int(qps * 1000))
        arrivals: list[float] = []
        t = 0.0
        while True:
            t += rng.expovariate(qps)
            if t >= duration_s or (max_requests is not None and len(arrivals) >= max_requests):
                break
            arrivals.append(t)
        return list(self._build(arrivals, rng))

    def _build(self, arrivals: list[float], rng: random.Random) -> Iterator[SimRequest]:
        s = self.spec
        out_len = s.scaled(s.output_len)
        if s.name == "multi-turn":
            yield from self._multi_turn(arrivals, rng, out_len)
            return
        if s.name == "gsp":
            order = [(g, p) for g in range(s.num_groups) for p in range(s.prompts_per_group)]
            rng.shuffle(order)
        weights = None
        if s.name == "zipf":
            weights = [1.0 / (rank + 1) ** s.zipf_alpha for rank in range(s.num_groups)]
        for i, arrival in enumerate(arrivals):
            if s.name == "gsp":
                g, p = order[i % len(order)]
            else:
                g = (
                    rng.choices(range(s.num_groups), weights)[0]
                    if weights
                    else rng.randrange(s.num_groups)
                )
                p = rng.randrange(s.prompts_per_group)
            yield SimRequest(
                request_id=f"r{i}",
                token_ids=self.systems[g] + self.questions[g][p],
                max_tokens=out_len,
                arrival_s=arrival,
            )

    def _multi_turn(
        self, arrivals: list[float], rng: random.Random, out_len: int
    ) -> Iterator[SimRequest]:
        s = self.spec
        shared = self.systems[0]
        history = {u: shared + self.questions[u][0] for u in range(s.num_groups)}
        turns = dict.fromkeys(range(s.num_groups), 0)
        for i, arrival in enumerate(arrivals):
            user = rng.randrange(s.num_groups)
            if turns[user] >= s.turns:
                history[user] = shared + _tokens(rng, s.scaled(s.question_len))
                turns[user] = 0
            prompt = history[user]
            yield SimRequest(
                request_id=f"r{i}", token_ids=list(prompt), max_tokens=out_len, arrival_s=arrival
            )
            # The next turn carries this answer (stand-in tokens) and a new question.
            history[user] = (
                prompt + _tokens(rng, out_len) + _tokens(rng, s.scaled(s.question_len) // 4 or 1)
            )
            turns[user] += 1
