"""The rollout engine a recipe names (``recipe.rollout.engine``), built in one place.

The torch engine runs here; vLLM and SGLang adapters will register beside it (GPU, not built yet — the
preflight refuses recipes that need them before anything is started).
"""

from __future__ import annotations

from collections.abc import Callable

from matrix import ResolvedRecipe
from trainer.rollout.base import RolloutEngine
from trainer.tasks import Task


def _torch_engine(r: ResolvedRecipe, task: Task) -> RolloutEngine:
    from trainer.rollout.torch_engine import TorchEngine

    return TorchEngine(r.model, decode=task.decode, eos_token_id=task.eos_id, pad_token_id=task.pad_id)


ENGINES: dict[str, Callable[[ResolvedRecipe, Task], RolloutEngine]] = {"torch": _torch_engine}


def build_engine(r: ResolvedRecipe, task: Task) -> RolloutEngine:
    name = r.recipe.rollout.engine
    if name not in ENGINES:
        raise NotImplementedError(f"rollout engine {name!r} is not built yet; built: {', '.join(ENGINES)}")
    return ENGINES[name](r, task)
