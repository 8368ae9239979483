"""MUST SHOW (issue 12.3, 12.5): hostile overrides are one line naming the key and the valid range, exit 2,
nothing written; variant names are checked against the registered ones."""

import pytest

from trainer.cli import main
from trainer.config import TrainerInputError, parse_overrides

CASES = [
    (["grpo.sampling.top_k=-5"], "grpo.sampling.top_k: -5: top_k must be -1 (off) or a positive number"),
    (["eval.sampling.top_k=0"], "eval.sampling.top_k: 0: top_k must be -1 (off) or a positive number"),
    (["grpo.prompts_per_episode=1000"],
     "1000 training prompts per episode (grpo.prompts_per_episode): data source demo has 512 that fit "
     "max_prompt_len 32; use at most 512"),
    (["grpo.max_prompt_len=2"], "prompts that fit grpo.max_prompt_len=2: data source demo has none"),
    (["grpo.max_response_len=300"],
     "grpo.max_response_len: 32 + 300 = 332 exceeds max_position 256 of model tiny-qwen2.5; "
     "use max_response_len <= 224"),
    (["grpo.max_prompt_len=256"], "grpo.max_prompt_len: 256 leaves no room for a response"),
    (["grpo.adam_betas=[0.9,1.5]"], "grpo.adam_betas.1: 1.5: Input should be less than 1"),
    (["grpo.advantage=rloo"], "Input should be 'grpo' or 'grpo_unbiased'"),
    (["grpo.policy_loss=ppo"], "Input should be 'vanilla' or 'dual_clip'"),
    (["grpo.kl_estimator=k4"], "Input should be 'k1', 'k2' or 'k3'"),
    (["grpo.loss_agg=sum"], "Input should be 'token-mean' or 'seq-mean-token-mean'"),
    (["grpo.grader=exact"], "Input should be 'hendrycks' or 'math-verify'"),
    (["grpo.policy_loss=dual_clip", "grpo.loss_cap=5"], "loss_cap is an option of policy_loss vanilla"),
    (["grpo.std=unbiased"], "unknown key 'std'"),  # replaced by grpo.advantage=grpo_unbiased
    (["run.seed=100000000000000000000"], "run.seed: 100000000000000000000 is out of range; use 0 <= seed < 2**63"),
    (["run.seed=-1"], "run.seed: -1 is out of range"),
    (["layout=cp2", "gpus=2", "grpo.loss_agg=seq-mean-token-mean"],
     "grpo.loss_agg: seq-mean-token-mean averages whole sequences, which layout cp2 splits over cp=2 ranks"),
]


@pytest.mark.parametrize(("overrides", "words"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_hostile_override_is_one_line_exit_2(tmp_path, capsys, overrides, words):
    runs = tmp_path / "runs"
    assert main(["tiny-qwen2.5", *overrides, "--runs", str(runs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not runs.exists(), "nothing is written for rejected input"


def test_selected_variants_resolve(tmp_path, capsys):
    """The same fields with registered names pass the checks (they reach the run; here 0 episodes do not)."""
    from trainer.config import resolve

    r = resolve("tiny-qwen2.5", parse_overrides(["grpo.advantage=grpo_unbiased", "grpo.policy_loss=dual_clip",
                                                 "grpo.loss_cap=null", "grpo.kl_estimator=k2",
                                                 "grpo.loss_agg=seq-mean-token-mean", "grpo.adam_betas=[0.8,0.9]"]))
    g = r.recipe.grpo
    assert (g.advantage, g.policy_loss, g.loss_cap, g.kl_estimator, g.loss_agg, g.adam_betas) == (
        "grpo_unbiased", "dual_clip", None, "k2", "seq-mean-token-mean", (0.8, 0.9))


@pytest.mark.parametrize(("item", "value"), [
    ("grpo.lr=5e-4", 5e-4), ("run.episodes=3", 3), ("run.full_recompute=true", True),
    ("grpo.dual_clip_c=null", None), ("grpo.grader=math-verify", "math-verify"), ("data.path=a=b", "a=b"),
    ("data.path=", ""), ("grpo.adam_betas=[0.9, 0.99]", [0.9, 0.99]),
])
def test_parse_overrides_types(item, value):
    key = item.partition("=")[0]
    assert parse_overrides([item]) == {key: value}


@pytest.mark.parametrize("item", ["lr", "=3", "grpo.lr=[unclosed"])
def test_parse_overrides_refuses(item):
    with pytest.raises(TrainerInputError, match="expected key=value|not a YAML scalar"):
        parse_overrides([item])


def test_warm_start_without_pairs_is_refused(monkeypatch, matrix, repo):
    """Only the demo task has warm-start pairs; a data source without them is refused before the run."""
    import dataclasses

    from trainer import tasks
    from trainer.preflight import missing

    demo = tasks.BUILDERS["demo"]
    monkeypatch.setitem(tasks.BUILDERS, "demo", lambda r, root: dataclasses.replace(demo(r, root), sft=[]))
    problems = missing(matrix.resolve("demo"), root=repo)
    assert problems == ["warm-start pairs for run.warm_start_steps=200: data source demo has none (only demo "
                        "does); set run.warm_start_steps=0"]
