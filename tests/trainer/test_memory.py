"""Peak RSS of the process, as metrics.jsonl would carry it: it sees a large allocation."""

import torch

from trainer.platform import CPU


def test_peak_rss_sees_a_large_allocation():
    before = CPU.memory_metrics()["memory/peak_rss_mib"]
    # more than the whole previous peak, so the peak must rise whatever was freed before: (before + 256) MiB
    big = torch.ones(int(before) + 256, 2**18)
    after = CPU.memory_metrics()["memory/peak_rss_mib"]
    assert after - before > 200, (before, after)
    del big
