"""Matrix files built to hurt the loader: each is refused in one located line, quickly and in little memory,
before anything expands it; entry names that would leave their directory are refused."""

import json
import subprocess
import sys

import pytest

from matrix import MatrixError, load_matrix

ALIAS_BOMB = (
    "\n".join(
        ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        + [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    )
    + "\n"
)  # 9**10 ≈ 3.5e9 strings once expanded

# Loads the file in a child with its address space capped (the old loader took 5.8 GB), and reports the time
# and the peak Python allocation of the load alone.
MEASURE = """
import json, resource, sys, time, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from matrix import MatrixError, load_matrix
tracemalloc.start()
started = time.perf_counter()
try:
    load_matrix(sys.argv[1])
    message = None
except MatrixError as exc:
    message = str(exc)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_mb": tracemalloc.get_traced_memory()[1] / 1e6,
                  "message": message}))
"""


def test_alias_bomb_is_refused_in_under_a_second_and_100_mb(tmp_path, repo):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 500
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(bomb)], cwd=repo, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout)
    assert measured["seconds"] < 1 and measured["peak_mb"] < 100, measured
    assert (
        measured["message"] == f"{bomb}:1 (top level): YAML aliases expand to more than 200000 nodes (or an "
        "alias sits inside its own anchor); write the entries out or use fewer nested aliases"
    )


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a: &a [*a]\n", "an alias sits inside its own anchor"),
        ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested too deeply"),
        ("".join(" " * i + "k:\n" for i in range(1300)), "nested too deeply"),
        ("# padding\n" * 120_000, "larger than 1048576 bytes"),
    ],
    ids=["self-alias", "100k-brackets", "1300-indents", "over-1-MiB"],
)
def test_hostile_file_is_one_line_exit_2(tmp_path, repo, text, words):
    bad = tmp_path / "m.yaml"
    bad.write_text(text)
    out = subprocess.run(
        [sys.executable, "-m", "matrix", "--file", str(bad)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert (
        out.stderr.count("\n") == 1
        and out.stderr.startswith(f"{bad}:1 (top level): ")
        and words in out.stderr
    )


@pytest.mark.parametrize("name", ["../../etc", ".hidden", "-flag", "a/b", "a b", "x" * 101])
def test_entry_names_that_leave_their_directory_are_refused(tmp_path, matrix_text, name):
    bad = tmp_path / "matrix.yaml"
    text = matrix_text
    for anchor in ("\n  demo:\n", "\n  tiny-qwen2.5:\n", "\n  single: "):  # a recipe, a model, a layout
        assert anchor in text
        text = text.replace(anchor, anchor.replace(anchor.strip().rstrip(":"), json.dumps(name)), 1)
    bad.write_text(text)
    with pytest.raises(MatrixError) as caught:
        load_matrix(bad)
    for section in ("recipes", "models", "layouts"):
        named = [p for p in caught.value.problems if p.path == f"{section}.{name}"]
        assert named and "not starting with '.' or '-'" in named[0].message, [
            str(p) for p in caught.value.problems
        ]
