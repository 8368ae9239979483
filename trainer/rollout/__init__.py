"""Rollout engines behind one interface (``base.RolloutEngine``): sample completions, take weight updates.

``torch_engine.TorchEngine`` is the CPU engine. The GPU adapters (vLLM 0.8.5, SGLang 0.5.2) will be
``vllm_engine.py`` / ``sglang_engine.py`` beside it, implementing the same Protocol: ``generate`` maps
``SamplingParams`` onto the engine's own (their ``logprobs`` are raw-model log-probs too),
``update_weights`` forwards the HF-named tensors of a backend's ``hf_named_tensors`` (streamed by
``trainer.weight_sync``) to the engine's ``load_weights`` / ``update_weights_from_tensor``, and
``sleep`` / ``wake`` map to their memory-release calls when trainer and engine share GPUs. The loop picks
the engine by ``recipe.rollout.engine`` in one place.
"""

from trainer.rollout.base import RolloutEngine, RolloutOutput, SamplingParams
from trainer.rollout.torch_engine import TorchEngine

__all__ = ["RolloutEngine", "RolloutOutput", "SamplingParams", "TorchEngine"]
