"""Shared fixtures: the repository root and the committed matrix; which engine folders are collected here."""

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# tests/<package> runs in its own nox session's environment (`nox -s tests_vllm`, `nox -s tests_sglang`), where the
# engine's package imports; elsewhere the folder is not collected. The session sets the folder's variable so that a
# package that does not import there fails the session instead of skipping it.
ENGINE_FOLDERS = {"vllm": "GRPO_REQUIRE_VLLM", "sglang": "GRPO_REQUIRE_SGLANG"}
collect_ignore_glob = []
for _package, _required in ENGINE_FOLDERS.items():
    if importlib.util.find_spec(_package) is None:
        if os.environ.get(_required):
            raise pytest.UsageError(f"{_required}=1 but {_package} is not installed in this environment")
        collect_ignore_glob.append(f"{_package}/test_*.py")


# Modules that must not run at the same time as each other under pytest-xdist (`nox -s tests` runs one worker per
# core): the image builds share buildah's and the disk's capacity, which two at once would only split.
SHARED_GROUPS = {
    "image-builds": ("images/test_build_cpu_slow.py", "images/test_build_docker_slow.py"),
}


def pytest_collection_modifyitems(config, items):
    """Each module is one unit of work for pytest-xdist's ``loadgroup`` scheduling (its module-scoped fixtures, e.g.
    a shared training run, then run once), or its ``SHARED_GROUPS`` group's."""
    if not config.pluginmanager.hasplugin("xdist"):  # the engine sessions' environments run without it
        return
    group_of = {module: group for group, modules in SHARED_GROUPS.items() for module in modules}
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            module = item.path.relative_to(REPO / "tests").as_posix()
            item.add_marker(pytest.mark.xdist_group(group_of.get(module, module)))


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def matrix_text() -> str:
    return (REPO / "matrix.yaml").read_text()


@pytest.fixture(scope="session")
def matrix():
    from matrix import load_matrix

    return load_matrix()
