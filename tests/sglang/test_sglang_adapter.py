"""The SGLang 0.5.2 adapter's data against the 0.5.2 wheel's own classes, on CPU (the engine itself needs CUDA).

What the adapter hands SGLang is built here and read back by SGLang's code: the recipe's engine arguments as
``ServerArgs`` (its ``__post_init__`` and ``check_server_args``), the sampling mapping as ``SamplingParams``
(``verify``) inside a ``GenerateReqInput`` (``normalize_batch_and_arguments``), a tiny model's weights as
``FlattenedTensorBucket`` payloads of ``MultiprocessingSerializer`` inside ``UpdateWeightsFromTensorReqInput``,
rebuilt the way a TP worker and the model runner do, in another process. ``sglang.Engine`` does not import without
CUDA (sgl_kernel): the methods the server calls are checked against its source in the wheel.
"""

import ast
import hashlib
import importlib.util
import json
import multiprocessing
from pathlib import Path

import pytest
import torch

from trainer.rollout.base import SamplingParams
from trainer.rollout.buckets import MB, flat_buckets
from trainer.rollout.factory import engine_rollout
from trainer.rollout.process import model_dtype, write_config
from trainer.rollout.sglang_engine import (
    SglangServer,
    flattened_buckets,
    generate_arguments,
    rank_payloads,
    sampling_arguments,
    server_arguments,
)

SGLANG = Path(importlib.util.find_spec("sglang").submodule_search_locations[0])


@pytest.fixture(scope="module")
def tiny_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                       eos_token_id=3, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def config_dir(tiny_config, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sglang-config")
    write_config(tiny_config, str(directory))
    return str(directory)


def test_recipe_becomes_server_args_sglang_accepts(matrix, config_dir):
    """Stack C's recipe (SGLang TP4, colocated) through the adapter into SGLang's own ``ServerArgs``."""
    from sglang.srt.hf_transformers_utils import get_config
    from sglang.srt.server_args import ServerArgs

    r = matrix.resolve("qwen3-next")
    settings = engine_rollout(r).model_dump()
    # device: SGLang picks cuda itself on a GPU; here it would refuse ("No accelerator") before reading the rest
    args = ServerArgs(**server_arguments(config_dir, settings, r.recipe.run.seed, model_dtype(config_dir)),
                      device="cpu")
    args.check_server_args()
    rollout = r.recipe.rollout
    assert (args.model_path, args.skip_tokenizer_init, args.load_format, args.dtype) == (
        config_dir, True, "dummy", "float32")
    assert (args.tp_size, args.mem_fraction_static, args.context_length, args.max_running_requests) == (
        rollout.tp, rollout.gpu_memory_utilization, rollout.max_model_len, rollout.max_num_seqs)
    assert (args.tp_size, args.mem_fraction_static, args.context_length) == (4, 0.6, 9216)
    assert args.random_seed == r.recipe.run.seed
    assert args.disable_cuda_graph is rollout.enforce_eager
    assert args.enable_memory_saver is True  # colocated with sleep level 1: release/resume_memory_occupation
    # the model config SGLang loads (its get_config, with the override ModelConfig passes) has no EOS of its own
    assert json.loads(Path(config_dir, "config.json").read_text())["eos_token_id"] == 3
    overridden = get_config(args.model_path, trust_remote_code=False, revision=None,
                            model_override_args=json.loads(args.json_model_override_args))
    assert overridden.eos_token_id is None and overridden.num_key_value_heads == 1


def test_not_colocated_engine_has_no_memory_saver(matrix, config_dir):
    from sglang.srt.server_args import ServerArgs

    settings = engine_rollout(matrix.resolve("qwen3-next")).model_dump() | {"colocate": False}
    args = ServerArgs(**server_arguments(config_dir, settings, 1, "bfloat16"), device="cpu")
    assert args.enable_memory_saver is False and args.dtype == "bfloat16"


@pytest.mark.parametrize(
    ("ours", "expected"),
    [
        # (temperature, top_p, top_k) as SGLang holds them after its own normalization
        (SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_tokens=16, stop_token_ids=(3, 5), n=4),
         (0.7, 0.9, 20)),
        (SamplingParams(temperature=1.0, max_tokens=8, n=2), (1.0, 1.0, 1 << 30)),  # top_k -1: whole vocabulary
        (SamplingParams(temperature=0.0, max_tokens=8), (1.0, 1.0, 1)),  # greedy: SGLang's top_k 1
    ],
    ids=["filtered", "plain", "greedy"],
)
def test_sampling_mapping_is_what_sglang_samples_with(ours, expected, tiny_config):
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams as SglangSamplingParams

    theirs = SglangSamplingParams(**sampling_arguments(ours))
    theirs.verify(tiny_config.vocab_size)
    theirs.normalize(None)
    assert (theirs.temperature, theirs.top_p, theirs.top_k) == expected
    assert theirs.max_new_tokens == ours.max_tokens and theirs.n == ours.n
    assert theirs.stop_token_ids == (set(ours.stop_token_ids) or None)
    assert not theirs.ignore_eos and theirs.no_stop_trim  # stop tokens end sequences and stay in them

    prompts = [[5, 6, 7], [9, 3], [10, 11, 12, 13]]
    request = GenerateReqInput(**generate_arguments(prompts, ours))
    request.normalize_batch_and_arguments()
    assert (request.batch_size, request.parallel_sample_num, request.is_single) == (3, ours.n, False)
    assert [request[i].input_ids for i in range(3)] == prompts
    assert all(request[i].return_logprob and request[i].logprob_start_len == -1 for i in range(3))


