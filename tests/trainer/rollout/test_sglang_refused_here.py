"""`rollout.engine: sglang` where SGLang cannot run (no sglang, no GPU): one line at start-up, exit 2, nothing
written. The adapter's own tests run against SGLang's real classes in `nox -s tests_sglang` (tests/sglang)."""

import importlib.util

import pytest

from trainer.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang") is not None, reason="sglang is installed here")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["demo", "rollout.engine=sglang"], "sglang rollout needs an image with that engine; image cpu has no engine"),
        (["qwen3-next"], "the sglang rollout engine (not installed here; it ships in image sglang-te27)"),
    ],
    ids=["cpu-recipe", "stack-c"],
)
def test_sglang_recipe_is_one_line_exit_2(tmp_path, capsys, argv, words):
    runs = tmp_path / "runs"
    assert main([*argv, "--runs", str(runs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not runs.exists(), "nothing is written for a refused recipe"
