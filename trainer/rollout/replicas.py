"""Engine replicas (``rollout.engines`` > 1): copies of one engine, each in its own processes on devices of its own,
behind the same ``RolloutEngine`` interface.

A batch of prompts is cut into contiguous, nearly equal runs, one per replica, generated at once and joined in
order. Sampling is seeded per prompt (prompt i of a call draws from ``seed + i·n``: ``vllm_engine.generate``), and
each replica's run is given the seed its first prompt has in the whole batch, so the replicas draw what one engine
would. A weight sync packs each bucket once and every replica loads it (``process.load_weights``); sleep, wake,
health and shutdown go to all. Replicas start at once (a vLLM start is about a minute on a GPU); one that fails to
start stops the others.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from trainer.rollout.base import EngineError, Generation, RolloutOutput, SamplingParams
from trainer.rollout.process import ProcessEngine, load_weights


def runs(count: int, parts: int) -> list[tuple[int, int]]:
    """``count`` items cut into ``parts`` contiguous (start, end) runs whose sizes differ by at most one."""
    size, extra = divmod(count, parts)
    bounds, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        bounds.append((start, end))
        start = end
    return bounds


class ReplicatedEngine:
    """``RolloutEngine`` over several ``ProcessEngine`` replicas of one model: see the module docstring."""

    def __init__(self, replicas: list[ProcessEngine]):
        self.replicas = replicas
        self.name = replicas[0].name
        self.logprob_kind = replicas[0].logprob_kind
        self.info = replicas[0].info | {"replicas": len(replicas)}

    @classmethod
    def start(cls, spawners: list[Callable[[], ProcessEngine]]) -> ReplicatedEngine:
        """Spawn every replica (``wait=False``), then wait for each: they start at once. Spawned from this thread,
        which outlives them: an engine process dies with the thread that started it (``PR_SET_PDEATHSIG``). The
        first failure (an ``EngineError``) stops them all."""
        engines: list[ProcessEngine] = []
        try:
            for spawn in spawners:
                engines.append(spawn())
            for engine in engines:
                engine.wait_started()
        except EngineError:
            for engine in engines:
                engine.shutdown()
            raise
        return cls(engines)

    @property
    def weight_version(self) -> int:
        return self.replicas[0].weight_version

    @property
    def bucket_sizes(self) -> list[int]:
        return self.replicas[0].bucket_sizes

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[RolloutOutput]:
        return self.start_generate(prompts, params).result()

    def start_generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Generation:
        started = []
        for engine, (start, end) in zip(self.replicas, runs(len(prompts), len(self.replicas)), strict=True):
            if start == end:
                continue
            seeded = params if params.seed is None else dataclasses.replace(params, seed=params.seed + start * params.n)
            started.append(engine.start_generate(prompts[start:end], seeded))
        return Generation(lambda: [output for generation in started for output in generation.result()])

    def update_weights(self, named_tensors) -> None:
        load_weights(self.replicas, named_tensors)

    def sleep(self) -> None:
        for engine in self.replicas:
            engine.sleep()

    def wake(self, tags=("weights", "kv_cache")) -> None:
        for engine in self.replicas:
            engine.wake(tags)

    def check_health(self) -> None:
        for engine in self.replicas:
            engine.check_health()

    def shutdown(self) -> None:
        for engine in self.replicas:
            engine.shutdown()
