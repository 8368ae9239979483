"""What the environment and the command line can get wrong: a logger flag without its package, a misspelt name,
an absurd size, a reader that closes the pipe early. Each is one line (or silence), never a traceback."""

import os
import subprocess
import sys

import pytest

# The trainer's CLI with the logging packages hidden, whether or not this environment has them.
WITHOUT_LOGGERS = (
    "import runpy, sys; sys.modules['tensorboard'] = sys.modules['wandb'] = None; "
    "sys.argv[0] = 'trainer'; runpy.run_module('trainer', run_name='__main__')"
)

CASES = [
    (
        ["demo", "--tensorboard"],
        "--tensorboard: the tensorboard package is not installed; install the logging extra",
    ),
    (["demo", "--wandb", "proj"], "--wandb: the wandb package is not installed; install the logging extra"),
    (["demx"], "unknown recipe 'demx'; recipes: moonlight"),
    (["demx"], "; did you mean 'demo'?"),
    (["demo", "layout=tp3"], "layout 'tp3' is not defined; defined: moonlight-8"),
    (["demo", "layout=tp3"], "; did you mean 'tp2'?"),
    (["demo", "model=tiny-qwen3.5"], "; did you mean 'tiny-qwen2.5'?"),
    (
        ["demo", f"run.episodes={10**12}"],
        "run.episodes: 1000000000000: Input should be less than or equal to 1000000",
    ),
    (["demo", f"gpus={10**8}"], "gpus: 100000000: Input should be less than or equal to 100000"),
    (["demo", f"model.shape.hidden={10**11}"], "Input should be less than or equal to 2147483647"),
    # an option between the recipe and its overrides (argparse took the overrides for unknown arguments)
    (["demo", "--mllog", f"run.episodes={10**12}"], "Input should be less than or equal to 1000000"),
]


@pytest.mark.parametrize(
    ("argv", "words"), CASES, ids=[" ".join(c[0]) + f" #{i}" for i, c in enumerate(CASES)]
)
def test_bad_environment_or_name_or_size_is_one_line_exit_2(repo, tmp_path, argv, words):
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_LOGGERS, *argv, "--runs", str(tmp_path)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], out.stderr
    assert not any(tmp_path.iterdir()), "nothing is written for rejected input"


@pytest.mark.parametrize("command", [["matrix", "--json"], ["matrix"]])
def test_a_reader_that_closed_the_pipe_gets_no_traceback(repo, command):
    """`nox -s matrix -- --json | head`: the reader is gone before the first write (its end closed here)."""
    read, write = os.pipe()
    os.close(read)
    try:
        out = subprocess.run(
            [sys.executable, "-m", *command],
            cwd=repo,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert out.returncode == 1 and out.stderr == "", out.stderr[
        -3000:
    ]  # 1: Python's advice, rich's own choice
