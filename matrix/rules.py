"""Cross-entry rules of the matrix: references resolve, layouts fit model shapes and GPU counts.

Each check yields (yaml_path, message) pairs; the loader turns them into located problems. Messages show
the arithmetic (torchtitan's ParallelDims style) and what would be valid.
"""

from __future__ import annotations

from collections.abc import Iterator
from math import lcm

from matrix.schema import Benchmark, Gate, Layout, Matrix, Model, Recipe

Path = tuple[str | int, ...]
Finding = tuple[Path, str]


def derived_sizes(layout: Layout, gpus: int) -> tuple[int, int]:
    """(minimum GPU count, data-parallel size) of a layout on `gpus` devices (REFERENCE §5).

    megatron-core needs world % (TP·CP·PP) == 0 and world % (ETP·EP·PP) == 0, hence the lcm;
    DP = world / (TP·CP·PP). With FSDP every device is a DP rank.
    """
    if layout.fsdp:
        return (layout.dp or 1), gpus
    dense = layout.tp * layout.cp * layout.pp
    expert = layout.expert_tp * layout.ep * layout.pp
    minimum = lcm(dense, expert)
    if layout.dp is not None:
        minimum = lcm(minimum, dense * layout.dp)
    return minimum, gpus // dense


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
                yield ("recipes", name, key), f"'{target}' is not defined under {key}s; defined: {_names(table)}"
    for name, g in entries("gates"):
        if isinstance(g.get("recipe"), str) and g["recipe"] not in recipes:
            yield ("gates", name, "recipe"), f"'{g['recipe']}' is not a recipe; recipes: {_names(recipes)}"
    for name, b in entries("benchmarks"):
        for i, item in enumerate(b.get("recipes") or []):
            recipe, at = (item.get("recipe"), ("recipe",)) if isinstance(item, dict) else (item, ())
            if isinstance(recipe, str) and recipe not in recipes:
                yield ("benchmarks", name, "recipes", i, *at), f"'{recipe}' is not a recipe; recipes: {_names(recipes)}"
        layouts = section("layouts")
        for i, layout in enumerate(b.get("layouts") or []):
            if isinstance(layout, str) and layout not in layouts:
                yield ("benchmarks", name, "layouts", i), f"'{layout}' is not a layout; layouts: {_names(layouts)}"


def check_model(name: str, model: Model) -> Iterator[Finding]:
    """The family decides which blocks a shape must have."""
    s, at = model.shape, ("models", name, "shape")
    needs = {"deepseek_v3": {"mla", "moe"}, "qwen3_next": {"moe", "linear_attention"}}.get(model.family, set())
    for block in ("mla", "moe", "linear_attention"):
        present = getattr(s, block) is not None
        if block in needs and not present:
            yield at, f"family {model.family} needs a '{block}' block"
        if block == "mla" and present and model.family != "deepseek_v3":
            yield at + ("mla",), f"family {model.family} has no MLA; remove the block or use family deepseek_v3"
        if block == "linear_attention" and present and model.family != "qwen3_next":
            yield at + ("linear_attention",), f"family {model.family} has no linear attention; use family qwen3_next"
    if s.heads % s.query_groups:
        yield at + ("query_groups",), f"{s.query_groups} does not divide heads={s.heads}"
    if s.moe is not None:
        if s.moe.topk > s.moe.experts:
            yield at + ("moe", "topk"), f"{s.moe.topk} > experts={s.moe.experts}; topk must be ≤ experts"
        if s.moe.first_dense_layers >= s.layers:
            yield at + ("moe", "first_dense_layers"), f"{s.moe.first_dense_layers} leaves no MoE layer of {s.layers}"


def _stage_layers(layout: Layout, layers: int) -> Iterator[tuple[str, str]]:
    """Layers over PP stages, with megatron's optional uneven first/last stage."""
    first, last, pp = layout.first_stage_layers, layout.last_stage_layers, layout.pp
    if pp == 1:
        if first or last:
            yield "first_stage_layers", "uneven stages need pp > 1"
        return
    rest, middle = layers - (first or 0) - (last or 0), pp - (first is not None) - (last is not None)
    shown = f"layers={layers} - first={first or 0} - last={last or 0} = {rest}"
    if rest < 0 or (middle == 0 and rest != 0):
        yield "pp", f"{pp} stages cannot hold {shown} layers"
    elif middle and rest % middle:
        yield "pp", f"{shown} layers do not split over {middle} stage(s); pick first/last stage layers or pp so it divides"


