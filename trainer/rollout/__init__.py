"""Rollout engines behind one interface (``base.RolloutEngine``): sample n completions per prompt, take weight
updates, sleep and wake when colocated, shut down.

``torch_engine.TorchEngine`` is the in-process CPU engine; ``vllm_engine.VllmEngine`` (vLLM 0.8.5) runs its
engine in a process of its own (``process.ProcessEngine``, the driver-side half an SGLang 0.5.2 adapter will share)
and receives weights in bounded buckets (``buckets``). ``factory.build_engine`` picks
one by ``recipe.rollout.engine``, in one place.
"""

from trainer.rollout.base import EngineError, RolloutEngine, RolloutOutput, SamplingParams

__all__ = ["EngineError", "RolloutEngine", "RolloutOutput", "SamplingParams", "TorchEngine"]


def __getattr__(name: str):
    if name == "TorchEngine":  # imports transformers and the model families: only when asked for
        from trainer.rollout.torch_engine import TorchEngine

        return TorchEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
