"""The image fingerprint and drift check, on this test environment (the built cpu image: test_build_cpu_slow.py)."""

from __future__ import annotations

import json
from importlib import metadata

import pytest

from images import fingerprint, lockfile


def _lock(**versions: str) -> str:
    return "".join(f"{name}=={version} \\\n    --hash=sha256:{'0' * 64}\n    # via -r x.in\n"
                   for name, version in versions.items())


@pytest.fixture
def recorded(tmp_path):
    """A lock of two installed packages at their installed versions, and the fingerprint recorded against it."""
    lock = tmp_path / "lock.txt"
    lock.write_text(_lock(rich=metadata.version("rich"), PyYAML=metadata.version("pyyaml")))
    data = fingerprint.record(lock, tmp_path / "fingerprint.json")
    return lock, data


def test_record_lists_packages_and_imports(recorded):
    _, data = recorded
    assert data["installed"]["rich"]["version"] == metadata.version("rich")
    assert len(data["installed"]["pyyaml"]["record"]) == 64
    assert data["imports"] == {"rich": "ok", "yaml": "ok"}


def test_no_drift_right_after_recording(recorded):
    lock, _ = recorded
    assert fingerprint.drift(lock) == []


def test_lock_version_drift_names_the_package(recorded):
    lock, _ = recorded
    lock.write_text(_lock(rich="0.0.1", PyYAML=metadata.version("pyyaml"), absent_pkg="1.0"))
    assert fingerprint.drift(lock) == ["absent_pkg: locked 1.0, not installed",
                                       f"rich: locked 0.0.1, installed {metadata.version('rich')}"]


def test_changes_since_the_build_are_named(recorded):
    lock, data = recorded
    data["installed"]["rich"]["record"] = "f" * 64  # reinstalled from another build
    data["installed"]["tqdm"]["version"] = "0.0.1"  # upgraded
    data["installed"]["gone-pkg"] = {"version": "1.0", "record": "0" * 64}  # removed since
    del data["installed"]["pyyaml"]  # added since
    lock.with_name("fingerprint.json").write_text(json.dumps(data))
    problems = fingerprint.drift(lock)
    assert problems == sorted([
        "gone-pkg: removed after the build (was 1.0)",
        f"pyyaml: installed {metadata.version('pyyaml')} after the build",
        f"rich: {metadata.version('rich')} reinstalled after the build (its RECORD changed)",
        f"tqdm: built with 0.0.1, installed {metadata.version('tqdm')}",
    ])


def test_missing_fingerprint_is_reported(recorded):
    lock, _ = recorded
    lock.with_name("fingerprint.json").unlink()
    assert fingerprint.drift(lock) == [f"{lock.with_name('fingerprint.json')}: missing, so packages outside the "
                                       "lock cannot be checked"]


def test_lock_parse_names_pins_and_parents():
    pins = lockfile.parse(_lock(Foo_Bar="1.0") + "baz==2 \\\n    --hash=sha256:ab\n    # via\n    #   foo-bar\n")
    assert pins["foo-bar"].version == "1.0" and pins["baz"].required_by == ("foo-bar",)
    assert lockfile.closure(pins, {"foo-bar"}, stop=set()) == {"foo-bar", "baz"}
    assert lockfile.closure(pins, {"foo-bar"}, stop={"baz"}) == {"foo-bar"}