def check_layout_fits(recipe_name: str, r: Recipe, layout: Layout, model: Model, path: Path) -> Iterator[Finding]:
    """REFERENCE §5 rules of one layout applied to one recipe's model, sequence length and GPU count."""
    s, lname = model.shape, r.layout
    at = ("layouts", lname)
    if layout.fsdp:
        if (layout.tp, layout.pp, layout.cp, layout.ep) != (1, 1, 1, 1):
            yield at + ("fsdp",), "FSDP layouts shard over DP only; set tp, pp, cp, ep to 1"
        if r.trainer != "fsdp":
            yield path + ("trainer",), f"'{r.trainer}' cannot run FSDP layout '{lname}'; use trainer: fsdp"
    elif r.trainer == "fsdp":
        yield path + ("layout",), f"trainer fsdp needs a layout with fsdp: true; '{lname}' is a megatron layout"
    heads = {"heads": s.heads, "query_groups": s.query_groups}
    if s.mla is not None:
        heads.pop("query_groups")  # MLA has one query group per head
    if s.linear_attention is not None:
        heads |= {"linear_attention.key_heads": s.linear_attention.key_heads,
                  "linear_attention.value_heads": s.linear_attention.value_heads}
    for what, n in heads.items():
        if n % layout.tp:
            yield at + ("tp",), f"{layout.tp} does not divide {what}={n} of model {r.model} (recipe {recipe_name})"
    if s.moe is None:
        if layout.ep > 1 or (layout.etp or 1) > 1:
            yield at + ("ep",), f"model {r.model} is dense: expert parallelism (ep={layout.ep}, etp={layout.etp}) needs MoE"
    elif s.moe.experts % layout.ep:
        yield at + ("ep",), f"{layout.ep} does not divide experts={s.moe.experts} of model {r.model}"
    for key, msg in _stage_layers(layout, s.layers):
        yield at + (key,), f"{msg} (model {r.model})"
    seq = r.grpo.max_prompt_len + r.grpo.max_response_len
    unit = 2 * layout.cp * (layout.tp if layout.sequence_parallel and layout.tp > 1 else 1)
    if unit > 1 and seq % unit:
        shown = "2·TP·CP" if unit != 2 * layout.cp else "2·CP"
        yield path + ("grpo", "max_response_len"), (
            f"sequence length {r.grpo.max_prompt_len}+{r.grpo.max_response_len}={seq} is not a multiple of "
            f"{shown}={unit}; pick lengths whose sum divides by {unit}")
    minimum, _ = derived_sizes(layout, r.gpus)
    dense, expert = layout.tp * layout.cp * layout.pp, layout.expert_tp * layout.ep * layout.pp
    arithmetic = f"lcm(TP·CP·PP={dense}, ETP·EP·PP={expert}) = {lcm(dense, expert)}"
    if layout.fsdp:
        if layout.dp is not None and r.gpus != layout.dp:
            yield path + ("gpus",), f"{r.gpus} does not match layout {lname} (FSDP over dp={layout.dp}); declare gpus: {layout.dp}"
    elif layout.dp is not None and r.gpus != dense * layout.dp:
        yield path + ("gpus",), (f"{r.gpus} does not match layout {lname}: TP·CP·PP·DP={dense}·{layout.dp}"
                                 f" = {dense * layout.dp}; declare gpus: {dense * layout.dp}")
    elif r.gpus < minimum:
        yield path + ("gpus",), f"{r.gpus} is too few: {arithmetic}; declare gpus: {minimum}"
    elif r.gpus % minimum:
        yield path + ("gpus",), f"{r.gpus} is not a multiple of {arithmetic}; use a multiple of {minimum}"


def check_recipe(name: str, r: Recipe, m: Matrix) -> Iterator[Finding]:
    at = ("recipes", name)
    image = m.images[r.image]
    if r.rollout.engine in ("vllm", "sglang"):
        have = image.engine.name if image.engine else "no engine"
        if have != r.rollout.engine:
            with_engine = [n for n, i in m.images.items() if i.engine and i.engine.name == r.rollout.engine]
            yield at + ("rollout", "engine"), (f"{r.rollout.engine} rollout needs an image with that engine; image "
                                               f"{r.image} has {have}; images with it: {', '.join(with_engine) or 'none'}")
    if r.gpus % r.rollout.tp:
        yield at + ("rollout", "tp"), f"{r.rollout.tp} does not divide gpus={r.gpus}"
    if r.data.source == "math-lighteval" and r.data.path is None:
        yield at + ("data", "path"), "math-lighteval needs the path of the preprocessed parquet"
    yield from check_layout_fits(name, r, m.layouts[r.layout], m.models[r.model], at)


def check_gate(name: str, g: Gate, m: Matrix) -> Iterator[Finding]:
    """Each layout a gate compares must itself be a valid layout of the recipe."""
    recipe = m.recipes[g.recipe]
    base = m.layouts[recipe.layout]
    for i, patch in enumerate([g.reference, *g.candidates]):
        at = ("gates", name, "reference") if i == 0 else ("gates", name, "candidates", i - 1)
        changes = patch.model_dump(exclude_none=True)
        gpus = changes.pop("gpus", recipe.gpus)
        try:
            layout = Layout.model_validate(base.model_dump() | changes)
        except ValueError as exc:  # an impossible combination of degrees
            yield at, str(exc).splitlines()[0]
            continue
        variant = recipe.model_copy(update={"gpus": gpus, "layout": f"{recipe.layout}+{changes}"})
        for _, msg in check_layout_fits(g.recipe, variant, layout, m.models[recipe.model], at):
            yield at, msg


def check_benchmark(name: str, b: Benchmark) -> Iterator[Finding]:
    """A suite keeps at least one steady episode and names each of its entries once."""
    at = ("benchmarks", name)
    if b.warmup_episodes >= b.episodes:
        yield at + ("warmup_episodes",), (f"{b.warmup_episodes} leaves no steady episode of episodes={b.episodes}; "
                                          f"use at most {b.episodes - 1}")
    seen: set[str] = set()
    for i, item in enumerate(b.recipes):
        label = item if isinstance(item, str) else item.name
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
