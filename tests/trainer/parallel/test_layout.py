"""ParallelLayout: the degree arithmetic, checked without process groups (torchtitan's test_parallel_dims)."""

from matrix.layout import ParallelLayout, derived_sizes
from matrix.schema import MLA, Layout, MoE, Shape

DENSE = Shape(layers=6, hidden=64, ffn_hidden=128, heads=4, query_groups=2, vocab=128, max_position=256)


def test_dp_is_world_over_tp_cp_pp_and_coords_follow_megatron_order():
    dims = ParallelLayout(tp=2, cp=2, pp=2, world_size=16)
    assert dims.dp == 2 and dims.min_world == 8
    assert dims.coords(0) == {"tp": 0, "cp": 0, "dp": 0, "pp": 0}
    assert dims.coords(1) == {"tp": 1, "cp": 0, "dp": 0, "pp": 0}
    assert dims.coords(2) == {"tp": 0, "cp": 1, "dp": 0, "pp": 0}
    assert dims.coords(4) == {"tp": 0, "cp": 0, "dp": 1, "pp": 0}
    assert dims.coords(15) == {"tp": 1, "cp": 1, "dp": 1, "pp": 1}


def test_min_world_is_lcm_of_dense_and_expert_grids():
    dims = ParallelLayout(tp=2, pp=8, ep=2, etp=2, world_size=32)
    assert dims.min_world == 32 and dims.world_problem(None) is None
    short = ParallelLayout(tp=2, pp=8, ep=2, etp=2, world_size=8)
    assert "8 is too few: lcm(TP·CP·PP=16, ETP·EP·PP=32) = 32; declare gpus: 32" in short.world_problem(None)


def test_uneven_stages_split_the_rest_evenly_and_refuse_what_does_not_fit():
    assert ParallelLayout(pp=4, first_stage_layers=1, last_stage_layers=1).stage_layers(6) == [1, 2, 2, 1]
    assert list(ParallelLayout(pp=2, first_stage_layers=2, last_stage_layers=1).stage_problems(3)) == []
    (key, msg), = ParallelLayout(pp=3, first_stage_layers=1).stage_problems(6)
    assert key == "pp" and "layers=6 - first=1 - last=0 = 5 layers do not split over 2 stage(s)" in msg


def test_model_problems_name_the_dimension_and_the_degree():
    problems = dict(ParallelLayout(tp=4, ep=2).model_problems(DENSE, "m"))
    assert problems["tp"] == "4 does not divide query_groups=2 of model m"
    assert "is dense: expert parallelism (ep=2" in problems["ep"]
    moe = DENSE.model_copy(update={"moe": MoE(experts=6, topk=2, ffn_hidden=32),
                                   "mla": MLA(q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                              v_head_dim=16)})
    assert dict(ParallelLayout(tp=4, ep=4, sequence_parallel=True).model_problems(moe, "m")) == {
        "ep": "4 does not divide experts=6 of model m"}  # MLA: no query-group rule
    assert "needs sequence_parallel: true" in dict(ParallelLayout(tp=2).model_problems(moe, "m"))["sequence_parallel"]


def test_sequence_unit_is_2cp_and_2tpcp_with_sequence_parallel():
    assert ParallelLayout(cp=2).sequence_problem(32, 14) == (
        "sequence length 32+14=46 is not a multiple of 2·CP=4; pick lengths whose sum divides by 4")
    assert ParallelLayout(tp=2, cp=2, sequence_parallel=True).sequence_unit() == 8


def test_derived_sizes_of_matrix_layouts():
    assert derived_sizes(Layout(tp=2, pp=2, cp=2, ep=2), 8) == (8, 1)
    assert derived_sizes(Layout(dp=2), 2) == (2, 2)
    assert derived_sizes(Layout(fsdp=True, dp=8), 8) == (8, 8)


def test_context_parallelism_is_refused_for_linear_attention(matrix):
    shape = matrix.models["tiny-qwen3-next"].shape
    problems = dict(ParallelLayout(cp=2, world_size=2).model_problems(shape, "tiny-qwen3-next"))
    assert "gated delta-net" in problems["cp"] and "use cp: 1" in problems["cp"]
    assert "cp" not in dict(ParallelLayout(ep=2, world_size=2).model_problems(shape, "tiny-qwen3-next"))
