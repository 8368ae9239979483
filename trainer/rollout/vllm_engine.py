"""vLLM 0.8.5 behind the engine seam, in a process of its own (written against the 0.8.5 sources).

``VllmServer`` lives in the engine process: ``vllm.LLM`` built from the recipe's ``rollout`` settings on a directory
holding the model's HF config (``load_format="dummy"``: random weights until the first sync loads the policy's) and
an id-only tokenizer (``write_id_tokenizer`` says why): prompts are token ids, outputs are not detokenized. The weights go in through
``LLM.collective_rpc`` with a function that calls each worker's ``model_runner.model.load_weights`` on whole
HF-named tensors, a bucket sent as pickled bytes (``_load_weights`` says why); the model's loaders slice for TP
and stack q/k/v and gate/up themselves, and skip a tied ``lm_head``. On V0 that runs on the driver worker in this
process (the CPU build, ``uni`` executor), on V1 on every worker process. ``reset_prefix_cache`` follows every
sync. The architecture is registered as a class before the engine starts, which skips vLLM's model-inspection
subprocess (~14 s per start on CPU).

Log-probs: V0 (the only engine on CPU, and 0.8.5's fallback for fp32 and other cases on GPU) returns *processed*
log-probs (after temperature and top-k/top-p), V1 (the GPU default) raw ones; ``describe`` reports which one runs.
Sleep mode (``enable_sleep_mode``, ``sleep(level)`` / ``wake_up(tags)``) is CUDA-only in 0.8.5: (GPU) not verified here.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
from pathlib import Path

from trainer.gpus import check_engine_share
from trainer.rollout.base import SamplingParams
from trainer.rollout.buckets import FlatBucket
from trainer.rollout.process import ProcessEngine, model_dtype

CPU_KV_CACHE_GB = "1"  # VLLM_CPU_KVCACHE_SPACE when unset: plenty for the tiny CPU recipes


def _load_weights(worker, pickled_bucket: bytes) -> None:
    """Runs on each vLLM worker (V0: the driver worker here; V1: every worker process). The bucket comes pickled:
    V1 carries ``collective_rpc``'s arguments to its engine core through msgpack, which turns a tensor into a
    (dtype, shape, index) triple that nothing turns back, and with TP > 1 pickles them for its workers once per
    tensor view of the shared buffer; bytes cross both whole, once. (V1: GPU not verified here.)"""
    worker.model_runner.model.load_weights(iter(pickle.loads(pickled_bucket).tensors()))


def write_id_tokenizer(config_dir: str) -> None:
    """A tokenizer whose vocabulary is the model's token ids ("<0>" … "<vocab_size - 1>"), saved beside its config.
    The engine never tokenizes or detokenizes (``skip_tokenizer_init``), but V1 (the GPU default) loads the model
    directory's tokenizer whatever that flag says and refuses prompt ids above its ``max_token_id``; this one
    covers the whole vocabulary of every recipe, tiny (the character tokenizer has no HF form) or hub-sized, with
    no hub. (V1: GPU not verified here; its input path is tested on CPU.)"""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab_size = json.loads((Path(config_dir) / "config.json").read_text())["vocab_size"]
    ids = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    PreTrainedTokenizerFast(tokenizer_object=ids).save_pretrained(config_dir)


def _register_architecture(architecture: str) -> None:
    """Register the model class itself (not vLLM's lazy "module:class" entry), so the engine does not start a
    subprocess to inspect it."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.registry import _VLLM_MODELS

    module, name = _VLLM_MODELS[architecture]
    ModelRegistry.register_model(
        architecture, getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), name)
    )


def engine_arguments(config_dir: str, settings: dict, seed: int, dtype: str, *, cpu: bool) -> dict:
    """``vllm.LLM`` keyword arguments for a recipe's ``rollout`` settings."""
    arguments = {
        "model": config_dir,
        "skip_tokenizer_init": True,
        "load_format": "dummy",
        "dtype": dtype,
        "seed": seed,
        "tensor_parallel_size": settings["tp"],
        "gpu_memory_utilization": settings["gpu_memory_utilization"],
        "enforce_eager": settings["enforce_eager"],
        "max_num_seqs": settings["max_num_seqs"],
        "enable_sleep_mode": bool(settings["colocate"] and settings["sleep_level"]),
        # the n samples of a group share their prompt's blocks; vLLM's CPU build runs cached prefixes through
        # intel_extension_for_pytorch only (not installed with it)
        "enable_prefix_caching": not cpu,
    }
    if settings["max_model_len"]:
        arguments["max_model_len"] = settings["max_model_len"]
    return arguments


