"""Shared fixtures: the repository root and the committed matrix; which engine folders are collected here."""

import collections
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
# core), by path prefix under tests/: the image tests render and build into the repository's one build/ folder
# (and one edits a trainer file for a rebuild).
SHARED_GROUPS = {"images": ("images/", "trainer/test_in_image.py")}


def work_unit(nodeid: str) -> str:
    """What one pytest-xdist worker runs whole, in one go: a test module (its module-scoped fixtures, e.g. a shared
    training run, then run once), or the ``SHARED_GROUPS`` group it is in."""
    module = nodeid.split("::", 1)[0].removeprefix("tests/")
    return next((group for group, prefixes in SHARED_GROUPS.items() if module.startswith(prefixes)), module)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent from the engine sessions' environments
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduling over ``work_unit``s, in collection order. (Its ``loadgroup`` mode would group by
    marks, but it renames node ids through an attribute that pytest 9 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the order below: it is by length, not by test count
    return WorkUnits(config, log)


def pytest_collection_modifyitems(config, items):
    """Work units with the most slow tests first, so that no long one starts last; each unit's tests together."""
    slow = collections.Counter(work_unit(item.nodeid) for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: (-slow[unit := work_unit(item.nodeid)], unit))


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


def forked_from_server(process) -> bool:
    """A local launcher's fork server, or a rank forked from it (a ``psutil.Process``): both have its command line."""
    return "multiprocessing.forkserver" in " ".join(process.cmdline())


def local_ranks(driver) -> list:
    """The rank processes the local launcher started under ``driver`` (a ``psutil.Process``), in the order they
    started (rank order): the children of its fork server."""
    ranks = [p for p in driver.children(recursive=True) if forked_from_server(p) and forked_from_server(p.parent())]
    return sorted(ranks, key=lambda p: (p.create_time(), p.pid))
