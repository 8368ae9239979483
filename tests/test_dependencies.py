"""pyproject.toml states ranges every image's locked set satisfies; constraints.txt holds the exact CPU versions.

`pip install -e .` keeps an installed version that satisfies the requirement (pip's default upgrade strategy is
only-if-needed), so a requirement that every image's lock satisfies is one that never replaces the image's
torch, transformers or megatron-core.
"""

import tomllib

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from images import lockfile
from matrix import load_matrix

PYPROJECT_EXTRAS_NOX_INSTALLS = ("images", "bench", "grading", "tensorboard", "dev", "ray")
"""The extras `nox -s tests` installs (noxfile.py); with the dependencies, what constraints.txt must not contradict."""


def _pyproject(repo) -> dict:
    return tomllib.loads((repo / "pyproject.toml").read_text())


def _requirements(repo) -> list[Requirement]:
    return [Requirement(text) for text in _pyproject(repo)["project"]["dependencies"]]


def _constraints(repo) -> dict[str, str]:
    pins = {}
    for line in (repo / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[lockfile.normalize(name)] = version
    return pins


def _lock(repo, image: str) -> dict[str, lockfile.Pin]:
    return lockfile.parse((repo / "images" / "locks" / f"{image}.lock.txt").read_text())


def _unmet(requirements: list[Requirement], versions: dict[str, str], python: str) -> list[str]:
    """The requirements whose package is missing or at a version outside the range, for a Linux `python`."""
    environment = default_environment() | {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
    }
    problems = []
    for req in requirements:
        if req.marker and not req.marker.evaluate(environment):
            continue
        have = versions.get(lockfile.normalize(req.name))
        if have is None or not req.specifier.contains(have, prereleases=True):
            problems.append(f"{req} (has {have})")
    return problems


@pytest.mark.parametrize("image", sorted(load_matrix().images))
def test_every_image_lock_satisfies_the_harness_requirements(repo, image):
    python = load_matrix().images[image].python
    versions = {name: pin.version for name, pin in _lock(repo, image).items()}
    assert _unmet(_requirements(repo), versions, python) == [], (
        f"{image}: pip install -e . would replace these"
    )


def test_constraints_are_the_cpu_image_lock(repo):
    constraints = _constraints(repo)
    for name, pin in _lock(repo, "cpu").items():
        assert name in constraints, (
            f"constraints.txt lacks {pin.name}=={pin.version} of images/locks/cpu.lock.txt"
        )
        # `==2.13.0` matches the lock's `2.13.0+cpu` (PEP 440: a pin without a local label matches any)
        assert SpecifierSet(f"=={constraints[name]}").contains(pin.version), (
            f"constraints.txt: {name}=={constraints[name]}, the cpu image's lock has {pin.version}"
        )


def test_constraints_fit_the_ranges_nox_installs(repo):
    project = _pyproject(repo)["project"]
    texts = project["dependencies"] + [
        t for extra in PYPROJECT_EXTRAS_NOX_INSTALLS for t in project["optional-dependencies"][extra]
    ]
    requirements = [r for r in map(Requirement, texts) if lockfile.normalize(r.name) in _constraints(repo)]
    assert _unmet(requirements, _constraints(repo), "3.11") == []
