"""The rollout-engine interface: what the loop asks of the CPU torch engine and, later, vLLM / SGLang."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

FinishReason = Literal["stop", "length"]


class NonFiniteLogitsError(RuntimeError):
    """The engine's model produced NaN/inf logits: its weights (as last synced) are broken."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample, with vLLM's meanings.

    temperature: 0 → greedy (argmax); otherwise logits / temperature.
    top_p: nucleus mass kept, in (0, 1]; 1 → off.
    top_k: tokens kept; -1 (or 0) → off.
    max_tokens: new tokens at most per sequence.
    seed: seeds the engine's sampling generator; the same prompts and seed give the same samples.
        None → a fresh random seed per call.
    stop_token_ids: tokens that end a sequence besides the tokenizer's EOS (kept in the output).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class RolloutOutput:
    """One generated sequence.

    token_ids: the sampled tokens (the stop token included when finish_reason is "stop").
    logprobs: per sampled token, log p(token | prefix) under the engine's *raw* model distribution
        (log_softmax of the logits, before temperature, top-k and top-p), as vLLM's default ``logprobs``.
        At temperature 1 without top-k/top-p they are exactly the log-probs of the distribution sampled from.
    text: ``decode(token_ids)`` with the tokenizer given to the engine.
    finish_reason: "stop" on EOS / a stop token, "length" on reaching max_tokens.
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class RolloutEngine(Protocol):
    """A generator of completions whose weights the trainer pushes after each step."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[RolloutOutput]:
        """One output per prompt, in order; prompts are token-id lists of any lengths."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load weights given under HF parameter names (what vLLM's / SGLang's ``load_weights`` take), consuming
        the iterable as it is produced (a streamed sync gathers the next tensor only when asked): keep no
        reference to a tensor once it is loaded."""
        ...

    def sleep(self) -> None:
        """Release device memory (KV cache, weights) while the trainer uses the device."""
        ...

    def wake(self) -> None:
        """Take back what ``sleep`` released, before the next ``generate``."""
        ...
