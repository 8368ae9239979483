"""The equivalence gates pass on the real code and fail, on the right quantity, when a fault is planted.

One cache (prepared rollouts) is shared by every test here. Each planted fault is a real multi-process launch of
the candidate layout with one function of the parallel code replaced (faults.py), or, in planted_env/, a collective
broken through `sitecustomize` with no file of the trainer changed. The gate runs these tests judge run in one
process (planted_gates.py, the `planted` fixture), so each recipe's reference layout is replayed once there, not
once per fault; every candidate is launched afresh for its own fault.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.equivalence.run import cache_dir

REPO = Path(__file__).resolve().parents[3]
# Its sitecustomize makes multi-rank SUM all-reduces 1% large.
PLANTED_ENV = Path(__file__).with_name("planted_env")
# The cache `nox -s equivalence` uses too (keyed by the code, so never stale): CI's gate session then reuses the
# rollouts prepared here instead of warm-starting them again.
CACHE = cache_dir(REPO / "runs" / "gates")

CASES = [  # (fault, gate, its candidate that the fault reaches, the quantity that must fail)
    ("label_shift_at_chunk_boundaries", "cp-equivalence", 0, "logprobs at CP chunk boundaries, max abs"),
    ("wrong_causal_offset_second_chunk", "cp-equivalence", 0, "logprobs max abs"),
    ("tokens_counted_twice_across_cp", "cp-equivalence", 0, "loss rel"),
    ("loss_scaled_by_cp", "cp-equivalence", 0, "loss rel"),
    ("tp_logprobs_reduced_with_max", "tp-equivalence", 0, "logprobs max abs"),
    ("dp_token_count_not_all_reduced", "dp-equivalence", 0, "loss rel"),
    ("ulysses_sequence_slices_out_of_order", "fsdp-equivalence", 2, "logprobs max abs"),
    ("fsdp_gradients_averaged_over_ranks", "fsdp-equivalence", 1, "grad norm rel"),
    ("expert_weights_reduced_as_dense", "mla-tp-equivalence", 1, "grad norm rel"),
    ("mla_down_projections_column_parallel", "mla-tp-equivalence", 0, "grad norm rel"),
    ("tied_embedding_gradients_not_summed", "tied-embedding-equivalence", 0, "grad norm rel"),
    ("loss_scaled_by_cp", "bf16-equivalence", 0, "loss rel"),  # bf16's tolerances still catch a doubled loss
    ("distributed_optimizer_last_owner_never_sends", "distributed-optimizer-equivalence", 0,
     "weights after last step, max abs"),
    ("distributed_optimizer_last_owner_never_sends", "distributed-optimizer-bf16-equivalence", 0,
     "weights after last step, max abs"),
]


def gate(cache, out, name, *extra, env=None):
    return subprocess.run(
        [sys.executable, "-m", "trainer.equivalence", name, "--cache", str(cache), "--out", str(out), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


@pytest.fixture(scope="module")
def planted(request, tmp_path_factory):
    """The gate runs that the tests selected in this module judge, in one process: OUT/<gate>-<fault or "real">/."""
    runs = []
    for item in request.session.items:
        if item.module is not request.module:
            continue
        if item.originalname == "test_gate_fails_on_planted_fault":
            params = item.callspec.params
            runs.append(f"{params['name']}:{params['candidate']}:{params['fault']}")
        elif item.originalname == "test_cp_gate_passes_and_fails_with_all_reduce_broken_in_the_environment":
            runs.append("cp-equivalence:0:")
    out = tmp_path_factory.mktemp("gates")
    driver = [sys.executable, "-m", "tests.trainer.parallel.planted_gates", "--cache", str(CACHE), "--out", str(out)]
    done = subprocess.run([*driver, *runs], cwd=REPO, capture_output=True, text=True, timeout=300 + 120 * len(runs))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.slow
def test_cp_gate_passes_and_fails_with_all_reduce_broken_in_the_environment(planted, tmp_path):
    real = planted / "cp-equivalence-real"
    verdict = json.loads((real / "verdict.json").read_text())
    assert verdict["passed"] and {r["quantity"] for r in verdict["rows"]} == {
        "logprobs max abs",
        "logprobs at CP chunk boundaries, max abs",
        "loss rel",
        "grad norm rel",
        "weights after last step, max abs",
    }
    assert "| cp=2 gpus=2 | loss rel |" in (real / "verdict.md").read_text()

    # The CLI on the same cache with all-reduce broken in the environment: the gate replays and turns red (it
    # printed the cached green verdict when reference records were cached by a fingerprint of the source).
    pythonpath = os.pathsep.join(p for p in (str(PLANTED_ENV), os.environ.get("PYTHONPATH")) if p)
    broken = gate(CACHE, tmp_path, "cp-equivalence", env=os.environ | {"PYTHONPATH": pythonpath})
    assert broken.returncode == 1, broken.stdout[-3000:] + broken.stderr[-3000:]
    verdict = json.loads((tmp_path / "cp-equivalence" / "verdict.json").read_text())
    assert not verdict["passed"] and {"logprobs max abs", "grad norm rel"} <= {
        r["quantity"] for r in verdict["rows"] if not r["passed"]
    }, verdict["rows"]
    assert "FAIL" in broken.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "name", "candidate", "quantity"), CASES, ids=[c[0] for c in CASES])
def test_gate_fails_on_planted_fault(planted, fault, name, candidate, quantity):
    out = planted / f"{name}-{fault}"
    assert not (out / "error.txt").exists(), (out / "error.txt").read_text()
    verdict = json.loads((out / "verdict.json").read_text())
    failed = {r["quantity"] for r in verdict["rows"] if not r["passed"]}
    assert not verdict["passed"] and quantity in failed, verdict["rows"]
    assert "FAIL" in (out / "table.txt").read_text()
