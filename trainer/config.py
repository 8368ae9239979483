"""A recipe resolved from the matrix plus `key=value` overrides, checked like the matrix itself.

Overrides address the recipe's own fields with dotted keys (`grpo.lr=5e-4`, `run.episodes=3`,
`layout=tp2`), and `model.KEY` the fields of the model the recipe names (`model.weights=/ckpt/qwen`); values
are parsed as YAML scalars, so `1e-3`, `true` and `null` have their usual types.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from matrix import DEFAULT_MATRIX_PATH, MatrixError, ResolvedRecipe, load_matrix
from matrix.errors import did_you_mean
from matrix.rules import check_recipe
from matrix.schema import Model, Recipe

SEED_LIMIT = 2**63


class TrainerInputError(Exception):
    """Bad input to the trainer (recipe name, override, environment): one line, exit code 2."""


MODEL_PREFIX = "model."  # `model.weights=...` overrides the recipe's model entry, not the recipe's `model` name


def _apply(tree: dict, key: str, value: object, *, prefix: str = "", what: str = "the recipe") -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            valid = ", ".join(k for k, v in node.items() if isinstance(v, dict))
            raise TrainerInputError(f"override '{prefix}{key}': '{part}' is not a section of {what}; sections: {valid}")
        node = child
    if leaf not in node:
        raise TrainerInputError(f"override '{prefix}{key}': unknown key '{leaf}'; valid keys here: {', '.join(node)}")
    node[leaf] = value


def _validated(cls, data: dict, shown: str, prefix: str = ""):
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = prefix + ".".join(str(p) for p in first["loc"])
        raise TrainerInputError(f"override {shown}: {where}: {first['input']!r}: {first['msg']}") from None


def parse_overrides(items: list[str]) -> dict[str, object]:
    parsed = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise TrainerInputError(f"argument '{item}': expected key=value (e.g. grpo.lr=5e-4 or run.episodes=3)")
        parsed[key.strip()] = _scalar(item, text)
    return parsed


def _scalar(item: str, text: str) -> object:
    for number in (int, float):  # YAML 1.1 reads "5e-4" as a string; users mean a number
        try:
            return number(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        raise TrainerInputError(f"override '{item}': the value is not a YAML scalar") from None


def _lengths_fit_model(recipe: Recipe, model: Model, model_name: str) -> list[str]:
    """Prompt plus response must fit the model's positions (rotary tables, engine KV cache)."""
    g, limit = recipe.grpo, model.shape.max_position
    if g.max_prompt_len >= limit:
        return [f"grpo.max_prompt_len: {g.max_prompt_len} leaves no room for a response in model {model_name} "
                f"(max_position {limit}); use at most {limit - 1}"]
    if g.max_prompt_len + g.max_response_len > limit:
        return [f"grpo.max_response_len: {g.max_prompt_len} + {g.max_response_len} = "
                f"{g.max_prompt_len + g.max_response_len} exceeds max_position {limit} of model {model_name}; "
                f"use max_response_len <= {limit - g.max_prompt_len}"]
    return []


def resolve(recipe_name: str, overrides: dict[str, object], matrix_path: str | Path = DEFAULT_MATRIX_PATH
            ) -> ResolvedRecipe:
    """Load the matrix, apply overrides to one recipe, re-check it against the matrix's rules."""
    try:
        m = load_matrix(matrix_path)
    except MatrixError as exc:
        raise TrainerInputError(str(exc)) from None
    if recipe_name not in m.recipes:
        raise TrainerInputError(f"unknown recipe '{recipe_name}'; recipes: {', '.join(m.recipes)}"
                                + did_you_mean(recipe_name, m.recipes))
    data = m.recipes[recipe_name].model_dump()
    model_overrides = {k.removeprefix(MODEL_PREFIX): v for k, v in overrides.items() if k.startswith(MODEL_PREFIX)}
    for key, value in overrides.items():
        if not key.startswith(MODEL_PREFIX):
            _apply(data, key, value)
    shown = " ".join(f"{k}={v}" for k, v in overrides.items())
    recipe = _validated(Recipe, data, shown)
    m = m.model_copy(update={"recipes": {**m.recipes, recipe_name: recipe}})
    for key in ("model", "image", "layout"):
        table = getattr(m, key + "s")
        if getattr(recipe, key) not in table:
            raise TrainerInputError(f"override {shown}: {key} '{getattr(recipe, key)}' is not defined; "
                                    f"defined: {', '.join(table)}" + did_you_mean(getattr(recipe, key), table))
    if model_overrides:
        model_data = m.models[recipe.model].model_dump()
        for key, value in model_overrides.items():
            _apply(model_data, key, value, prefix=MODEL_PREFIX, what=f"model {recipe.model}")
        model = _validated(Model, model_data, shown, MODEL_PREFIX)
        m = m.model_copy(update={"models": {**m.models, recipe.model: model}})
    problems = [f"{'.'.join(map(str, path))}: {msg}" for path, msg in check_recipe(recipe_name, recipe, m)]
    problems += _lengths_fit_model(recipe, m.models[recipe.model], recipe.model)
    cp = m.layouts[recipe.layout].cp
    if recipe.grpo.loss_agg == "seq-mean-token-mean" and cp > 1:
        problems.append(f"grpo.loss_agg: seq-mean-token-mean averages whole sequences, which layout {recipe.layout} "
                        f"splits over cp={cp} ranks; use token-mean or a layout without CP")
    if not 0 <= recipe.run.seed < SEED_LIMIT:  # torch seeds are 64-bit; megatron adds offsets to ours
        problems.append(f"run.seed: {recipe.run.seed} is out of range; use 0 <= seed < 2**63")
    if problems:
        raise TrainerInputError(f"recipe {recipe_name} with {shown or 'no overrides'}: {problems[0]}")
    return m.resolve(recipe_name)
