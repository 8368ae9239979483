"""The CPU rollout engine: a transformers model with a KV cache, batched sampling of left-padded prompts.

The model is the transformers causal LM of the matrix shape's HF config (Qwen2, Qwen3, DeepseekV3, Qwen3Next),
so the weights the trainer pushes under HF names (``weight_map``) load by name, as they will into vLLM / SGLang.
Decoding: one prefill of the left-padded batch, then one token per step for every live sequence, with the cache
the model creates for itself (a ``DynamicCache``; Qwen3-Next's also holds conv and recurrent states); a sequence
stops at EOS / a stop token ("stop") or after ``max_tokens`` ("length").
Sampling draws from one ``torch.Generator`` seeded by ``SamplingParams.seed``, so runs are repeatable; ``n`` samples
per prompt are the prompt repeated n times in the batch (rows in the order prompt 0 × n, prompt 1 × n, ...).
Log-probs are raw (``log_softmax`` of the logits, before temperature / top-k / top-p), as the trainer's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, PretrainedConfig

from matrix.schema import Model
from trainer.models.config import hf_config as hf_config_of
from trainer.rollout.base import Generation, NonFiniteLogitsError, RolloutOutput, SamplingParams, WakeTag
from trainer.rollout.buckets import FlatBucket
from trainer.rollout.process import ProcessEngine


def filter_logits(logits: Tensor, *, top_k: int, top_p: float) -> Tensor:
    """Logits (B, V) with tokens outside top-k and outside the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> Tensor:
    """Next token ids (B,) from logits (B, V) under ``params``; argmax at temperature 0."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteLogitsError("the rollout model produced non-finite logits (weights synced from a diverged policy?)")
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    if params.temperature != 1:  # x / 1 is x exactly: no copy of the logits per token at the usual T = 1
        logits = logits / params.temperature
    probs = torch.softmax(filter_logits(logits, top_k=params.top_k, top_p=params.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _built_on_host(model: Model | PretrainedConfig, hf_config: PretrainedConfig) -> AbstractContextManager:
    """The family's context for building transformers' model to run on the host (``FamilyBundle.hf_on_host``)."""
    from trainer.models.families import family, family_of_hf

    try:
        bundle = family(model.family) if isinstance(model, Model) else family_of_hf(hf_config.model_type)
    except (LookupError, NotImplementedError):  # a model no family of ours describes: transformers' own choice
        return contextlib.nullcontext()
    return bundle.hf_on_host()


class TorchEngine:
    """Rollout engine on the host over a transformers causal LM.

    ``model``: a matrix ``Model`` (its HF config is derived by ``trainer.models.config.hf_config``) or a
    transformers config. ``decode`` turns token ids into text; ``eos_token_id`` (optional) always stops a
    sequence, in addition to ``SamplingParams.stop_token_ids``.
    """

    logprob_kind = "raw"

    def __init__(
        self,
        model: Model | PretrainedConfig,
        *,
        decode: Callable[[list[int]], str],
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        seed: int = 0,
    ):
        hf_config = model if isinstance(model, PretrainedConfig) else hf_config_of(model)
        dtype = getattr(hf_config, "dtype", None) or torch.float32
        # initial weights only matter until the first update_weights: drawn from the host's generator alone, which
        # goes on as it was (torch.manual_seed would reseed a GPU's generator too)
        with torch.random.fork_rng(devices=[]), _built_on_host(model, hf_config):
            torch.random.default_generator.manual_seed(seed)
            self.model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
        self.model.eval().requires_grad_(False)
        self.decode = decode
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.weight_version = 0

    # ------------------------------------------------------------------ weights

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> None:
        """Copy tensors into the parameters (and buffers: a router's expert-score bias) of the same HF name, one
        at a time as they come; unknown names and shape mismatches raise."""
        params = dict(self.model.named_buffers()) | dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in params:
                    raise KeyError(f"engine model has no parameter or buffer {name!r}")
                if params[name].shape != tensor.shape:
                    raise ValueError(
                        f"{name}: got shape {tuple(tensor.shape)}, engine has {tuple(params[name].shape)}"
                    )
                params[name].copy_(tensor)
                del tensor  # a streamed sync gathers the next one while this loop waits: hold one at a time
        self.weight_version += 1  # no prefix cache outlives a generate call: nothing to reset

    def start_generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Generation:
        """Generates now (this process has no other thread to generate in): see ``TorchProcessEngine``."""
        outputs = self.generate(prompts, params)
        return Generation(lambda: outputs)

    def sleep(self) -> None:
        """No-op: the KV cache lives only inside ``generate`` and the CPU shares no device with the trainer."""

    def wake(self, tags: Sequence[WakeTag] = ("weights", "kv_cache")) -> None:
        """No-op, see ``sleep``."""

    def check_health(self) -> None:
        """Always healthy: the engine is this process."""

    def shutdown(self) -> None:
        """Nothing to stop: no process of its own."""

    # ------------------------------------------------------------------ generation

    def _left_pad(self, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """input_ids and attention_mask (B, L), prompts right-aligned."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {row} is empty")
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        return ids, mask

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[RolloutOutput]:
        """Sample ``params.n`` times up to ``params.max_tokens`` tokens after each prompt; see ``RolloutOutput``."""
        if not prompts:
            return []
        prompts = [prompt for prompt in prompts for _ in range(params.n)]
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        generator = torch.Generator().manual_seed(seed)
        stop_ids = set(params.stop_token_ids) | (
            {self.eos_token_id} if self.eos_token_id is not None else set()
        )
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long)

        ids, prompt_mask = self._left_pad(prompts)
        batch, width = ids.shape
        positions = (prompt_mask.cumsum(dim=-1) - 1).clamp(min=0)
        # every step's attention mask, allocated once (not one concatenation per token): step s sees its
        # first width + s columns
        mask = torch.cat([prompt_mask, torch.ones((batch, params.max_tokens), dtype=prompt_mask.dtype)], dim=-1)
        cache = None  # the model makes its own on the prefill (hybrid models need their cache class)
        tokens = torch.zeros((batch, params.max_tokens), dtype=torch.long)
        logprobs = torch.zeros((batch, params.max_tokens), dtype=torch.float32)
        lengths = torch.full((batch,), params.max_tokens, dtype=torch.long)
        finished = torch.zeros(batch, dtype=torch.bool)

        step_ids, step_pos = ids, positions
        for step in range(params.max_tokens):
            out = self.model(
                input_ids=step_ids,
                attention_mask=mask[:, : width + step],
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            logits = out.logits[:, -1].float()  # (B, V)
            next_ids = sample(logits, params, generator)
            tokens[:, step] = next_ids
            logprobs[:, step] = torch.log_softmax(logits, dim=-1).gather(-1, next_ids[:, None]).squeeze(-1)
            hit = torch.isin(next_ids, stop) & ~finished
            lengths[hit] = step + 1
            finished |= hit
            if bool(finished.all()):
                break
            step_ids = next_ids[:, None]
            step_pos = step_pos[:, -1:] + 1

        outputs = []
        for row, prompt in enumerate(prompts):
            n = int(lengths[row])
            seq = tokens[row, :n].tolist()
            outputs.append(
                RolloutOutput(
                    prompt_token_ids=list(prompt),
                    token_ids=seq,
                    logprobs=logprobs[row, :n].tolist(),
                    text=self.decode(seq),
                    finish_reason="stop" if bool(finished[row]) else "length",
                )
            )
        return outputs


class TorchServer:
    """The engine process's side of ``TorchProcessEngine``: a ``TorchEngine`` built from the HF config the driver
    wrote, answering ``trainer.rollout.process``'s server calls."""

    def __init__(self, config_dir: str, settings: dict, seed: int):
        from transformers import AutoConfig

        self.engine = TorchEngine(AutoConfig.from_pretrained(config_dir), decode=lambda ids: "",
                                  pad_token_id=settings["pad_token_id"], seed=seed)

    def describe(self) -> dict:
        return {"logprob_kind": TorchEngine.logprob_kind, "engine": "torch", "threads": torch.get_num_threads()}

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[tuple[list[int], list[float], str]]:
        return [(o.token_ids, o.logprobs, o.finish_reason) for o in self.engine.generate(prompts, params)]

    def load_bucket(self, bucket: FlatBucket) -> None:
        self.engine.update_weights(bucket.tensors())

    def weights_loaded(self, version: int) -> None:
        """Nothing cached outlives a generate call."""

    def sleep(self, level: int) -> None:
        """The CPU shares no device memory with the trainer."""

    def wake(self, tags: list[str]) -> None:
        """See ``sleep``."""

    def close(self) -> None:
        del self.engine


class TorchProcessEngine(ProcessEngine):
    """The torch engine in a process of its own (``grpo.max_staleness`` ≥ 1: it generates the next episode while
    the trainer trains on this one; ``trainer.pipeline``). Same sampling and log-probs as ``TorchEngine``, whose
    thread count follows the process's (``OMP_NUM_THREADS``)."""

    name = "torch"

    def __init__(self, hf_config, rollout, *, decode, seed: int, pad_token_id: int):
        super().__init__(TorchServer, hf_config, rollout, decode=decode, seed=seed,
                         settings={"pad_token_id": pad_token_id})
