"""SGLang 0.5.2 behind the engine seam, in a process of its own (written against the 0.5.2 wheel's sources).

``SglangServer`` lives in the engine process: ``sglang.Engine(**ServerArgs fields)`` built from the recipe's
``rollout`` settings on a directory holding only the model's HF config (``load_format="dummy"``: random weights
until the first sync loads the policy's), no tokenizer (prompts are token ids). SGLang starts a scheduler process
per TP rank under it; ``shutdown`` (and the driver's process-group kill) ends them.

Weights: each bucket of the driver's sync (``rollout.sync_bucket_mb``) becomes one ``FlattenedTensorBucket`` per
dtype (it concatenates, so one dtype per bucket), sent with ``update_weights_from_tensor(load_format=
"flattened_bucket")`` as one ``MultiprocessingSerializer`` payload per TP rank (each scheduler deserializes its own
and calls the model's ``load_weights`` on the HF-named tensors, which slices them for TP); the tensors stay in host
shared memory. The cache is flushed once after the last bucket (``flush_cache``), not per bucket.

Log-probs: SGLang 0.5.2 returns ``log_softmax(logits / temperature)`` unless ``RETURN_ORIGINAL_LOGPROB`` is set,
when it returns the raw ``log_softmax(logits)`` — the trainer's kind. The server sets it (unless the environment
already says otherwise) before SGLang reads it at import, so TIS and the mismatch metrics compare like with like
at any temperature; ``describe`` reports the kind from SGLang's own flag. SGLang 0.5.2 has no per-request seed:
sampling follows ``ServerArgs.random_seed`` (the recipe's ``run.seed``), so ``SamplingParams.seed`` is not used.

Sleep: ``enable_memory_saver`` when colocated with a sleep level; ``release_memory_occupation()`` frees weights and
KV cache (0.5.2 keeps no host copy of the weights: levels 1 and 2 both need the full sync that follows every
step), ``resume_memory_occupation(tags)`` takes back weights first, then the KV cache.

SGLang 0.5.2 has no CPU engine (``sglang.Engine`` imports sgl_kernel, which needs CUDA): the engine itself is (GPU)
not verified here. What is tested on CPU, against the 0.5.2 wheel's classes (``nox -s tests_sglang``): the
arguments below as ``ServerArgs``, the sampling mapping as SGLang's ``SamplingParams`` and ``GenerateReqInput``,
the weight payloads through ``UpdateWeightsFromTensorReqInput`` back to the tensors.
"""

from __future__ import annotations

import json
import os

from trainer.gpus import check_engine_share
from trainer.rollout.base import SamplingParams
from trainer.rollout.buckets import FlatBucket
from trainer.rollout.process import ProcessEngine, model_dtype

RAW_LOGPROBS_ENV = "RETURN_ORIGINAL_LOGPROB"
STOPPED = {"stop": "stop", "length": "length"}  # SGLang's finish_reason types; "abort" is an error


def server_arguments(config_dir: str, settings: dict, seed: int, dtype: str) -> dict:
    """``sglang.Engine`` keyword arguments (``ServerArgs`` fields) for a recipe's ``rollout`` settings."""
    return {
        "model_path": config_dir,
        "skip_tokenizer_init": True,
        "load_format": "dummy",
        "dtype": dtype,
        "random_seed": seed,
        "tp_size": settings["tp"],
        "mem_fraction_static": settings["gpu_memory_utilization"],
        "disable_cuda_graph": settings["enforce_eager"],
        "context_length": settings["max_model_len"],
        "max_running_requests": settings["max_num_seqs"],
        "enable_memory_saver": bool(settings["colocate"] and settings["sleep_level"]),
        # the trainer's stop tokens come with each request; the config's EOS (the model's, not always the task's)
        # would stop sequences of its own
        "json_model_override_args": json.dumps({"eos_token_id": None}),
        "log_level": "error",
    }


def static_memory_fraction(requested: float, in_use: int, total: int) -> float:
    """The ``mem_fraction_static`` to give SGLang 0.5.2 so that its engine takes ``requested`` of the GPU (the
    recipe's ``rollout.gpu_memory_utilization``) when ``in_use`` bytes of the GPU's ``total`` are held already (a
    colocated trainer's weights and optimizer, built before the engine).

    SGLang sizes weights + KV pool as that fraction of the memory *free when it starts*
    (``ModelRunner.profile_max_num_token``: the free memory after loading less (1 − fraction) × the free memory at
    init), so the recipe's share unchanged would shrink the engine by the trainer's share of the GPU. Raises
    ValueError when the two do not fit the GPU. (GPU not verified here.)"""
    check_engine_share(requested, in_use, total)
    return requested * total / (total - in_use)


def sampling_arguments(params: SamplingParams) -> dict:
    """SGLang's ``sampling_params`` for ours. Our stop tokens are the only ones: the config the engine reads has no
    tokenizer and ``server_arguments`` overrides its EOS with none (``ignore_eos`` would ignore stop_token_ids too);
    ``no_stop_trim`` keeps the stop token in the output, as the seam wants."""
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "no_stop_trim": True,
    }


