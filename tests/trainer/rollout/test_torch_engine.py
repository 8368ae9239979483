"""TorchEngine sampling: max_tokens, EOS / stop tokens, greedy, top-k = 1, top-p, seeded repeatability."""

import pytest
import torch

from trainer.rollout import RolloutEngine, SamplingParams, TorchEngine
from trainer.rollout.torch_engine import filter_logits


@pytest.fixture
def engine(matrix):
    return TorchEngine(matrix.models["tiny-qwen2.5"], decode=lambda ids: " ".join(map(str, ids)), seed=0)


PROMPTS = [[5, 6, 7], [9], [10, 11, 12, 13, 14, 15]]


def test_is_a_rollout_engine(engine):
    assert isinstance(engine, RolloutEngine)


def test_max_tokens_and_length_finish(engine):
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=7, seed=0))
    assert [len(o.token_ids) for o in outs] == [7, 7, 7]
    assert all(o.finish_reason == "length" and len(o.logprobs) == 7 for o in outs)
    assert [o.prompt_token_ids for o in outs] == PROMPTS
    assert outs[0].text == " ".join(map(str, outs[0].token_ids))


def test_stop_token_ends_each_sequence_where_it_appears(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))
    stop = greedy[2].token_ids[3]  # a token the third sequence emits at step 4
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop]))
    for full, cut in zip(greedy, outs, strict=True):
        if stop in full.token_ids:
            n = full.token_ids.index(stop) + 1
            assert cut.token_ids == full.token_ids[:n] and cut.finish_reason == "stop"
        else:
            assert cut.token_ids == full.token_ids and cut.finish_reason == "length"
    eos_engine = TorchEngine(engine.model.config, decode=str, eos_token_id=stop, seed=0)
    eos_engine.update_weights(engine.model.named_parameters())
    assert [
        o.token_ids for o in eos_engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))
    ] == [o.token_ids for o in outs]


def test_top_k_one_is_greedy_and_greedy_is_argmax(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6))
    topk1 = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=1, max_tokens=6, seed=3))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in topk1]
    # greedy token 1 of prompt 0 is the argmax of the model's next-token logits
    with torch.no_grad():
        logits = engine.model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    assert greedy[0].token_ids[0] == int(logits.argmax())
    torch.testing.assert_close(
        greedy[0].logprobs[0], float(torch.log_softmax(logits, -1).max()), rtol=0, atol=1e-5
    )


def test_seed_repeats_and_differs(engine):
    p = SamplingParams(max_tokens=10, seed=11)
    a, b = engine.generate(PROMPTS, p), engine.generate(PROMPTS, p)
    c = engine.generate(PROMPTS, SamplingParams(max_tokens=10, seed=12))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=1.0)).tolist() == [[False, False, True, True]]
    # top_p 0.7: 0.5 alone is below 0.7, 0.5 + 0.3 reaches it → keep two
    assert torch.isinf(filter_logits(logits, top_k=-1, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_k=-1, top_p=0.4)).tolist() == [[False, True, True, True]]


def test_sampling_params_are_validated():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_cached_decoding_scores_tokens_as_a_full_forward_does(engine):
    """Left padding, the per-step attention mask and the KV cache: each sampled token's log-prob equals the one a
    plain forward of the whole unpadded sequence gives (a wrong mask width or position would move it)."""
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=6, seed=3))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logits = engine.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        full = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(out.logprobs), full, rtol=0, atol=1e-5)


def test_a_qwen3_next_engine_takes_the_host_paths_where_transformers_bound_gpu_kernels(matrix, monkeypatch):
    """On a machine with a GPU and flash-linear-attention / causal-conv1d, transformers' Qwen3-Next module binds
    their GPU kernels and a fused gated norm made on the current GPU; the torch engine's model runs on the host,
    so its layers must take the torch paths (here the bound names are stand-ins that fail when used)."""
    from transformers.models.qwen3_next import modeling_qwen3_next as modeling

    def gpu_kernel(*args, **kwargs):
        raise RuntimeError("a GPU kernel was called on host tensors")

    class NormOnTheCurrentGpu:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("a norm made on the current GPU")

    for name in ("causal_conv1d_fn", "causal_conv1d_update", "chunk_gated_delta_rule",
                 "fused_recurrent_gated_delta_rule"):
        monkeypatch.setattr(modeling, name, gpu_kernel)
    monkeypatch.setattr(modeling, "FusedRMSNormGated", NormOnTheCurrentGpu)
    engine = TorchEngine(matrix.models["tiny-qwen3-next"], decode=str, seed=0)
    out = engine.generate([[5, 6, 7]], SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=4, seed=1))
    assert len(out[0].token_ids) == 4 and modeling.causal_conv1d_fn is gpu_kernel  # bound again afterwards
