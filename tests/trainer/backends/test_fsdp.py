"""FSDP2 backend pieces on one process: packing keeps rows apart, the Ulysses mask, the backend against a plain
forward, a train step, weights in and out under HF names, and a DCP checkpoint that resumes exactly.
Multi-process FSDP (2 ranks, Ulysses) is checked against megatron-core by the fsdp-equivalence gate, by the
resume test in test_multiprocess_runs.py and by the streamed weight sync test in test_weight_sync.py.
"""

import pytest
import torch

from matrix.schema import Layout
from trainer.backends.fsdp import FSDPBackend, build_hf_model
from trainer.packing import budget_groups, pack_rows
from trainer.parallel.process_groups import process_groups
from trainer.parallel.ulysses import packed_causal_mask
from trainer.worker import one_process


@pytest.fixture
def resolved(matrix):
    return one_process(matrix.resolve("tiny-qwen3-fsdp"))


@pytest.fixture
def fsdp_groups():
    with process_groups(Layout(fsdp=True)):
        yield


def batch(seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    for row, length in ((0, 6), (2, 3)):
        mask[row, length:] = 0
        ids[row, length:] = 0
    response = mask[:, 1:].float()
    response[:, :2] = 0  # a 3-token prompt
    return {"input_ids": ids, "attention_mask": mask, "response_mask": response}


def row_logprobs(model, ids, mask):
    """Each row alone, unpadded: the log-probs packing must reproduce."""
    out = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    with torch.no_grad():
        for i in range(ids.shape[0]):
            n = int(mask[i].sum())
            logits = model(input_ids=ids[i: i + 1, :n], use_cache=False).logits[0, :-1]
            out[i, : n - 1] = torch.log_softmax(logits, -1).gather(-1, ids[i, 1:n, None]).squeeze(-1)
    return out


def test_budget_groups_keep_order_and_fit_the_budget():
    assert budget_groups([3, 4, 2, 9, 1], 7) == [[0, 1], [2], [3], [4]]
    assert budget_groups([], 7) == []


def test_packed_rows_never_attend_to_each_other(resolved):
    torch.manual_seed(0)
    model = build_hf_model(resolved, on_meta=False).eval()
    b = batch()
    expected = row_logprobs(model, b["input_ids"], b["attention_mask"])
    packed = pack_rows(b["input_ids"], b["attention_mask"].sum(1).tolist(), multiple=4)
    assert packed.width % 4 == 0 and packed.position_ids[0, :6].tolist() == list(range(6))

    def packed_logprobs(position_ids):
        with torch.no_grad():
            logits = model(input_ids=packed.input_ids, position_ids=position_ids, use_cache=False).logits
        logp = torch.log_softmax(logits, -1).gather(-1, packed.labels[..., None]).squeeze(-1)
        return packed.unpack(logp)

    real = b["attention_mask"][:, 1:].bool() & b["attention_mask"][:, :-1].bool()
    torch.testing.assert_close(packed_logprobs(packed.position_ids)[real], expected[real], rtol=0, atol=1e-5)
    # one running position sequence would let the second row attend to the first: the comparison sees it
    running = torch.arange(packed.width)[None]
    assert (packed_logprobs(running)[real] - expected[real]).abs().max() > 1e-2


def test_packed_tensors_are_made_on_the_rows_device():
    """The batch is on the rank's device (a GPU's): positions, labels, what is scored and where it goes must be
    made there too, not on the host. A "meta" device shows where each lands (the lengths are read on the host)."""
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    packed = pack_rows(ids.to("meta"), (ids > 0).sum(1).tolist(), multiple=4)
    tensors = (packed.input_ids, packed.position_ids, packed.labels, packed.scored, packed.target)
    assert [t.device.type for t in tensors] == ["meta"] * 5


def test_packed_causal_mask_is_block_diagonal():
    mask = packed_causal_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]))[0, 0]
    assert mask.tolist()[4] == [False, False, False, True, True, False]
    assert mask.tolist()[2] == [True, True, True, False, False, False]
    assert mask[5].tolist() == [False] * 5 + [True]


def nll(tokens):
    def loss_fn(logp, entropy, mb):
        return -torch.where(mb["response_mask"].bool(), logp, 0).sum() / tokens, {}
    return loss_fn


def test_backend_logprobs_and_train_step(resolved, fsdp_groups):
    be = FSDPBackend(resolved, seed=0)
    b = batch()
    whole = dict(be.hf_named_tensors())
    plain = build_hf_model(resolved, on_meta=False)
    plain.load_state_dict(whole, strict=False)
    expected = row_logprobs(plain.eval(), b["input_ids"], b["attention_mask"])
    logp = be.logprobs(b, micro_batch_size=8)
    torch.testing.assert_close(logp, expected, rtol=0, atol=1e-5)  # padded positions are 0 in both

    before = -(logp * b["response_mask"]).sum()
    stats = be.train_step(b, nll, micro_batch_size=8)
    assert stats["grad_norm"] > 0
    assert stats["loss"] == pytest.approx(float(before / b["response_mask"].sum()), rel=1e-5)
    after = -(be.logprobs(b, micro_batch_size=8) * b["response_mask"]).sum()
    assert after < before


