"""Name -> function registries for algorithm variants (verl ``core_algos.py`` style).

A variant is one decorated function; the trainer looks it up by the name in its config::

    ADV_ESTIMATORS = Registry("advantage estimator")

    @ADV_ESTIMATORS.register("grpo")
    def grpo_advantages(rewards, group_size=None): ...

    fn = ADV_ESTIMATORS.get(cfg.adv_estimator)

Names are case-sensitive. Registering a *different* function under a taken name raises (re-registering
the same function, e.g. on module reload, is a no-op), and a failed lookup lists every valid name,
which verl does for losses but not for advantage estimators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class UnknownVariantError(ValueError):
    """A name that is not registered was looked up; the message lists the registered names."""


class Registry:
    """A named mapping from variant names to functions, with strict registration and lookup."""

    def __init__(self, kind: str) -> None:
        """``kind`` is the human name used in error messages, e.g. ``"policy loss"``."""
        self.kind = kind
        self._fns: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator registering the function under ``name``; a different function already there raises."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def decorator(fn: F) -> F:
            existing = self._fns.get(name)
            if existing is not None and existing is not fn:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered to "
                    f"{existing.__module__}.{existing.__qualname__}; pick another name"
                )
            self._fns[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        """The function registered under ``name``; an unknown name raises listing the valid ones."""
        try:
            return self._fns[name]
        except KeyError:
            raise UnknownVariantError(
                f"unknown {self.kind} {name!r}; valid names are: {sorted(self._fns)}"
            ) from None

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns
