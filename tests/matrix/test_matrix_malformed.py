"""Malformed matrices: each problem is reported with file, line, YAML path and the fix; exit code 2."""

import subprocess
import sys

import pytest

from matrix import MatrixError, load_matrix

# (id, text to replace in the committed matrix, replacement, expected YAML path, expected words)
EDITS = [
    ("gpus-too-few", "    gpus: 32\n", "    gpus: 8\n", "recipes.qwen3-next.gpus",
     "8 is too few: lcm(TP·CP·PP=16, ETP·EP·PP=32) = 32"),
    ("override-without-reason", '        why: "fused attention for MLA', '        wy: "fused attention for MLA',
     "images.vllm-te27.overrides[0].why", "missing required key 'why'"),
    ("typo-key", "qwen3-next-32: {tp: 2, pp: 8", "qwen3-next-32: {tp: 2, ppp: 8", "layouts.qwen3-next-32.ppp",
     "did you mean 'pp'?"),
    ("wrong-type", "    gpus: 128\n", '    gpus: "128"\n', "recipes.deepseek-v3.gpus", "valid integer"),
    ("zero-size", "  tp2: {tp: 2}", "  tp2: {tp: 0}", "layouts.tp2.tp", "greater than 0"),
    ("negative-size", "run: {episodes: 200, checkpoint_every: 20, distributed_optimizer: true}",
     "run: {episodes: -5, checkpoint_every: 20, distributed_optimizer: true}",
     "recipes.moonlight.run.episodes", "greater than 0"),
    ("unknown-model", "    model: qwen3-8b\n", "    model: qwen3-9b\n", "recipes.qwen3-8b-fsdp.model",
     "'qwen3-9b' is not defined under models; defined: bench-dense-512, deepseek-v3-671b"),
    ("unknown-image", "    image: sglang-te27\n", "    image: sglang-te28\n", "recipes.qwen3-next.image",
     "'sglang-te28' is not defined under images"),
    ("gate-unknown-recipe", "  cp-equivalence:\n    recipe: gates-dense\n", "  cp-equivalence:\n    recipe: tiny-qwen9\n", "gates.cp-equivalence.recipe",
     "'tiny-qwen9' is not a recipe"),
    ("heads-not-divisible-by-tp", "deepseek-v3-128: {tp: 4,", "deepseek-v3-128: {tp: 3,", "layouts.deepseek-v3-128.tp",
     "3 does not divide heads=128"),
    ("experts-not-divisible-by-ep", "{tp: 4, pp: 16, ep: 2, etp: 4,", "{tp: 4, pp: 16, ep: 3, etp: 4,",
     "layouts.deepseek-v3-128.ep", "3 does not divide experts=256"),
    ("uneven-stages", "first_stage_layers: 3, last_stage_layers: 2", "first_stage_layers: 4, last_stage_layers: 2",
     "layouts.deepseek-v3-128.pp", "do not split over 14 stage(s)"),
    ("sequence-not-multiple-of-2cp", "max_prompt_len: 1024, max_response_len: 2048, lr: 2.0e-6}\n    data: {source: math-lighteval, path: data/math-lighteval/train.parquet}\n    run: {episodes: 200",
     "max_prompt_len: 1024, max_response_len: 2047, lr: 2.0e-6}\n    data: {source: math-lighteval, path: data/math-lighteval/train.parquet}\n    run: {episodes: 200",
     "recipes.moonlight.grpo.max_response_len", "not a multiple of 2·TP·CP=8"),
    ("unquoted-python-version", 'python: "3.12"', "python: 3.12", "images.vllm-te27.python", 'quote it ("3.12")'),
    ("loose-pin", "      - numpy==1.26.4\n", "      - numpy>=1.26\n", "images.vllm-te27.requirements[8]",
     "expected an exact pin 'name==version'"),
    ("duplicate-key", "    layout: moonlight-8\n", "    layout: moonlight-8\n    layout: moonlight-8\n",
     "recipes.moonlight.layout", "duplicate key"),
    ("engine-mismatch", "rollout: {engine: sglang, tp: 4,", "rollout: {engine: vllm, tp: 4,",
     "recipes.qwen3-next.rollout.engine", "images with it: vllm-te27"),
    ("sglang-on-cpu-image", "rollout: {engine: vllm, colocate: false", "rollout: {engine: sglang, colocate: false",
     "recipes.demo-vllm.rollout.engine", "sglang rollout needs an image with that engine; image cpu has no engine"),
    ("colocated-engines-not-gpus", "rollout: {engine: vllm, tp: 2, engines: 4,", "rollout: {engine: vllm, tp: 2, engines: 3,",
     "recipes.moonlight.rollout.engines", "tp 2 × engines 3 = 6 != gpus=8; use engines: 4 or colocate: false"),
    ("gpu-memory-utilization-above-one", "engines: 4, gpu_memory_utilization: 0.6,", "engines: 4, gpu_memory_utilization: 1.5,",
     "recipes.moonlight.rollout.gpu_memory_utilization", "less than or equal to 1"),
    ("sleep-level-three", "colocate: true, sleep_level: 1, sync_bucket_mb: 1024}\n    layout: moonlight-8",
     "colocate: true, sleep_level: 3, sync_bucket_mb: 1024}\n    layout: moonlight-8",
     "recipes.moonlight.rollout.sleep_level", "Input should be 0, 1 or 2"),
    ("sync-bucket-zero", "colocate: false, sync_bucket_mb: 0.05}", "colocate: false, sync_bucket_mb: 0}",
     "recipes.demo-vllm.rollout.sync_bucket_mb", "greater than 0"),
    ("expert-parallel-on-dense", "    layout: single\n    gpus: 1\n    grpo: {prompts_per_episode: 8",
     "    layout: ep2\n    gpus: 2\n    grpo: {prompts_per_episode: 8", "layouts.ep2.ep", "is dense"),
    ("fsdp-trainer-on-megatron-layout", "    layout: fsdp-8\n", "    layout: qwen2.5-7b-8\n",
     "recipes.qwen3-8b-fsdp.layout", "trainer fsdp needs a layout with fsdp: true"),
    ("unknown-family", "    family: qwen3\n    hf_id: Qwen/Qwen3-8B", "    family: qwen4\n    hf_id: Qwen/Qwen3-8B",
     "models.qwen3-8b.family", "'qwen4'"),
    ("bad-digest", 'base: {ref: "nvcr.io/nvidia/pytorch:24.12-py3", digest: null}\n    python: "3.12"\n    platform: x86_64-manylinux_2_28\n    engine: {name: vllm',
     'base: {ref: "nvcr.io/nvidia/pytorch:24.12-py3", digest: "abc"}\n    python: "3.12"\n    platform: x86_64-manylinux_2_28\n    engine: {name: vllm',
     "images.vllm-te27.base.digest", "'sha256:' followed by 64 hex digits"),
    ("unknown-policy-loss", "micro_batch_size: 32}", "micro_batch_size: 32, policy_loss: ppo}",
     "recipes.demo.grpo.policy_loss", "Input should be 'vanilla' or 'dual_clip'"),
    ("tis-cap-below-one", "micro_batch_size: 32}", "micro_batch_size: 32, tis_cap: 0.5}",
     "recipes.demo.grpo.tis_cap", "tis_cap 0.5 < 1 would scale down the loss of every token"),
    ("staleness-below-one-episode", "micro_batch_size: 32}",
     "micro_batch_size: 32, steps_per_episode: 2, max_staleness: 1}", "recipes.demo.grpo.max_staleness",
     "max_staleness 1 is below steps_per_episode 2"),
    ("greedy-groups", "max_response_len: 16, lr: 1.0e-3,\n", "max_response_len: 16, lr: 1.0e-3, sampling: {temperature: 0},\n",
     "recipes.tiny-qwen2.5.grpo.sampling", "temperature 0 (greedy) gives the 4 samples of a prompt one response"),
    ("top-k-zero", "max_response_len: 16, lr: 1.0e-3,\n", "max_response_len: 16, lr: 1.0e-3, sampling: {top_k: 0},\n",
     "recipes.tiny-qwen2.5.grpo.sampling.top_k", "top_k must be -1 (off) or a positive number"),
    ("missing-family-block", "      mla: {q_lora_rank: 1536,", "      mlx: {q_lora_rank: 1536,",
     "models.deepseek-v3-671b.shape.mlx", "unknown key 'mlx'"),
]

