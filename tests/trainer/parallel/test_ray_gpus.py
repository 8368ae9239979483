"""Under Ray, a GPU rank sees its node's GPUs and binds its own, as under torch's launcher: Ray shows each actor
only the GPU it assigned (as cuda:0), so ``cuda:LOCAL_RANK`` with LOCAL_RANK 1, 2, ... named a GPU the rank could
not see, and NCCL and a TP > 1 engine could not see the node's other GPUs.

Ray assigns GPU ids whether or not the GPUs are real: the launcher's own local cluster is started with four
logical GPUs (RAY_OVERRIDE_RESOURCES), and three ranks record what they were given.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.parallel.ray_launcher import rank_environments

REPO = Path(__file__).resolve().parents[3]
SCRIPT = """
import sys
from trainer.parallel.ray_launcher import RayLauncher
from tests.trainer.parallel.ray_gpu_ranks import record_gpus

RayLauncher().launch(record_gpus, 3, sys.argv[1])
"""

pytestmark = pytest.mark.slow


def test_gpu_ranks_see_their_nodes_gpus_and_bind_their_own(tmp_path):
    env = {**os.environ, "RAY_OVERRIDE_RESOURCES": json.dumps({"GPU": 4})}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(3)]
    assigned = [r["ray_gpu_ids"] for r in ranks]
    assert all(len(ids) == 1 for ids in assigned) and len({ids[0] for ids in assigned}) == 3
    node_gpus = sorted(str(ids[0]) for ids in assigned)  # the run's three of the node's four
    for r in ranks:
        assert r["CUDA_VISIBLE_DEVICES"] == ",".join(node_gpus)
        assert node_gpus[int(r["LOCAL_RANK"])] == str(r["ray_gpu_ids"][0])  # cuda:LOCAL_RANK is its own GPU
        assert r["LOCAL_WORLD_SIZE"] == "3"


def test_rank_environments_per_node():
    envs = rank_environments(["a", "a", "b", "b"], [["3"], ["1"], ["10"], ["2"]], "10.0.0.1", 29500)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["1,3", "1,3", "2,10", "2,10"]
    assert [e["LOCAL_RANK"] for e in envs] == ["1", "0", "1", "0"]
    assert [e["GROUP_RANK"] for e in envs] == ["0", "0", "1", "1"]
    cpu = rank_environments(["a", "a"], [[], []], "10.0.0.1", 29500)  # CPU ranks: no device variable
    assert [e["LOCAL_RANK"] for e in cpu] == ["0", "1"] and all("CUDA_VISIBLE_DEVICES" not in e for e in cpu)