def _engine_methods() -> dict[str, list[str]]:
    """``sglang.Engine``'s methods and their parameter names, read from the wheel's source (it does not import
    without CUDA)."""
    tree = ast.parse((SGLANG / "srt" / "entrypoints" / "engine.py").read_text())
    engine = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Engine")
    return {f.name: [a.arg for a in f.args.args + f.args.kwonlyargs][1:]
            for f in engine.body if isinstance(f, ast.FunctionDef)}


class _RecordingEngine:
    """Records the server's calls to ``sglang.Engine`` (checked against Engine's signatures below)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, method):
        def record(*args, **kwargs):
            self.calls.append((method, args, kwargs))
            return (True, "Success") if method == "update_weights_from_tensor" else None

        return record


def test_server_calls_engine_methods_as_sglang_defines_them(tiny_config):
    methods = _engine_methods()
    server = SglangServer.__new__(SglangServer)  # its __init__ starts sglang.Engine: CUDA only
    server.engine, server.tp = _RecordingEngine(), 2
    model = torch.nn.Linear(4, 3)
    server.load_bucket(next(flat_buckets(model.named_parameters(), MB)))
    server.weights_loaded(1)
    server.sleep(1)
    server.wake(["weights"])
    server.close()
    called = [method for method, _, _ in server.engine.calls]
    assert called == ["update_weights_from_tensor", "flush_cache", "release_memory_occupation",
                      "resume_memory_occupation", "shutdown"]
    for method, args, kwargs in server.engine.calls:
        parameters = methods[method]
        assert len(args) <= len(parameters) and set(kwargs) <= set(parameters), (method, parameters)
    assert set(generate_arguments([[1]], SamplingParams())) <= set(methods["generate"])


def _tiny_weights(tiny_config) -> list[tuple[str, torch.Tensor]]:
    """A tiny Qwen2's HF-named tensors, the norms in bf16 so that buckets mix dtypes."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_config)
    return [(name, t.detach().to(torch.bfloat16) if "norm" in name else t.detach())
            for name, t in model.state_dict().items()]


def _rebuild(payload: bytes) -> list[tuple[str, torch.Tensor]]:
    """What an SGLang TP worker does with its payload (tp_worker.update_weights_from_tensor →
    model_runner._update_weights_from_flattened_bucket, 0.5.2): deserialize, rebuild the bucket, reconstruct."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

    received = MultiprocessingSerializer.deserialize(payload)
    metadata = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                        end_idx=m.end_idx, numel=m.numel) for m in received["metadata"]]
    return FlattenedTensorBucket(flattened_tensor=received["flattened_tensor"],
                                 metadata=metadata).reconstruct_tensors()


def _digests(named) -> list[tuple[str, str, tuple, str]]:
    return [(name, str(t.dtype), tuple(t.shape), hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest())
            for name, t in named]


def _rebuild_in_child(conn) -> None:
    """A TP rank's scheduler: another process, receiving the payload bytes; it patches torch's reductions first,
    as the TP worker does (in this process the patch cannot break the sender's pickling of CPU tensors)."""
    from sglang.srt.patch_torch import monkey_patch_torch_reductions

    monkey_patch_torch_reductions()
    payloads = conn.recv()
    conn.send([_digests(_rebuild(p)) for p in payloads])
    conn.close()


def test_weights_cross_as_sglang_payloads_bit_equal_per_rank_within_the_bound(tiny_config):
    """Rank 0's payloads rebuilt here, rank 1's in another process (as SGLang's schedulers receive them: the
    payloads as bytes, the tensors in shared memory). A payload can be opened once (torch shares each storage's
    file descriptor once), which is how SGLang uses them: one per rank."""
    from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput

    weights = _tiny_weights(tiny_config)
    limit = int(0.03 * MB)  # several buckets for the 0.2 MB model
    requests = []
    for bucket in flat_buckets(weights, limit):
        flattened = flattened_buckets(bucket)
        # SGLang's bucket concatenates into one dtype: one per dtype keeps each within the bucket's bytes
        assert sum(f.get_flattened_tensor().nbytes for f in flattened) <= bucket.nbytes <= limit
        requests += [UpdateWeightsFromTensorReqInput(serialized_named_tensors=rank_payloads(f, 2),
                                                     load_format="flattened_bucket", flush_cache=False)
                     for f in flattened]
    assert len(requests) > 3 and {t.dtype for _, t in weights} == {torch.float32, torch.bfloat16}
    expected = sorted(_digests(weights))
    rank0 = [d for request in requests for d in _digests(_rebuild(request.serialized_named_tensors[0]))]
    assert sorted(rank0) == expected  # every tensor, bit-equal

    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_rebuild_in_child, args=(child,))
    process.start()
    child.close()  # a child that dies closes the pipe: recv raises instead of waiting
    try:
        parent.send([request.serialized_named_tensors[1] for request in requests])
        assert parent.poll(120), "the child did not answer within 120 s"
        rank1 = [d for digests in parent.recv() for d in digests]
    finally:
        process.join(timeout=60)
        if process.is_alive():
            process.kill()
    assert sorted(rank1) == expected