# Problems not reported at the edited line: YAML path -> how the reported line starts.
ELSEWHERE = {
    "images.vllm-te27.overrides[0].why": "- pin:",  # a missing key is reported at the mapping that lacks it
    "layouts.ep2.ep": "ep2: {ep: 2}",  # the recipe now names a layout that does not fit it: fix the layout
}

# (id, whole file, expected line, expected words)
WHOLE_FILES = [
    ("empty", "", 1, "the file is empty; expected a mapping with keys images, models"),
    ("whitespace-only", "\n  \n", 1, "the file is empty"),
    ("not-yaml", "images: [unclosed\nmodels: {}\n", 2, "not valid YAML"),
    ("tab-indent", "images:\n\tcpu: {}\n", 2, "tab character; YAML indentation must use spaces"),
    ("top-level-list", "- images\n- models\n", 1, "found a list; expected a mapping"),
    ("top-level-scalar", "hello\n", 1, "found a str; expected a mapping"),
    ("missing-sections", "images: {}\n", 1, "missing required key 'models'"),
]


def _edit(text: str, old: str, new: str) -> str:
    assert old in text, f"edit anchor not in matrix.yaml: {old!r}"
    return text.replace(old, new, 1)  # the first occurrence; the asserted path says which entry changed


def _problems(path) -> list:
    with pytest.raises(MatrixError) as caught:
        load_matrix(path)
    return caught.value.problems


