"""`python -m trainer.smoke` (what `nox -s smoke` runs): every family's tiny recipe in fp32 and bf16, one episode.

In fp32 the torch engine and the trainer compute the same numbers (measured gap ~1e-6); in bf16 the trainer
rounds activations to 8 significant bits, so its log-probs leave the fp32 engine's by ~1e-3–2e-2 (measured
2.3e-3–1.9e-2) and the bf16 model's leave the fp32 model's on the same weights by ~3e-3. A bf16 that silently
computed in fp32 would show gaps of ~1e-6 and fail here; one that broke the model would show gaps near 1 or more.
"""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_smoke_runs_every_family_in_fp32_and_bf16(repo, tmp_path):
    out = tmp_path / "smoke.json"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.smoke", "--episodes", "1", "--json", str(out)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "bf16-fp32 gap" in result.stdout
    numbers = json.loads(out.read_text())
    assert set(numbers) == {"dense", "mla-moe", "qwen3-next", "fsdp2"}
    for family, row in numbers.items():
        assert row["fp32"]["engine_gap"] < 1e-4, (family, row)
        assert 1e-4 < row["bf16"]["engine_gap"] < 0.1, (family, row)
        assert 1e-4 < row["bf16_fp32_gap"] < 0.1, (family, row)
        assert all(r["s_per_episode"] > 0 and r["peak_mib"] > 0 for r in (row["fp32"], row["bf16"])), (
            family,
            row,
        )
