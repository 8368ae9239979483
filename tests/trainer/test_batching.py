"""pack: the response mask marks exactly the log-prob positions that score a response token."""

import torch

from trainer.batching import micro_batches, pack


def test_response_mask_is_offset_by_one_from_the_tokens():
    prompts, responses = [[1, 2, 3], [4], [5, 6]], [[7, 8], [9, 10, 11], []]
    batch = pack(prompts, responses, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 8], [4, 9, 10, 11, 0], [5, 6, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    # log-prob position t scores token t+1: row 0 scores tokens 7, 8 at positions 2, 3
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]]
    for i, response in enumerate(responses):
        scored = batch["input_ids"][i, 1:][batch["response_mask"][i].bool()]
        assert scored.tolist() == response


def test_micro_batches_split_rows_and_keep_every_key():
    batch = pack([[1]] * 5, [[2, 3]] * 5, pad_id=0)
    batch["advantages"] = torch.arange(5.0)
    parts = micro_batches(batch, 2)
    assert [mb["input_ids"].shape[0] for mb in parts] == [2, 2, 1]
    assert torch.cat([mb["advantages"] for mb in parts]).tolist() == [0, 1, 2, 3, 4]
    assert all(set(mb) == set(batch) for mb in parts)
