"""Weight sync: after update_weights(backend.hf_named_tensors()), the engine's log-probs of its own samples
equal the trainer's recomputed log-probs; before the sync they do not. FSDP2 streams: two ranks gather one
parameter at a time and the driver never holds two whole parameters at once."""

import weakref

import pytest
import torch

from trainer.backends.megatron import MegatronBackend
from trainer.rollout import SamplingParams, TorchEngine


def right_padded(outs):
    """(B, T) prompt+response ids, right-padded, as the trainer sees them."""
    rows = [o.prompt_token_ids + o.token_ids for o in outs]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def max_logprob_gap(backend, engine, prompts):
    outs = engine.generate(
        prompts, SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=12, seed=5)
    )
    ids, mask = right_padded(outs)
    trainer_logp = backend.logprobs({"input_ids": ids, "attention_mask": mask}, micro_batch_size=8)
    gap = 0.0
    for i, o in enumerate(outs):
        start = len(o.prompt_token_ids) - 1  # logp[:, t] scores token t + 1
        ours = trainer_logp[i, start : start + len(o.token_ids)]
        gap = max(gap, (ours - torch.tensor(o.logprobs)).abs().max().item())
    return gap


def test_engine_logprobs_match_backend_after_sync(matrix, groups):
    for name in ("tiny-qwen2.5", "tiny-qwen3", "tiny-moonlight", "tiny-qwen3-next"):
        resolved = matrix.resolve(name)
        backend = MegatronBackend(resolved, seed=1)
        engine = TorchEngine(resolved.model, decode=str, seed=2)
        g = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(1, 128, (int(n),), generator=g).tolist()
            for n in torch.randint(2, 20, (16,), generator=g)
        ]
        assert max_logprob_gap(backend, engine, prompts) > 1e-2, name  # different weights: the test can fail
        engine.update_weights(backend.hf_named_tensors())
        assert max_logprob_gap(backend, engine, prompts) < 1e-5, name


class LiveTensors:
    """Wraps a stream of (name, tensor): how many of the tensors it handed out were alive at once, and bytes."""

    def __init__(self):
        self.live = self.live_bytes = self.peak = self.peak_bytes = self.seen = 0

    def watch(self, stream):
        for name, tensor in stream:
            self.seen += 1
            self._count(1, tensor.numel() * tensor.element_size())
            weakref.finalize(tensor, self._count, -1, -tensor.numel() * tensor.element_size())
            yield name, tensor
            del tensor

    def _count(self, tensors, nbytes):
        self.live, self.live_bytes = self.live + tensors, self.live_bytes + nbytes
        self.peak, self.peak_bytes = max(self.peak, self.live), max(self.peak_bytes, self.live_bytes)


def stream_a_trained_fsdp_policy(resolved):
    """One of two FSDP ranks: a train step, then the weight sync into the driver's engine through a watch on the
    stream. The driver returns what the watch saw, the bytes sync reported, and the engine's and policy's weights."""
    from matrix.layout import ParallelLayout
    from trainer.backends.fsdp import FSDPBackend
    from trainer.parallel.job import Job
    from trainer.parallel.rank import rank_session
    from trainer.weight_sync import sync_weights

    with rank_session(resolved.layout) as me:
        rank, world = me.rank, me.world
        policy = FSDPBackend(resolved, seed=0)
        ids = torch.randint(1, 128, (4, 12), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": torch.ones(4, 11)}
        policy.train_step(batch, lambda tokens: lambda logp, _, mb: (-logp.sum() / tokens, {}), micro_batch_size=4)
        job = Job(ParallelLayout.of(resolved.layout, world), rank)
        engine = TorchEngine(resolved.model, decode=str, seed=2) if job.is_driver else None
        watch, stream = LiveTensors(), policy.hf_named_tensors
        policy.hf_named_tensors = lambda **kwargs: watch.watch(stream(**kwargs))
        sent = sync_weights(policy, engine, job)
        trained = dict(stream())
        return job.on_driver(lambda: {"watch": vars(watch), "sent": sent, "trained": trained,
                                      "engine": {k: v.clone() for k, v in engine.model.named_parameters()}})


@pytest.mark.slow
def test_fsdp_sync_streams_one_whole_parameter_at_a_time(matrix):
    from trainer.parallel.launcher import launch

    got = launch(stream_a_trained_fsdp_policy, 2, matrix.resolve("tiny-qwen3-fsdp"))
    trained, watch = got["trained"], got["watch"]
    assert watch["seen"] == len(trained) > 1
    assert watch["peak"] == 1  # each whole parameter was dropped before the next was gathered
    assert watch["peak_bytes"] == max(t.numel() * t.element_size() for t in trained.values())
    assert got["sent"] == sum(t.numel() * t.element_size() for t in trained.values())
    assert sorted(got["engine"]) == sorted(trained)
    for name, tensor in trained.items():
        assert torch.equal(got["engine"][name], tensor), name


def stream_a_megatron_policy(resolved):
    """One of two megatron ranks: the whole tensors streamed to the driver through a watch, then the HF-named sync
    stream. The driver returns what the watch saw, its receives and takes in order (with the streamed tensors
    alive at each), and both streams."""
    import torch.distributed as dist

    from trainer.parallel import gather
    from trainer.parallel.rank import rank_session

    with rank_session(resolved.layout) as me:
        policy = MegatronBackend(resolved, seed=0)
        watch, events = LiveTensors(), []
        receive = dist.recv

        def watched_receive(tensor, src):
            events.append(("receive", watch.live))  # how many streamed tensors are alive as the next arrives
            return receive(tensor, src=src)

        dist.recv = watched_receive
        whole = {}
        try:
            for name, tensor in watch.watch(gather.stream_whole_tensors(policy.model, policy.shape.vocab)):
                events.append(("take", watch.live))
                whole[name] = tensor.clone()
                del tensor  # as the sync's consumer does, before taking the next
        finally:
            dist.recv = receive
        hf = {name: t.clone() for name, t in policy.hf_named_tensors()}
        return {"watch": vars(watch), "events": events, "whole": whole, "hf": hf,
                "rank": me.rank}


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "layout"), [("tiny-qwen2.5", {"pp": 2}), ("tiny-moonlight", {"ep": 2})])
def test_megatron_sync_streams_one_whole_tensor_at_a_time(matrix, recipe, layout):
    """PP2: the second stage's layers and output layer, EP2: half the experts, come from rank 1, each sent when
    the driver asks for it; the driver holds its own share and the tensor in hand, never every rank's share at
    once. What arrives is the whole model, and the sync's HF names are its conversion."""
    from trainer.models.weight_map import iter_hf, rules
    from trainer.parallel.launcher import launch

    resolved = matrix.resolve(recipe)
    resolved = resolved.model_copy(update={"layout": resolved.layout.model_copy(update=layout)})
    got = launch(stream_a_megatron_policy, 2, resolved)
    whole, watch = got["whole"], got["watch"]
    assert got["rank"] == 0 and watch["seen"] == len(whole)
    assert watch["peak"] == 1  # each whole tensor was dropped before the next was taken
    received = [i for i, (event, _) in enumerate(got["events"]) if event == "receive"]
    assert received and {got["events"][i] for i in received} == {("receive", 0)}  # nothing held as one arrives
    assert all(got["events"][i + 1][0] == "take" for i in received)  # rank 1's tensors one by one, each taken
    assert {rule.mcore for rule in rules(resolved.model) if not rule.buffer} <= set(whole)
    expected = dict(iter_hf(whole, resolved.model))
    assert sorted(got["hf"]) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got["hf"][name], tensor), name
