"""A sharded conversion builds its ranks' models on the meta device: shapes and megatron's TP attributes, no
memory (it filled a random model's worth per rank before: ~2.7 TB over DeepSeek-V3's 128 conversion ranks)."""

import pytest

from trainer.models.build import build_gpt_model
from trainer.parallel.gather import mark_tp_groups


@pytest.mark.parametrize("name", ["tiny-qwen2.5", "tiny-moonlight"])
def test_an_unmaterialized_model_has_the_same_parameters_on_meta(matrix, groups, name):
    real = dict(build_gpt_model(matrix.models[name], seed=0).named_parameters())
    meta = build_gpt_model(matrix.models[name], seed=0, materialize=False)
    mark_tp_groups(meta)
    shapes = {n: (tuple(p.shape), p.dtype, getattr(p, "tensor_model_parallel", False)) for n, p in real.items()}
    assert {n: (tuple(p.shape), p.dtype, getattr(p, "tensor_model_parallel", False))
            for n, p in meta.named_parameters()} == shapes
    assert {p.device.type for p in meta.parameters()} == {"meta"}