@pytest.mark.parametrize(("old", "new", "path", "words"), [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_edit_is_reported_at_its_path(tmp_path, matrix_text, old, new, path, words):
    bad = tmp_path / "matrix.yaml"
    bad.write_text(_edit(matrix_text, old, new))
    problems = _problems(bad)
    at_path = [p for p in problems if p.path == path]
    assert at_path, f"no problem at {path}; got: {[str(p) for p in problems]}"
    assert any(words in p.message for p in at_path), [str(p) for p in at_path]
    lines = bad.read_text().splitlines()
    changed_line = next(i for i, (a, b) in enumerate(zip(matrix_text.splitlines(), lines, strict=False)) if a != b) + 1
    # the user is sent to the line to fix: the edited one, or for a cross-entry finding the entry it names
    elsewhere = ELSEWHERE.get(path)
    if elsewhere is None:
        assert at_path[0].line == changed_line, (at_path[0].line, changed_line)
    else:
        assert lines[at_path[0].line - 1].lstrip().startswith(elsewhere), lines[at_path[0].line - 1]


@pytest.mark.parametrize(("text", "line", "words"), [w[1:] for w in WHOLE_FILES], ids=[w[0] for w in WHOLE_FILES])
def test_malformed_file_is_one_located_line(tmp_path, text, line, words):
    bad = tmp_path / "m.yaml"
    bad.write_text(text)
    problems = _problems(bad)
    assert any(p.line == line and words in p.message for p in problems), [str(p) for p in problems]


def test_all_problems_reported_at_once(tmp_path, matrix_text):
    text = matrix_text
    for old, new in [EDITS[0][1:3], EDITS[2][1:3], EDITS[6][1:3], EDITS[1][1:3]]:
        text = _edit(text, old, new)
    bad = tmp_path / "matrix.yaml"
    bad.write_text(text)
    paths = {p.path for p in _problems(bad)}
    # the typo'd layout is dropped, so qwen3-next (which uses it) is not cross-checked; the rest still is
    assert {"layouts.qwen3-next-32.ppp", "recipes.qwen3-8b-fsdp.model",
            "images.vllm-te27.overrides[0].why"} <= paths


def test_cli_exit_2_one_line_per_problem_no_traceback(tmp_path, matrix_text, repo):
    bad = tmp_path / "matrix.yaml"
    bad.write_text(_edit(_edit(matrix_text, *EDITS[0][1:3]), *EDITS[6][1:3]))
    out = subprocess.run([sys.executable, "-m", "matrix", "--file", str(bad)], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    # qwen3-next's 8 GPUs are also too few for its colocated engines (tp 4 × 8 engines): its own line
    assert len(lines) == 3 and all(line.startswith(f"{bad}:") for line in lines)
    assert any("recipes.qwen3-next.gpus: 8 is too few" in line for line in lines)
    assert any("recipes.qwen3-next.rollout.engines: colocated engines" in line for line in lines)
    assert any("recipes.qwen3-8b-fsdp.model: 'qwen3-9b' is not defined" in line for line in lines)


def test_unreadable_file_is_exit_2(tmp_path, repo):
    out = subprocess.run([sys.executable, "-m", "matrix", "--file", str(tmp_path / "nope.yaml")], cwd=repo,
                         capture_output=True, text=True)
    assert out.returncode == 2 and "cannot read the file" in out.stderr and "Traceback" not in out.stderr
