"""The rollout engine a recipe names (``recipe.rollout.engine``), built in one place, and checked once started.

torch: in the driver's process (CPU), or in its own under ``grpo.max_staleness`` ≥ 1. vllm: vLLM 0.8.5 in a process
of its own (its CPU build runs here, V0). sglang: SGLang 0.5.2 in a process of its own (GPU only: it has no CPU
engine). The preflight has already refused a recipe whose engine does not import on this machine.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from matrix import ResolvedRecipe
from trainer.rollout.base import EngineError, RolloutEngine, SamplingParams
from trainer.tasks import Task

if TYPE_CHECKING:
    from trainer.platform import Platform


def _torch_engine(r: ResolvedRecipe, task: Task, platform: Platform) -> RolloutEngine:
    """In the driver's process; in a process of its own when the off-policy pipeline overlaps it with training. On
    the host whatever ``platform`` computes on (it has no devices to choose)."""
    if r.recipe.grpo.max_staleness:
        from trainer.models.config import hf_config
        from trainer.rollout.torch_engine import TorchProcessEngine

        return TorchProcessEngine(hf_config(r.model), engine_rollout(r), decode=task.decode, seed=r.recipe.run.seed,
                                  pad_token_id=task.pad_id)
    from trainer.rollout.torch_engine import TorchEngine

    return TorchEngine(r.model, decode=task.decode, eos_token_id=task.eos_id, pad_token_id=task.pad_id)


def engine_rollout(r: ResolvedRecipe):
    """The recipe's ``rollout`` settings with the derived ones filled in (max_model_len: prompt + response)."""
    rollout, grpo = r.recipe.rollout, r.recipe.grpo
    if rollout.max_model_len is None:
        rollout = rollout.model_copy(update={"max_model_len": grpo.max_prompt_len + grpo.max_response_len})
    return rollout


def engine_replicas(r: ResolvedRecipe) -> int:
    """How many copies of the engine start: ``rollout.engines``, else (colocated) one per ``tp`` of the recipe's
    GPUs, else one; at most as many as the driver's node holds, since every replica is started from the driver's
    process (engines on other nodes are not built: the rest is said, once, on stderr)."""
    rollout = r.recipe.rollout
    wanted = rollout.engines or (max(1, r.recipe.gpus // rollout.tp) if rollout.colocate else 1)
    if not r.runs_on_gpus:
        return wanted
    here = max(1, r.gpus_per_node // rollout.tp)
    if wanted > here:
        print(f"rollout.engines {wanted}: {here} start on the driver's node ({r.gpus_per_node} GPUs, tp "
              f"{rollout.tp}); engines on the other nodes are not built", file=sys.stderr)
    return min(wanted, here)


def _process_engine(module: str, cls: str) -> Callable[[ResolvedRecipe, Task, Platform], RolloutEngine]:
    def build(r: ResolvedRecipe, task: Task, platform: Platform) -> RolloutEngine:
        import importlib

        from trainer.models.config import hf_config
        from trainer.platform import PlatformUnavailable
        from trainer.rollout.replicas import ReplicatedEngine

        engine_class = getattr(importlib.import_module(module), cls)
        config, rollout, seed, count = hf_config(r.model), engine_rollout(r), r.recipe.run.seed, engine_replicas(r)
        try:
            envs = [platform.engine_environment(i, rollout.tp) for i in range(count)]
        except PlatformUnavailable as exc:
            raise EngineError(str(exc)) from None

        def spawner(i: int, wait: bool):
            # seeds per replica: an engine without per-request seeds (SGLang) samples from its own stream
            return lambda: engine_class(config, rollout, decode=task.decode, seed=seed + i, env=envs[i], wait=wait)

        if count == 1:
            return spawner(0, wait=True)()
        return ReplicatedEngine.start([spawner(i, wait=False) for i in range(count)])

    return build


ENGINES: dict[str, Callable[[ResolvedRecipe, Task, Platform], RolloutEngine]] = {
    "torch": _torch_engine,
    "vllm": _process_engine("trainer.rollout.vllm_engine", "VllmEngine"),
    "sglang": _process_engine("trainer.rollout.sglang_engine", "SglangEngine"),
}


def logprob_problem(kind: str, engine: str, r: ResolvedRecipe) -> str | None:
    """Why ``r`` cannot use an engine whose log-probs are of ``kind`` (None: it can). The trainer's log-probs are
    raw; the mismatch metrics (always) and TIS (``grpo.tis_cap``) compare them with the engine's, which is only
    meaningful when both are the same distribution."""
    s = r.recipe.grpo.sampling  # eval's sampling compares no log-probs
    if kind == "raw" or not SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k).filtered:
        return None
    uses = "TIS (grpo.tis_cap) and the mismatch metrics" if r.recipe.grpo.tis_cap else "the mismatch metrics"
    return (
        f"rollout engine {engine} returns processed log-probs (after temperature / top-k / top-p), but "
        f"grpo.sampling has temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k}: {uses} would compare "
        f"them with the trainer's raw ones; sample at temperature 1, top_p 1, top_k -1, or use an engine with raw "
        f"log-probs (vLLM V1, the torch engine)"
    )


def build_engine(r: ResolvedRecipe, task: Task, platform: Platform | None = None) -> RolloutEngine:
    """Start the recipe's engine (its replicas on devices ``platform`` picks); raises EngineError (one line) when it
    fails to start or does not fit the recipe, with nothing of it left running."""
    name = r.recipe.rollout.engine
    if name not in ENGINES:
        raise EngineError(f"rollout engine {name}: its adapter is not built yet; built: {', '.join(ENGINES)}")
    if platform is None:
        from trainer.platform import CPU

        platform = CPU
    engine = ENGINES[name](r, task, platform)
    problem = logprob_problem(engine.logprob_kind, name, r)
    if problem:
        engine.shutdown()
        raise EngineError(problem)
    return engine
