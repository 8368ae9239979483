"""`--rehearse`: a GPU recipe's layout and settings on CPU, with its model's tiny stand-in, for a few episodes.

What is kept: the layout's degrees (TP, PP, CP, EP, ETP, sequence parallel), the trainer backend, the GRPO
objective and optimizer settings, the model's family and router settings, and checkpointing. What is
substituted, and printed at the start: the model (its tiny stand-in, widened where the layout's TP needs more
attention or linear-attention heads), the image (cpu), the rollout engine (torch, unless vLLM's CPU build is
installed and takes the stand-in's head size), the data (the embedded demo task), the GPU count (the
layout's minimum: DP shrinks to 1), batch and sequence sizes, uneven stage sizes, and the episode count.
"""

from __future__ import annotations

import importlib.util
from math import lcm

from matrix import Matrix, ResolvedRecipe
from matrix.layout import ParallelLayout
from matrix.schema import CPU_IMAGE, Rollout
from trainer.rollout.vllm_cpu import HEAD_SIZES

EPISODES = 2
PROMPTS, SAMPLES, PROMPT_LEN, RESPONSE_LEN = 4, 4, 32, 16


class NoStandIn(ValueError):
    """No tiny model of the matrix declares that it stands in for the recipe's model."""


def _stand_in(m: Matrix, model_name: str) -> str:
    for name, model in m.models.items():
        if model.stands_in_for and model_name in [s.strip() for s in model.stands_in_for.split(",")]:
            return name
    tiny = [n for n, mdl in m.models.items() if mdl.stands_in_for]
    raise NoStandIn(f"no model declares stands_in_for: {model_name}; tiny models: {', '.join(tiny)}")


def _imports(engine: str) -> bool:
    return importlib.util.find_spec(engine) is not None


def _rehearsed_rollout(rollout: Rollout, shape) -> tuple[Rollout, str]:
    """vLLM stays where its CPU build is installed and the stand-in's head size is one its kernels take (one engine,
    TP 1, on its own); otherwise the torch engine, with the reason."""
    was = f"rollout {rollout.engine} (tp {rollout.tp})"
    head = shape.head_dim or shape.hidden // shape.heads
    if rollout.engine == "vllm" and _imports("vllm") and head in HEAD_SIZES:
        kept = rollout.model_copy(update={"tp": 1, "engines": None, "colocate": False})
        return kept, f"{was} → vllm's CPU build, tp 1, not colocated"
    why = (f"vLLM's CPU kernels take head sizes {', '.join(map(str, HEAD_SIZES))}; the stand-in's is {head}"
           if rollout.engine == "vllm" and _imports("vllm") else f"{rollout.engine} does not run here")
    return rollout.model_copy(update={"engine": "torch", "tp": 1, "engines": None}), f"{was} → torch ({why})"


def rehearsal(m: Matrix, resolved: ResolvedRecipe) -> tuple[ResolvedRecipe, list[str]]:
    """The CPU rehearsal of ``resolved`` and one line per substitution made."""
    r, layout, changes = resolved.recipe, resolved.layout, []
    if r.image == CPU_IMAGE and (r.rollout.engine == "torch" or _imports(r.rollout.engine)):
        return resolved, []
    if r.image == CPU_IMAGE:  # demo-vllm where vLLM is not installed
        rollout = r.rollout.model_copy(update={"engine": "torch"})
        changes.append(f"rollout {r.rollout.engine} → torch ({r.rollout.engine} does not import here)")
        return resolved.model_copy(update={"recipe": r.model_copy(update={"rollout": rollout})}), changes
    tiny_name = _stand_in(m, r.model)
    tiny = m.models[tiny_name]
    shape = tiny.shape
    changes.append(f"model {r.model} → {tiny_name} (family {tiny.family}, {shape.layers} layers, hidden {shape.hidden})")
    if shape.heads % layout.tp or shape.query_groups % layout.tp:
        heads = lcm(shape.heads, layout.tp)
        groups = lcm(shape.query_groups, layout.tp)
        head_dim = shape.head_dim or shape.hidden // shape.heads
        shape = shape.model_copy(update={"heads": heads, "query_groups": groups, "head_dim": head_dim})
        changes.append(f"{tiny_name} heads/query groups {tiny.shape.heads}/{tiny.shape.query_groups} → "
                       f"{heads}/{groups} so TP={layout.tp} divides them")
    linear = shape.linear_attention
    if linear is not None and (linear.key_heads % layout.tp or linear.value_heads % layout.tp):
        keys = lcm(linear.key_heads, layout.tp)
        values = lcm(linear.value_heads, keys)  # each key head serves a whole number of value heads
        shape = shape.model_copy(update={"linear_attention": linear.model_copy(
            update={"key_heads": keys, "value_heads": values})})
        changes.append(f"{tiny_name} linear-attention key/value heads {linear.key_heads}/{linear.value_heads} → "
                       f"{keys}/{values} so TP={layout.tp} divides them")
    if layout.pp > 1 and shape.layers < layout.pp:
        changes.append(f"{tiny_name} layers {shape.layers} → {layout.pp} (one per PP stage)")
        shape = shape.model_copy(update={"layers": layout.pp})
    model = tiny.model_copy(update={"shape": shape})
    if layout.first_stage_layers or layout.last_stage_layers:
        changes.append(f"uneven PP stages {layout.first_stage_layers}/{layout.last_stage_layers} → even")
        layout = layout.model_copy(update={"first_stage_layers": None, "last_stage_layers": None})
    gpus = resolved.min_gpus
    dp = ParallelLayout.of(layout, gpus).dp
    rollout, rollout_change = _rehearsed_rollout(r.rollout, shape)
    changes += [f"image {r.image} → cpu", rollout_change,
                f"data {r.data.source} → demo (embedded arithmetic task)",
                f"gpus {r.gpus} → {gpus} processes (the layout's minimum; DP {resolved.dp} → "
                f"{dp})"]
    grpo = r.grpo.model_copy(update={
        "prompts_per_episode": min(r.grpo.prompts_per_episode, PROMPTS),
        "samples_per_prompt": min(r.grpo.samples_per_prompt, SAMPLES),
        "max_prompt_len": PROMPT_LEN, "max_response_len": RESPONSE_LEN,
        "micro_batch_size": min(r.grpo.micro_batch_size, PROMPTS * SAMPLES // 2), "lr": 1e-3})
    changes.append(f"episode {r.grpo.prompts_per_episode}×{r.grpo.samples_per_prompt} prompts×samples, lengths "
                   f"{r.grpo.max_prompt_len}+{r.grpo.max_response_len} → {grpo.prompts_per_episode}×"
                   f"{grpo.samples_per_prompt}, {PROMPT_LEN}+{RESPONSE_LEN}; lr {r.grpo.lr} → 1e-3")
    run = r.run.model_copy(update={"episodes": EPISODES, "checkpoint_every": 1, "warm_start_steps": 0})
    changes.append(f"episodes {r.run.episodes} → {EPISODES}, checkpoint every episode")
    recipe = r.model_copy(update={
        "model": tiny_name, "image": CPU_IMAGE, "rollout": rollout,
        "gpus": gpus, "data": r.data.model_copy(update={"source": "demo", "path": None}), "grpo": grpo, "run": run,
        "eval": r.eval.model_copy(update={"every": 0})})
    rehearsed = resolved.model_copy(update={"name": f"{resolved.name}-rehearsal", "recipe": recipe, "model": model,
                                            "image": m.images[CPU_IMAGE], "layout": layout,
                                            "min_gpus": gpus, "dp": dp})
    return rehearsed, changes
