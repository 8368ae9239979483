"""Before anything heavy: can this machine run the recipe? Lists everything missing at once, in seconds.

A recipe for GPUs, a GPU rollout engine, hub weights or a dataset fails here with what exactly is missing
and how to get it, instead of an hour into a job.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from matrix import ResolvedRecipe
from matrix.schema import CPU_IMAGE
from trainer.models.families import BUILT_FAMILIES

IMAGE_ENV = "GRPO_STACK_IMAGE"  # set inside images built by `nox -s build`


def _hub_snapshot(hf_id: str):
    from trainer.models.pretrained import hub_snapshot  # imports torch: only for recipes with hub weights

    return hub_snapshot(hf_id)


def missing(r: ResolvedRecipe, *, root: Path, launcher: str = "local") -> list[str]:
    """Human-readable list of what this machine lacks for recipe `r` (empty: it can run). Under the ``ray``
    launcher the ranks run on the cluster's nodes, not here: their devices are the launcher's to find."""
    recipe, problems = r.recipe, []
    if r.model.family not in BUILT_FAMILIES.get(recipe.trainer, ()):
        built = ", ".join(sorted(BUILT_FAMILIES.get(recipe.trainer, ()))) or "none"
        problems.append(f"the {recipe.trainer} trainer backend does not build family {r.model.family} yet "
                        f"(built: {built})")
    from trainer.platform import PlatformUnavailable, choose_platform, visible_gpus  # imports torch: only now

    here = launcher == "local"
    if here and not r.runs_on_gpus:  # a GPU recipe's devices: the GPU count below
        try:
            choose_platform(r.device, local_rank=0)
        except PlatformUnavailable as exc:
            problems.append(str(exc))
    if r.runs_on_gpus:
        have = visible_gpus()
        if here and have < recipe.gpus:
            across = (f"; it spans {r.nodes} nodes of {r.gpus_per_node}: start it with --launcher ray"
                      if r.nodes > 1 else "")
            problems.append(f"{recipe.gpus} GPUs (layout {recipe.layout}, min {r.min_gpus}), this machine has "
                            f"{have}{across}")
        inside = os.environ.get(IMAGE_ENV)
        if inside != recipe.image:
            problems.append(f"image {recipe.image} (running {'in ' + inside if inside else 'outside any image'}; "
                            f"build it with `nox -s build -- {recipe.image}`)")
    if recipe.rollout.engine in ("vllm", "sglang") and importlib.util.find_spec(recipe.rollout.engine) is None:
        where = (f"vLLM's CPU build: run it in its environment, `nox -s tests_vllm -- --train {r.name}`"
                 if recipe.image == CPU_IMAGE else f"it ships in image {recipe.image}")
        problems.append(f"the {recipe.rollout.engine} rollout engine (not installed here; {where})")
    if r.model.hf_id and not r.model.weights and _hub_snapshot(r.model.hf_id) is None:
        problems.append(f"weights of {r.model.hf_id} (neither prepared nor in the Hugging Face cache; make them with "
                        f"`nox -s prepare -- {r.name}`)")
    if recipe.data.source == "math-lighteval" and not (r.model.hf_id or r.model.weights):
        problems.append(f"a tokenizer for data.source math-lighteval: model {recipe.model} has no hf_id or weights to "
                        "take it from (the character tokenizer serves data.source demo only); use a model with an "
                        "hf_id or data.source demo")
    if recipe.data.path and not (root / recipe.data.path).is_file():
        how = f"make it with `nox -s prepare -- {r.name}`" if recipe.data.source == "math-lighteval" else \
            f"a parquet file in verl's layout; a relative path is read from {root}"
        problems.append(f"data file {recipe.data.path} ({how})")
    problems += _reward_function(recipe.grpo.reward) if recipe.grpo.reward else _grader(recipe.grpo.grader)
    return problems or _task_problems(r, root)  # reading the task needs the data and tokenizer checked above


def _grader(name: str) -> list[str]:
    from trainer.reward import GraderUnavailableError, get_grader

    try:
        get_grader(name)  # math-verify: also starts its grading worker now, while this process is small
    except GraderUnavailableError as exc:
        return [f"grpo.grader {name}: {exc}"]
    return []


def _reward_function(ref: str) -> list[str]:
    from trainer.reward.function import RewardFunctionError, load

    try:
        load(ref)
    except RewardFunctionError as exc:
        return [str(exc)]
    return []


def _task_problems(r: ResolvedRecipe, root: Path) -> list[str]:
    from trainer.tasks import BUILDERS

    grpo, source = r.recipe.grpo, r.recipe.data.source
    logging.disable(logging.WARNING)  # the count of dropped over-long prompts is in the message below
    try:
        task = BUILDERS[source](r, root)
    except ValueError as exc:  # unusable data (the data modules' errors are one line naming file and row)
        return [f"usable data for data.source {source}: {exc}"]
    finally:
        logging.disable(logging.NOTSET)
    usable = len(task.train)
    if r.recipe.run.warm_start_steps and not task.sft:
        return [f"warm-start pairs for run.warm_start_steps={r.recipe.run.warm_start_steps}: data source {source} "
                f"has none (only demo does); set run.warm_start_steps=0"]
    if usable == 0:
        return [f"prompts that fit grpo.max_prompt_len={grpo.max_prompt_len}: data source {source} has none; "
                f"raise grpo.max_prompt_len"]
    if r.recipe.eval.every and not task.eval:
        return [f"held-out prompts for eval.every={r.recipe.eval.every}: data source {source} has none that fit "
                f"grpo.max_prompt_len={grpo.max_prompt_len} (parquet: rows whose extra_info.split is 'test'); "
                f"add some or set eval.every=0"]
    if usable < grpo.prompts_per_episode:
        return [f"{grpo.prompts_per_episode} training prompts per episode (grpo.prompts_per_episode): data source "
                f"{source} has {usable} that fit max_prompt_len {grpo.max_prompt_len}; use at most {usable}"]
    return []
