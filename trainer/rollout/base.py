"""The rollout-engine interface: what the loop asks of an engine (torch, vLLM 0.8.5, SGLang 0.5.2).

An engine runs in the driver's process (torch) or in processes of its own (vLLM, SGLang: ``trainer.rollout.process``),
on devices of its own (disaggregated) or on the trainer's (colocated: the loop puts it to sleep while the trainer
trains and wakes it, weights first, then the KV cache, around each weight sync).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor

FinishReason = Literal["stop", "length"]
LogprobKind = Literal["raw", "processed"]
"""What an engine's sampled-token log-probs are. raw: log_softmax of the model's logits (the trainer's kind);
processed: after temperature, penalties and top-k/top-p (vLLM 0.8.5's V0 engine) — equal to raw only at
temperature 1 with top-k/top-p off."""
WakeTag = Literal["weights", "kv_cache"]


class NonFiniteLogitsError(RuntimeError):
    """The engine's model produced NaN/inf logits: its weights (as last synced) are broken."""


class EngineError(RuntimeError):
    """The engine failed to start, died, or refused a request; the message is one line naming the engine."""


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
    n: samples per prompt (a GRPO group), drawn by the engine from one shared prompt prefix.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1

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
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")

    @property
    def filtered(self) -> bool:
        """Whether sampling changes the distribution (temperature not 1, top-k or top-p on): then processed
        log-probs differ from raw ones."""
        return self.temperature != 1 or self.top_p < 1 or self.top_k > 0


@dataclass
class RolloutOutput:
    """One generated sequence.

    token_ids: the sampled tokens (the stop token included when finish_reason is "stop").
    logprobs: per sampled token, log p(token | prefix) of the engine's ``logprob_kind``: raw (log_softmax of the
        logits: the torch engine, vLLM V1) or processed (after temperature / top-k / top-p: vLLM V0, SGLang with
        temperature). At temperature 1 without top-k/top-p both are the distribution sampled from.
    text: ``decode(token_ids)`` with the tokenizer given to the engine.
    finish_reason: "stop" on EOS / a stop token, "length" on reaching max_tokens.
    """

    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason
    metrics: dict[str, float] = field(default_factory=dict)


class Generation:
    """A generation started by ``RolloutEngine.start_generate``: ``result()`` waits for its outputs (once)."""

    def __init__(self, wait: Callable[[], list[RolloutOutput]]):
        self._wait, self._outputs = wait, None

    def result(self) -> list[RolloutOutput]:
        if self._outputs is None:
            self._outputs, self._wait = self._wait(), None
        return self._outputs


@runtime_checkable
class RolloutEngine(Protocol):
    """A generator of completions whose weights the trainer pushes after each step.

    Life cycle: constructed = started (an engine in its own process has answered a health check); ``generate`` /
    ``update_weights`` / ``sleep`` / ``wake`` any number of times; ``shutdown`` once, after which no process of it is
    left. ``check_health`` raises ``EngineError`` (one line) when its process died.
    """

    logprob_kind: LogprobKind
    weight_version: int
    """Number of weight updates loaded (0: the engine's initial weights)."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[RolloutOutput]:
        """``params.n`` outputs per prompt, prompt-major (prompt 0's n samples first), prompts in order; prompts
        are token-id lists of any lengths."""
        ...

    def start_generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Generation:
        """``generate`` without waiting: an engine in its own process generates while the caller goes on (the
        off-policy pipeline, ``trainer.pipeline``), and takes no other call until the result is taken; an engine
        in the caller's process generates before it returns."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Load weights given under HF parameter names (what vLLM's / SGLang's ``load_weights`` take), consuming
        the iterable as it is produced (a streamed sync gathers the next tensor only when asked) and keeping no
        reference to a tensor once it is loaded; an engine in another process receives them in buckets of at most
        ``rollout.sync_bucket_mb``. Afterwards ``weight_version`` is one more and no cached prefix computed with
        the old weights is reused."""
        ...

    def sleep(self) -> None:
        """Colocated engines: release device memory (weights and KV cache, as ``rollout.sleep_level`` says) while
        the trainer uses the devices; a no-op for an engine on devices of its own."""
        ...

    def wake(self, tags: Sequence[WakeTag] = ("weights", "kv_cache")) -> None:
        """Take back what ``sleep`` released: ``("weights",)`` before a weight sync, ``("kv_cache",)`` after it."""
        ...

    def check_health(self) -> None:
        """Raise ``EngineError`` if the engine can no longer serve (its process died)."""
        ...

    def shutdown(self) -> None:
        """Stop the engine and every process it started; idempotent."""
        ...
