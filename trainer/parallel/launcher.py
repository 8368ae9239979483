"""The launcher seam: run one entry point on N ranks and return rank 0's result.

``launch(fn, world_size, *args, launcher=...)`` runs ``fn(*args)`` once per rank, each process seeing RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, and returns rank 0's return value; the
arguments travel pickled. When a rank fails, every other rank is stopped within seconds and ``RankFailed`` carries
one line naming the rank and its first error. One rank runs in-process under every launcher.

Two implementations, chosen by ``run.launcher`` or ``--launcher``:

- ``local`` (``trainer.parallel.local_launcher``): torch's elastic agent, every rank on this host;
- ``ray`` (``trainer.parallel.ray_launcher``): one Ray placement group with a bundle per node, across the nodes
  of a Ray cluster.

What every rank does first and last (process groups, threads, signals, seed) is ``trainer.parallel.rank``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from trainer.parallel.ranks import RankFailed, die_with_parent, rank_and_world

# what each launcher needs installed beyond the trainer's own dependencies
PACKAGE_NEEDED = {"local": None, "ray": "ray"}
LAUNCHERS = tuple(PACKAGE_NEEDED)
__all__ = ["LAUNCHERS", "LOCAL", "Placement", "RankFailed", "add_launcher_options", "die_with_parent", "launch",
           "launcher_named", "missing_package", "rank_and_world"]


class Launcher(Protocol):
    def launch(self, fn: Callable[..., Any], world_size: int, *args: Any, ranks_per_node: int | None = None,
               stall_timeout_s: float | None = None) -> Any:
        """``fn(*args)`` on ``world_size`` ranks (``world_size`` > 1), ``ranks_per_node`` to a node (None: all on
        one), numbered node by node; rank 0's return value, or ``RankFailed``."""


def missing_package(name: str) -> str | None:
    """Why launcher ``name`` cannot start here (None: it can): its package is not installed."""
    import importlib.util

    package = PACKAGE_NEEDED[name]
    if package is not None and importlib.util.find_spec(package) is None:
        return (f"launcher {name}: the {package} package is not installed; install the {name} extra "
                f"(pip install -e '.[{name}]'; `nox -s train|equivalence -- ... --launcher {name}` does)")
    return None


def add_launcher_options(parser: argparse.ArgumentParser, *, ranks: str, default: str | None) -> None:
    """``--launcher`` and ``--ray-address``, as every command that starts ranks takes them; ``ranks`` names what
    is started, ``default`` the launcher when none is given (None: the recipe's ``run.launcher``)."""
    otherwise = default or "the recipe's run.launcher"
    parser.add_argument("--launcher", choices=LAUNCHERS, default=default,
                        help=f"what starts {ranks}: local (this host) or ray (a Ray cluster's nodes); default: {otherwise}")
    parser.add_argument("--ray-address", metavar="HOST:PORT",
                        help="with --launcher ray: the running cluster to join (default: RAY_ADDRESS, else a local one)")


def launcher_named(name: str, *, ray_address: str | None = None) -> Launcher:
    """The launcher ``name`` (one of ``LAUNCHERS``); ``ray_address``: a running Ray cluster (Ray only)."""
    if name == "local":
        from trainer.parallel.local_launcher import ElasticLauncher

        return ElasticLauncher()
    if name == "ray":
        from trainer.parallel.ray_launcher import RayLauncher

        return RayLauncher(address=ray_address)
    raise ValueError(f"unknown launcher {name!r}; launchers: {', '.join(LAUNCHERS)}")


def launch(fn: Callable[..., Any], world_size: int, *args: Any, launcher: str = "local",
           ray_address: str | None = None, ranks_per_node: int | None = None,
           stall_timeout_s: float | None = None) -> Any:
    """``fn(*args)`` on ``world_size`` ranks started by ``launcher``; returns rank 0's return value. With
    ``stall_timeout_s``, ranks that stop making progress (``trainer.heartbeat``) are stopped, the stuck one named.
    Under either launcher a signal to this process reaches every rank (``trainer.interrupts``)."""
    if world_size == 1:
        return fn(*args)
    return launcher_named(launcher, ray_address=ray_address).launch(
        fn, world_size, *args, ranks_per_node=ranks_per_node, stall_timeout_s=stall_timeout_s)


@dataclass(frozen=True)
class Placement:
    """Which launcher starts a job's ranks and where (a conversion's; a training run reads its recipe and CLI)."""

    launcher: str = "local"
    ray_address: str | None = None
    ranks_per_node: int | None = None

    def launch(self, fn: Callable[..., Any], world_size: int, *args: Any) -> Any:
        return launch(fn, world_size, *args, launcher=self.launcher, ray_address=self.ray_address,
                      ranks_per_node=self.ranks_per_node)


LOCAL = Placement()
