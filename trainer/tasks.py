"""The prompts a recipe trains and evaluates on, tokenised, with the tokenizer that goes with them.

`demo`: the embedded arithmetic task and the character tokenizer (no hub). `math-lighteval`: the
preprocessed parquet (`python -m trainer.data.math_lighteval`) and the model's own HF tokenizer. `parquet`: your
own file in verl's layout (`trainer.data.verl_parquet`) with the model's tokenizer and chat template; a tiny random
model (no `hf_id`, no `weights`) has none, so it gets the demo's character tokenizer and its fixed template.

A task also says how a response is scored: the recipe's grader, or its own reward function (`grpo.reward`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from matrix import ResolvedRecipe
from trainer.data.demo_task import DemoTaskConfig, make_demo_problems, make_sft_pairs
from trainer.data.prompts import PromptDataset
from trainer.data.tokenizer import CharTokenizer
from trainer.reward.function import RewardFunction
from trainer.reward.grader import score

# Operands 0..4 with + and −: 40 distinct problems, so each is seen ~60 times in a 150-episode run and
# GRPO visibly moves accuracy on 2 cores (measured: with 0..9, 155 problems, reward stayed flat in 60 episodes).
DEMO_TASK = {"max_operand": 4, "ops": ("+", "-")}
DEMO_WARM_START_WRONG = 0.5  # half the warm-start answers are wrong: the model starts right ~half the time


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    ground_truth: str
    extra: dict = field(default_factory=dict)
    """What a reward function receives besides the response and the ground truth (`data_source`, ...)."""


@dataclass(frozen=True)
class Task:
    train: list[Prompt]
    eval: list[Prompt]
    tokenizer: object
    eos_id: int
    pad_id: int
    sft: list[tuple[list[int], list[int]]]
    """(prompt ids, response ids + EOS) pairs for a warm start; empty where there is none."""
    grader: str = "hendrycks"
    reward_fn: RewardFunction | None = None
    """`grpo.reward`'s function; None → the grader scores."""

    def score(self, text: str, prompt: Prompt) -> tuple[float, bool]:
        """The reward of response ``text`` to ``prompt``, and False where a reward function failed (scored 0)."""
        if self.reward_fn is None:
            return score(text, prompt.ground_truth, self.grader), True
        return self.reward_fn.score(text, prompt.ground_truth, prompt.extra)

    def decode(self, ids: list[int]) -> str:
        # The model's vocab is padded past the tokenizer's (to divide by TP); such ids decode to nothing.
        return self.tokenizer.decode([i for i in ids if i < len(self.tokenizer)], skip_special_tokens=True)


def _prompts(rows: list[dict], tokenizer, max_len: int) -> list[Prompt]:
    return [Prompt(item["prompt_ids"], item["ground_truth"], item.get("extra", {"data_source": item.get("data_source")}))
            for item in PromptDataset(rows, tokenizer, max_len)]


def _demo(r: ResolvedRecipe, root: Path) -> Task:
    tok, seed, max_len = CharTokenizer(), r.recipe.run.seed, r.recipe.grpo.max_prompt_len
    train_cfg = DemoTaskConfig(seed=seed, **DEMO_TASK)
    eval_cfg = DemoTaskConfig(seed=seed + 1, n_problems=r.recipe.eval.prompts, **DEMO_TASK)
    sft = [(tok.encode(tok.apply_chat_template(p["prompt"])), tok.encode(p["response"]) + [tok.eos_token_id])
           for p in make_sft_pairs(train_cfg, corrupt_frac=DEMO_WARM_START_WRONG, corrupt_seed=seed)]
    return Task(_prompts(make_demo_problems(train_cfg), tok, max_len),
                _prompts(make_demo_problems(eval_cfg, split="test"), tok, max_len),
                tok, tok.eos_token_id, tok.pad_token_id, sft)


def _math(r: ResolvedRecipe, root: Path) -> Task:
    from trainer.data.math_lighteval import read_rows  # parquet readers need pyarrow: see _parquet

    tok = hf_tokenizer(r)
    rows = read_rows(root / r.recipe.data.path)
    held_out = [row for row in rows if row.get("split") == "test"]
    train = [row for row in rows if row.get("split") != "test"]
    max_len = r.recipe.grpo.max_prompt_len
    return Task(_prompts(train, tok, max_len), _prompts(held_out, tok, max_len), tok, tok.eos_token_id,
                tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, [])


def hf_tokenizer(r: ResolvedRecipe):
    """The model's own tokenizer (``places.tokenizer_source``: beside its prepared weights, else the hub's).
    Remote code (a ``tokenizer_config.json`` whose ``auto_map`` names the repository's own class) runs only under
    ``model.trust_remote_code``; otherwise a ValueError says so in one line, before transformers would ask on
    the terminal."""
    import json

    from transformers import AutoTokenizer

    from trainer.prepare.places import tokenizer_source

    source = tokenizer_source(r) or r.model.weights
    config = Path(source) / "tokenizer_config.json"
    if not r.model.trust_remote_code and config.is_file():
        remote = json.loads(config.read_text()).get("auto_map", {}).get("AutoTokenizer")
        code = next((c for c in remote if c), None) if isinstance(remote, list) else remote  # [slow, fast]
        if code:
            raise ValueError(f"the tokenizer in {source} is its repository's own code ({code}); set "
                             f"model.trust_remote_code=true (matrix.yaml models.{r.recipe.model}) if you trust it")
    return AutoTokenizer.from_pretrained(source, trust_remote_code=r.model.trust_remote_code)


def _model_tokenizer(r: ResolvedRecipe):
    if r.model.hf_id or r.model.weights:
        return hf_tokenizer(r)
    tok = CharTokenizer()
    if len(tok) > r.model.shape.vocab:
        raise ValueError(f"model {r.recipe.model} has no tokenizer (no hf_id or weights) and its vocab "
                         f"{r.model.shape.vocab} is smaller than the character tokenizer's {len(tok)}")
    return tok


def _parquet(r: ResolvedRecipe, root: Path) -> Task:
    tok = _model_tokenizer(r)
    # Imported here: pyarrow is only for parquet tasks, and the bare GPU machine's wheelhouse (trainer.wheelhouse)
    # has none, so the demo and the smoke must not need it.
    from trainer.data.verl_parquet import HELD_OUT_SPLIT, read_verl_rows

    rows = read_verl_rows(root / r.recipe.data.path)
    held_out = [row for row in rows if row["split"] == HELD_OUT_SPLIT]
    train = [row for row in rows if row["split"] != HELD_OUT_SPLIT]
    max_len = r.recipe.grpo.max_prompt_len
    return Task(_prompts(train, tok, max_len), _prompts(held_out, tok, max_len), tok, tok.eos_token_id,
                tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, [])


BUILDERS: dict[str, Callable[[ResolvedRecipe, Path], Task]] = {"demo": _demo, "math-lighteval": _math,
                                                               "parquet": _parquet}


def reward_of(r: ResolvedRecipe) -> dict:
    """The scoring fields of a Task for recipe ``r``: its grader, or its reward function loaded now."""
    grpo = r.recipe.grpo
    return {"grader": grpo.grader, "reward_fn": RewardFunction(grpo.reward) if grpo.reward else None}


def build_task(r: ResolvedRecipe, root: Path = Path(".")) -> Task:
    task = replace(BUILDERS[r.recipe.data.source](r, root), **reward_of(r))
    if len(task.train) < r.recipe.grpo.prompts_per_episode:
        raise ValueError(f"recipe {r.name}: {len(task.train)} usable prompts < prompts_per_episode="
                         f"{r.recipe.grpo.prompts_per_episode}")
    return task