def test_weights_round_trip_through_hf_names_and_meta_initialisation(resolved, fsdp_groups):
    source = FSDPBackend(resolved, seed=1)
    whole = dict(source.hf_named_tensors())
    assert "model.layers.0.self_attn.q_norm.weight" in whole  # qwen3's QK-norm, under transformers' names
    started = FSDPBackend(resolved, seed=2, initial=whole)  # meta device, then sharded from the whole tensors
    for name, tensor in started.hf_named_tensors():
        assert torch.equal(tensor, whole[name]), name
    b = batch()
    torch.testing.assert_close(started.logprobs(b, micro_batch_size=8), source.logprobs(b, micro_batch_size=8),
                               rtol=0, atol=0)
    with pytest.raises(KeyError, match="lack 1 parameter"):
        FSDPBackend(resolved, seed=2, initial={k: v for k, v in whole.items() if k != "model.norm.weight"})


def test_checkpoint_is_a_dcp_directory_and_resumes_exactly(resolved, fsdp_groups, tmp_path):
    trained = FSDPBackend(resolved, seed=0)
    trained.train_step(batch(0), nll, micro_batch_size=8)
    own = trained.save(tmp_path / "policy")
    assert (tmp_path / "policy" / ".metadata").is_file() and list((tmp_path / "policy").glob("*.distcp"))
    assert own["steps"] == 1 and "model" not in own  # the rank file keeps only the per-rank state

    resumed = FSDPBackend(resolved, seed=1)  # other weights, fresh optimizer: all must come from the checkpoint
    resumed.load(tmp_path / "policy", own)
    # the next step needs AdamW's moments and step count as well as the weights to agree bit for bit
    assert resumed.train_step(batch(1), nll, micro_batch_size=8) == trained.train_step(batch(1), nll,
                                                                                        micro_batch_size=8)
    for (name, ours), (_, theirs) in zip(resumed.hf_named_tensors(), trained.hf_named_tensors(), strict=True):
        assert torch.equal(ours, theirs), name
    assert torch.equal(torch.get_rng_state(), own["rng"]["torch"])

    reference, other = (FSDPBackend(resolved, seed=seed, trainable=False) for seed in (2, 3))  # model alone
    other.load(tmp_path / "reference", reference.save(tmp_path / "reference"))
    for (name, ours), (_, theirs) in zip(other.hf_named_tensors(), reference.hf_named_tensors(), strict=True):
        assert torch.equal(ours, theirs), name


def test_a_resume_restores_the_platforms_device_generator(resolved, fsdp_groups, tmp_path):
    from tests.trainer.backends.device_generator import DeviceGeneratorPlatform

    platform = DeviceGeneratorPlatform()
    own = FSDPBackend(resolved, seed=0, platform=platform).save(tmp_path / "policy")
    expected = torch.rand(4, generator=platform.generator)
    FSDPBackend(resolved, seed=1, platform=platform).load(tmp_path / "policy", own)
    assert torch.equal(torch.rand(4, generator=platform.generator), expected)


def test_a_bf16_run_syncs_its_weights_in_bf16(fsdp_groups):
    """bf16 runs keep fp32 master weights; the engine gets them gathered in the forward's dtype (half the bytes:
    a hub-sized fp32 embedding would outgrow the seeds' sync buckets), while checkpoints and exports keep fp32."""
    from trainer.config import parse_overrides, resolve

    bf16 = one_process(resolve("tiny-qwen3-fsdp", parse_overrides(["precision=bf16"])))
    backend = FSDPBackend(bf16, seed=0)
    masters = dict(backend.hf_named_tensors())
    synced = dict(backend.hf_named_tensors(compute_dtype=True))
    assert {t.dtype for t in masters.values()} == {torch.float32}
    assert {t.dtype for t in synced.values()} == {torch.bfloat16}
    assert all(torch.equal(synced[name], tensor.to(torch.bfloat16)) for name, tensor in masters.items())


def test_gradients_are_summed_under_either_torch_api():
    """torch ≥ 2.8 sums with a plain SUM (divide factor 1); torch 2.6/2.7 has only the reduce-scatter divide
    factor (NCCL's PreMulSum by 1). Unset, FSDP averages: gradients divided by the world size."""
    from trainer.backends.fsdp import sum_gradients

    class Newer:
        def set_gradient_divide_factor(self, factor):
            self.calls = [*getattr(self, "calls", []), ("divide", factor)]

        def set_force_sum_reduction_for_comms(self, force):
            self.calls = [*self.calls, ("sum", force)]

    class Older:
        def set_reduce_scatter_divide_factor(self, factor):
            self.calls = [("reduce_scatter_divide", factor)]

    newer, older = Newer(), Older()
    sum_gradients(newer)
    sum_gradients(older)
    assert newer.calls == [("divide", 1.0), ("sum", True)] and older.calls == [("reduce_scatter_divide", 1.0)]


@pytest.mark.parametrize("multiple", [1, 4])
def test_a_padding_only_micro_batch_has_a_label_per_token(multiple):
    """A rank with fewer micro-batches than another runs padding-only ones (FSDP's collectives need as many on
    every rank): their labels must match their tokens, or the log-prob gather fails on that rank alone."""
    from trainer.packing import empty

    packed = empty(multiple, 7, torch.device("cpu"))
    assert packed.input_ids.shape == packed.labels.shape == packed.position_ids.shape == (1, multiple)
    assert not packed.scored.any()