def v1_memory_share(requested: float, in_use: int, total: int) -> float:
    """The ``gpu_memory_utilization`` to give vLLM 0.8.5's V1 engine so that it takes ``requested`` of the GPU for
    itself, as the recipe's ``rollout.gpu_memory_utilization`` means and V0 reads it, when ``in_use`` bytes of the
    GPU's ``total`` are held already (a colocated trainer's weights and optimizer, built before the engine).

    V1's worker sizes its KV cache as total × gpu_memory_utilization − its own peak − every byte the device holds
    outside its process's torch allocator (``v1/worker/gpu_worker.py``: ``determine_available_memory`` counts the
    device-wide used memory), so given the recipe's share unchanged, the trainer's memory would come out of the
    engine's KV cache: a small cache, or none ("No available memory for the cache blocks"). Raises ValueError when
    the two do not fit the GPU. (GPU not verified here.)"""
    check_engine_share(requested, in_use, total)
    return requested + in_use / total


def _runs_v1(arguments: dict) -> bool:
    """Whether ``vllm.LLM(**arguments)`` will run the V1 engine: vLLM's own choice, made the way ``LLM`` makes it
    (``EngineArgs.create_engine_config`` records it in VLLM_USE_V1, which the ``LLM`` built next keeps)."""
    from vllm import envs
    from vllm.engine.arg_utils import EngineArgs
    from vllm.usage.usage_lib import UsageContext

    # as LLM builds its EngineArgs (its usage context sets defaults the checks depend on, e.g. batched tokens)
    EngineArgs(**arguments, disable_log_stats=True).create_engine_config(UsageContext.LLM_CLASS)
    return bool(envs.VLLM_USE_V1)


def sampling_params(params: SamplingParams, seed_offset: int):
    """vLLM's ``SamplingParams`` for ours: the sampled token's log-prob only, no detokenization; EOS is one of our
    stop tokens (``ignore_eos``: vLLM's own EOS, from a config without a tokenizer, is not ours)."""
    import vllm

    return vllm.SamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        max_tokens=params.max_tokens,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=True,
        seed=None if params.seed is None else (params.seed + seed_offset) % 2**63,
        logprobs=0,
        detokenize=False,
    )


class VllmServer:
    """The engine process's side: one ``vllm.LLM``."""

    def __init__(self, config_dir: str, settings: dict, seed: int):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GB)
        os.environ.setdefault(
            "VLLM_LOGGING_LEVEL", "ERROR"
        )  # its per-request warnings (no tokenizer: no EOS) are noise
        import vllm

        config = json.loads((Path(config_dir) / "config.json").read_text())
        write_id_tokenizer(config_dir)
        _register_architecture(config["architectures"][0])
        from vllm.platforms import current_platform
        from vllm.utils import import_pynvml

        from trainer.gpus import fullest_gpu

        arguments = engine_arguments(config_dir, settings, seed, model_dtype(config_dir), cpu=current_platform.is_cpu())
        if current_platform.is_cuda() and _runs_v1(arguments):
            arguments["gpu_memory_utilization"] = v1_memory_share(
                arguments["gpu_memory_utilization"], *fullest_gpu(import_pynvml(), settings["tp"])
            )
        self.llm = vllm.LLM(**arguments)
        self.v1 = type(self.llm.llm_engine).__module__.startswith("vllm.v1")
        self.version = vllm.__version__

    def describe(self) -> dict:
        return {
            "logprob_kind": "raw" if self.v1 else "processed",
            "engine": "V1" if self.v1 else "V0",
            "version": self.version,
        }

    def generate(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> list[tuple[list[int], list[float], str]]:
        from vllm.inputs import TokensPrompt

        # V0 turns a request of n samples into n requests seeded seed, seed + 1, ..., seed + n - 1: prompt i's
        # requests start at seed + i·n, so no two samples of a batch share a random stream
        requests = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            [sampling_params(params, i * params.n) for i in range(len(prompts))],
            use_tqdm=False,
        )
        results = []
        for request in requests:
            for out in request.outputs:
                tokens = list(out.token_ids)
                logprobs = [step[token].logprob for step, token in zip(out.logprobs, tokens, strict=True)]
                results.append((tokens, logprobs, "stop" if out.finish_reason == "stop" else "length"))
        return results

    def load_bucket(self, bucket: FlatBucket) -> None:
        self.llm.collective_rpc(_load_weights, args=(pickle.dumps(bucket),))

    def weights_loaded(self, version: int) -> None:
        self.llm.reset_prefix_cache()  # cached prompt blocks hold the old weights' keys and values

    def sleep(self, level: int) -> None:
        self.llm.sleep(level=level)

    def wake(self, tags: list[str]) -> None:
        self.llm.wake_up(tags=tags)

    def close(self) -> None:
        del self.llm


class VllmEngine(ProcessEngine):
    """vLLM 0.8.5 as a ``RolloutEngine``: see the module docstring."""

    name = "vllm"

    def __init__(self, hf_config, rollout, *, decode, seed: int, env: dict[str, str] | None = None,
                 wait: bool = True):
        super().__init__(VllmServer, hf_config, rollout, decode=decode, seed=seed, env=env, wait=wait)