def generate_arguments(prompts: list[list[int]], params: SamplingParams) -> dict:
    """``Engine.generate`` keyword arguments (``GenerateReqInput`` fields): one sampling dict for the batch, so
    its ``n`` is the request's ``parallel_sample_num`` (SGLang caches each prompt once, then samples n times,
    prompt-major); the sampled tokens' log-probs only."""
    return {
        "input_ids": [list(p) for p in prompts],
        "sampling_params": sampling_arguments(params),
        "return_logprob": True,
        "logprob_start_len": -1,
        "top_logprobs_num": 0,
    }


def flattened_buckets(bucket: FlatBucket) -> list:
    """SGLang ``FlattenedTensorBucket``s holding ``bucket``'s tensors, one per dtype, in stream order within each."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    by_dtype: dict = {}
    for name, tensor in bucket.tensors():
        by_dtype.setdefault(tensor.dtype, []).append((name, tensor))
    return [FlattenedTensorBucket(named_tensors=named) for named in by_dtype.values()]


def rank_payloads(flattened, tp: int) -> list[bytes]:
    """``update_weights_from_tensor``'s ``named_tensors`` with ``load_format="flattened_bucket"``: one
    ``MultiprocessingSerializer`` payload per TP rank, each the dict that SGLang's model runner rebuilds the bucket
    from. The flattened tensor stays in host shared memory; each scheduler's ``load_weights`` copies from it to its
    GPU. SGLang's ``monkey_patch_torch_reductions`` (device UUIDs for CUDA IPC) is not applied on this side: it
    breaks the pickling of CPU tensors (IndexError in its ``_reduce_tensor_modified``, measured with 0.5.2); the
    schedulers apply it themselves and it changes only how CUDA tensors are rebuilt."""
    from sglang.srt.utils import MultiprocessingSerializer

    payload = {"flattened_tensor": flattened.get_flattened_tensor(), "metadata": flattened.get_metadata()}
    return [MultiprocessingSerializer.serialize(payload) for _ in range(tp)]


def outputs(results: list[dict]) -> list[tuple[list[int], list[float], str]]:
    """(token_ids, log-probs, finish_reason) of ``Engine.generate``'s outputs (skip_tokenizer_init: ``output_ids``;
    ``meta_info.output_token_logprobs`` = [(logprob, token_id, text)])."""
    converted = []
    for result in results:
        meta = result["meta_info"]
        finish = meta["finish_reason"]
        if finish["type"] not in STOPPED:
            raise RuntimeError(f"request {meta.get('id')} ended with {finish}")
        tokens = list(result["output_ids"])
        logprobs = [logprob for logprob, _, _ in meta["output_token_logprobs"]]
        if len(logprobs) != len(tokens):
            raise RuntimeError(
                f"request {meta.get('id')}: {len(tokens)} tokens but {len(logprobs)} log-probs"
            )
        converted.append((tokens, logprobs, STOPPED[finish["type"]]))
    return converted


class SglangServer:
    """The engine process's side: one ``sglang.Engine``."""

    def __init__(self, config_dir: str, settings: dict, seed: int):
        os.environ.setdefault(RAW_LOGPROBS_ENV, "1")  # read once, at sglang.srt.layers.sampler's import
        import pynvml
        import sglang
        from sglang.srt.layers import sampler

        from trainer.gpus import fullest_gpu

        self.tp = settings["tp"]
        arguments = server_arguments(config_dir, settings, seed, model_dtype(config_dir))
        arguments["mem_fraction_static"] = static_memory_fraction(
            arguments["mem_fraction_static"], *fullest_gpu(pynvml, self.tp)
        )
        self.engine = sglang.Engine(**arguments)
        self.raw_logprobs = bool(sampler.RETURN_ORIGINAL_LOGPROB)
        self.version = sglang.__version__

    def describe(self) -> dict:
        return {"logprob_kind": "raw" if self.raw_logprobs else "processed", "version": self.version}

    def generate(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> list[tuple[list[int], list[float], str]]:
        results = self.engine.generate(**generate_arguments(prompts, params))
        return outputs(results if isinstance(results, list) else [results])

    def load_bucket(self, bucket: FlatBucket) -> None:
        for flattened in flattened_buckets(bucket):
            success, message = self.engine.update_weights_from_tensor(
                rank_payloads(flattened, self.tp), load_format="flattened_bucket", flush_cache=False
            )
            if not success:
                raise RuntimeError(f"update_weights_from_tensor: {message}")

    def weights_loaded(self, version: int) -> None:
        self.engine.flush_cache()  # the radix cache holds the old weights' keys and values

    def sleep(self, level: int) -> None:
        self.engine.release_memory_occupation()

    def wake(self, tags: list[str]) -> None:
        self.engine.resume_memory_occupation(tags=list(tags))

    def close(self) -> None:
        self.engine.shutdown()


class SglangEngine(ProcessEngine):
    """SGLang 0.5.2 as a ``RolloutEngine``: see the module docstring."""

    name = "sglang"

    def __init__(self, hf_config, rollout, *, decode, seed: int, env: dict[str, str] | None = None,
                 wait: bool = True):
        super().__init__(SglangServer, hf_config, rollout, decode=decode, seed=seed, env=env, wait=wait)