def _sglang_kv_pool_gib(mem_fraction_static: float, *, total: float, trainer: float, weights: float) -> float:
    """SGLang 0.5.2's own ``ModelRunner.profile_max_num_token`` (its source, from the wheel: the module needs CUDA
    to import), run on a simulated GPU of ``total`` GiB, ``trainer`` GiB held by another process and ``weights``
    GiB loaded by the engine; its KV pool in GiB. SGLang's ``total_gpu_memory`` argument is the memory free at
    its init, as ``init_torch_distributed`` measures it."""
    from types import SimpleNamespace

    path = SGLANG / "srt" / "model_executor" / "model_runner.py"
    (method,) = [node for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.FunctionDef) and node.name == "profile_max_num_token"]
    cell = 8 * 128 * 32 * 2 * 2  # KV heads × head dim × layers × (K, V) × bf16 bytes
    namespace = {
        "get_available_gpu_memory": lambda *args, **kwargs: total - trainer - weights,  # GiB free after loading
        "get_world_group": lambda: SimpleNamespace(world_size=1, cpu_group=None),
        "get_attention_tp_size": lambda: 1,
        "torch": SimpleNamespace(_utils=SimpleNamespace(_element_size=lambda dtype: 2)),
    }
    exec(compile(ast.Module([method], type_ignores=[]), str(path), "exec"), namespace)
    runner = SimpleNamespace(
        device="cuda", gpu_id=0, is_draft_worker=False, is_hybrid_gdn=False, use_mla_backend=False,
        num_effective_layers=32, kv_cache_dtype=None, mem_fraction_static=mem_fraction_static,
        model_config=SimpleNamespace(get_num_kv_heads=lambda tp: 8, head_dim=128),
    )
    tokens = namespace["profile_max_num_token"](runner, total - trainer)
    return tokens * cell / 2**30


def test_a_colocated_engine_gets_its_share_beside_the_trainers_memory():
    """On an 80 GiB GPU where the trainer holds 30 GiB, an engine whose recipe asks for 0.6 (48 GiB) with 16 GiB of
    weights should have a 32 GiB KV pool. SGLang takes its fraction of the memory free at start: given 0.6 as it
    is, 14 GiB; given ``static_memory_fraction``'s value, 32. A share that does not fit beside the trainer is
    refused, naming the most it could be."""
    from trainer.rollout.sglang_engine import static_memory_fraction

    gib = 2**30
    gpu = {"total": 80.0, "trainer": 30.0, "weights": 16.0}
    assert _sglang_kv_pool_gib(0.6, **gpu) == pytest.approx(14.0, rel=1e-4)
    assert _sglang_kv_pool_gib(static_memory_fraction(0.6, 30 * gib, 80 * gib), **gpu) == pytest.approx(32.0, rel=1e-4)
    alone = static_memory_fraction(0.6, 0, 80 * gib)
    assert alone == 0.6 and _sglang_kv_pool_gib(alone, **gpu | {"trainer": 0.0}) == pytest.approx(32.0, rel=1e-4)
    with pytest.raises(ValueError, match=r"lower it to at most 0\.62"):
        static_memory_fraction(0.7, 30 * gib, 80 * gib)
