"""The local launcher's ranks are forks of a fork server started for the launch, which has imported what they
import: a rank sees the driver's environment and working directory of the moment as a spawned process would, the
server is gone when the launch is, and the imports it makes before forking never reach CUDA (a forked rank could not
use a GPU then)."""

import os
import subprocess
import sys

import psutil

from tests.conftest import REPO, forked_from_server
from tests.trainer.parallel.forked_ranks import what_the_rank_sees
from trainer.parallel.launcher import launch

KEY = "GRPO_STACK_TEST_FORKED"


def _servers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if forked_from_server(p)]


def test_ranks_see_the_drivers_environment_and_folder_of_the_moment_and_no_server_outlives_its_launch(
        monkeypatch, tmp_path):
    monkeypatch.setenv(KEY, "first")
    server, seen, folder = launch(what_the_rank_sees, 2, KEY)
    assert (seen, folder) == ("first", os.getcwd())
    assert _servers() == [] and not psutil.pid_exists(server)

    # a second launch sees the driver's changes since the first: a variable gone, another folder
    monkeypatch.delenv(KEY)
    monkeypatch.chdir(tmp_path)
    second, seen, folder = launch(what_the_rank_sees, 2, KEY)
    assert (seen, folder) == (None, str(tmp_path)) and second != server
    assert _servers() == []


# Where a library asks torch about CUDA: each raises in the test below, as if the import had touched the GPU.
CUDA_QUERIES = ("is_available", "device_count", "init", "_lazy_init", "current_device", "get_device_capability",
                "get_device_properties", "get_device_name", "mem_get_info", "set_device")


def test_what_the_server_imports_where_torch_has_cuda_never_asks_for_cuda():
    """With a CUDA build of torch the server imports torch and the ranks' entry modules only: each is imported
    here with torch's CUDA queries raising."""
    script = """
import torch
from trainer.parallel import local_launcher
from trainer.convert.sharded import _write_rank
from trainer.equivalence.replay import replay_rank
from trainer.worker import run_rank
entries = [run_rank, _write_rank, replay_rank]
torch.backends.cuda.is_built = lambda: True
imports = sorted({name for fn in entries for name in local_launcher.rank_imports(fn)})
assert set(imports).isdisjoint(local_launcher.CPU_TORCH_RANK_IMPORTS), imports
print(" ".join(imports))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    imports = done.stdout.split()
    assert imports == ["torch", "trainer.convert.sharded", "trainer.equivalence.replay", "trainer.worker"]

    guard = f"""
import importlib, sys, torch
def touched(*args, **kwargs):
    raise SystemExit("CUDA asked at import")
for name in {CUDA_QUERIES!r}:
    setattr(torch.cuda, name, touched)
for name in {imports!r}:
    importlib.import_module(name)
print("imported without CUDA")
"""
    done = subprocess.run([sys.executable, "-c", guard], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "imported without CUDA", done.stdout + done.stderr[-3000:]
