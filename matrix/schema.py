"""Typed schema of matrix.yaml (pydantic v2, strict: no unknown keys, no silent type coercion).

Field docstrings say what a value means; defaults carry their source (REFERENCE.md section) where they
come from a recipe we reproduce. Cross-entry rules (references, layouts against model shapes) live in
`matrix.rules`, because they need more than one entry at a time.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
Pin = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*(\[[A-Za-z0-9_,\-]+\])?==[A-Za-z0-9.+!\-]+$")]
Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
_OP_VERSION = r"\s*(==|!=|<=|>=|<|>|~=)\s*[A-Za-z0-9.*+!\-]+"
Bound = Annotated[str, Field(pattern=rf"^[A-Za-z0-9][A-Za-z0-9._\-]*{_OP_VERSION}(\s*,{_OP_VERSION})*$")]
GitCommit = Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]
PythonVersion = Annotated[str, Field(pattern=r"^3\.\d+$")]


def pattern_names() -> dict[str, str]:
    """Human wording of each pattern, for error messages."""
    wording = {Pin: "an exact pin 'name==version' (extras allowed: 'ray[default]==2.46.0')",
               Bound: "a version bound 'name<26' or 'name>=1,<2'",
               Digest: "'sha256:' followed by 64 hex digits", GitCommit: "a full 40-hex-digit commit",
               PythonVersion: "a quoted Python version such as \"3.12\""}
    return {t.__metadata__[0].metadata[0].pattern: words for t, words in wording.items()}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --------------------------------------------------------------------------- images


class Bootstrap(Strict):
    """How to build the base locally when it cannot be pulled (air-gapped clusters)."""

    tool: Literal["debootstrap"]
    suite: NonEmptyStr
    variant: Literal["minbase", "buildd"] = "minbase"


class Base(Strict):
    ref: NonEmptyStr
    digest: Digest | None = None
    """None → render and build refuse unless `--allow-unpinned`, or unless a bootstrap is declared (the fallback)."""
    bootstrap: Bootstrap | None = None


class Engine(Strict):
    name: Literal["vllm", "sglang"]
    version: NonEmptyStr
    extras: list[NonEmptyStr] = []


class Override(Strict):
    """A pin that wins over what the resolver would pick; the reason is mandatory."""

    pin: Pin
    why: NonEmptyStr
    reinstall_last: bool = False
    """Force-reinstalled after every other install step, because later installs overwrite it (cuDNN)."""


class Constraint(Strict):
    """A bound the resolver cannot see on its own (a package's metadata omits it); the reason is mandatory."""

    bound: Bound
    why: NonEmptyStr


class SourceBuild(Strict):
    git: NonEmptyStr
    ref: NonEmptyStr
    commit: GitCommit | None = None
    """None → render and build refuse unless `--allow-unpinned` (development)."""
    env: dict[str, str] = {}
    why: NonEmptyStr
    cudnn_from_wheel: bool = False
    """Build against the cuDNN of the nvidia-cudnn-cu12 wheel: CUDNN_PATH points at it and its headers are copied
    into /usr/local/cuda/include (seed 000's Transformer Engine step)."""


class BaseCleanup(Strict):
    """Packages of the base image uninstalled before anything is installed, and why."""

    packages: list[NonEmptyStr]
    why: NonEmptyStr


class SourceBuildSettings(Strict):
    """Parallelism and GPU targets passed to every source build (as environment variables)."""

    max_jobs: PositiveInt = 8
    """MAX_JOBS: parallel compile jobs (torch's cpp_extension, flash-attn, apex); memory grows with it."""
    nvte_build_threads_per_job: PositiveInt = 1
    """NVTE_BUILD_THREADS_PER_JOB: Transformer Engine's threads per compile job."""
    nvcc_threads: PositiveInt = 4
    """NVCC_THREADS: nvcc's own threads per job (flash-attn)."""
    torch_cuda_arch_list: NonEmptyStr = "9.0"
    """TORCH_CUDA_ARCH_LIST: GPU architectures compiled for; 9.0 is H100/H20 (sm_90)."""


class PipSources(Strict):
    """Where pip/uv look besides PyPI; a local wheelhouse is the air-gapped twin of an index."""

    extra_index_urls: list[NonEmptyStr] = []
    find_links: list[NonEmptyStr] = []


class Image(Strict):
    description: NonEmptyStr
    base: Base
    python: PythonVersion
    platform: NonEmptyStr = "x86_64-manylinux_2_28"
    engine: Engine | None = None
    requirements: list[Pin] = []
    overrides: list[Override] = []
    constraints: list[Constraint] = []
    base_cleanup: BaseCleanup | None = None
    source_builds: dict[str, SourceBuild] = {}
    source_build_settings: SourceBuildSettings = SourceBuildSettings()
    patches: list[NonEmptyStr] = []
    apt: list[NonEmptyStr] = []
    env: dict[str, str] = {}
    pip: PipSources = PipSources()


# --------------------------------------------------------------------------- models


class MoE(Strict):
    experts: PositiveInt
    topk: PositiveInt
    ffn_hidden: PositiveInt
    shared_experts: NonNegativeInt = 0
    first_dense_layers: NonNegativeInt = 0
    # RL-stable router settings (REFERENCE §6): aux-loss-based balancing collapsed Moonlight's eval accuracy.
    router_load_balancing: Literal["none", "aux_loss", "seq_aux_loss"] = "none"
    aux_loss_coeff: Annotated[float, Field(ge=0)] = 0.0
    expert_bias: bool = False
    router_dtype: Literal["fp32", "fp64"] = "fp32"


class MLA(Strict):
    """Multi-head latent attention: q/k head dim (nope + rope) differs from the v head dim."""

    q_lora_rank: PositiveInt | None
    kv_lora_rank: PositiveInt
    qk_nope_head_dim: PositiveInt
    qk_rope_head_dim: PositiveInt
    v_head_dim: PositiveInt


class LinearAttention(Strict):
    """Gated delta-net layers of the Qwen3-Next hybrid; every `full_attention_interval`-th layer is full."""

    key_heads: PositiveInt
    value_heads: PositiveInt
    key_head_dim: PositiveInt
    value_head_dim: PositiveInt
    conv_kernel: PositiveInt = 4
    full_attention_interval: PositiveInt = 4


class Shape(Strict):
    layers: PositiveInt
    hidden: PositiveInt
    ffn_hidden: PositiveInt
    heads: PositiveInt
    query_groups: PositiveInt
    vocab: PositiveInt
    max_position: PositiveInt
    head_dim: PositiveInt | None = None
    """None → hidden / heads."""
    rope_theta: PositiveFloat = 10000.0
    norm_eps: PositiveFloat = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    moe: MoE | None = None
    mla: MLA | None = None
    linear_attention: LinearAttention | None = None


Family = Literal["qwen2", "qwen3", "deepseek_v3", "qwen3_next"]


class PrepareStep(Strict):
    step: Literal["fp8-to-bf16", "drop-config-key", "set-config", "hf-to-mcore"]
    why: NonEmptyStr
    args: dict[str, str | int | float | bool | None | dict[str, str]] = {}


class Model(Strict):
    family: Family
    hf_id: NonEmptyStr | None = None
    """None → a tiny random model built locally (CPU stand-in of its family)."""
    stands_in_for: NonEmptyStr | None = None
    dtype: Literal["bf16", "fp32"] = "bf16"
    shape: Shape
    prepare: list[PrepareStep] = []


# --------------------------------------------------------------------------- layouts


class Layout(Strict):
    """Megatron parallel degrees, or FSDP. Defaults are 1; `etp` None means 'same as tp' (megatron-core)."""

    tp: PositiveInt = 1
    pp: PositiveInt = 1
    cp: PositiveInt = 1
    ep: PositiveInt = 1
    etp: PositiveInt | None = None
    dp: PositiveInt | None = None
    """None → derived from the recipe's GPU count; set → the GPU count must match it exactly."""
    sequence_parallel: bool = False
    first_stage_layers: PositiveInt | None = None
    last_stage_layers: PositiveInt | None = None
    fsdp: bool = False
    """Shard over all DP ranks with torch FSDP2 (trainer: fsdp) instead of megatron's layout."""

    @property
    def expert_tp(self) -> int:
        return self.etp if self.etp is not None else self.tp


# --------------------------------------------------------------------------- recipes


class Rollout(Strict):
    engine: Literal["vllm", "sglang", "torch"]
    tp: PositiveInt = 1


class Sampling(Strict):
    temperature: Annotated[float, Field(ge=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: int = -1
    """-1 → off."""


class Eval(Strict):
    # ChatLearn eval sampling (REFERENCE §4): temperature 0.6, top-p 0.95, top-k 20, one sample per problem.
    every: NonNegativeInt = 0
    """Episodes between evaluations; 0 → never."""
    prompts: PositiveInt = 64
    sampling: Sampling = Sampling(temperature=0.6, top_p=0.95, top_k=20)


class GRPO(Strict):
    prompts_per_episode: PositiveInt
    samples_per_prompt: PositiveInt
    max_prompt_len: PositiveInt
    max_response_len: PositiveInt
    sampling: Sampling = Sampling()
    micro_batch_size: PositiveInt = 1
    steps_per_episode: PositiveInt = 1
    lr: PositiveFloat = 2e-6
    lr_schedule: Literal["constant", "cosine"] = "constant"
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    grad_clip: PositiveFloat = 1.0
    advantage: Literal["grpo"] = "grpo"
    std: Literal["population", "unbiased"] = "population"
    """population: ChatLearn (ddof 0, eps 1e-5); unbiased: verl (ddof 1, eps 1e-6)."""
    clip_low: Probability = 0.2
    clip_high: Annotated[float, Field(ge=0)] = 0.2
    loss_cap: PositiveFloat | None = 3.0
    dual_clip_c: Annotated[float, Field(gt=1)] | None = None
    kl_coef: Annotated[float, Field(ge=0)] = 0.0
    entropy_coef: Annotated[float, Field(ge=0)] = 0.0
    grader: Literal["hendrycks", "math-verify"] = "hendrycks"


class Data(Strict):
    source: Literal["demo", "math-lighteval"]
    path: NonEmptyStr | None = None
    """Preprocessed parquet (math-lighteval); None for the embedded demo task."""


class Run(Strict):
    episodes: PositiveInt
    seed: int = 1234
    checkpoint_every: NonNegativeInt = 0
    """Episodes between checkpoints; 0 → only at the end."""
    full_recompute: bool = False
    warm_start_steps: NonNegativeInt = 0
    """Supervised steps on the demo task's answer format before GRPO (the embedded demo's tiny model)."""


class Recipe(Strict):
    description: NonEmptyStr
    model: NonEmptyStr
    image: NonEmptyStr
    trainer: Literal["megatron", "fsdp"]
    rollout: Rollout
    layout: NonEmptyStr
    gpus: PositiveInt
    """Devices the recipe runs on (processes, on CPU)."""
    grpo: GRPO
    data: Data
    run: Run
    eval: Eval = Eval()


# --------------------------------------------------------------------------- gates and benchmarks


class LayoutPatch(Strict):
    """Degrees that differ from the recipe's layout; unnamed degrees keep the recipe's value."""

    tp: PositiveInt | None = None
    pp: PositiveInt | None = None
    cp: PositiveInt | None = None
    ep: PositiveInt | None = None
    etp: PositiveInt | None = None
    dp: PositiveInt | None = None
    gpus: PositiveInt | None = None


class Tolerances(Strict):
    logprobs_max_abs: Annotated[float, Field(ge=0)] = 1e-5
    loss_rel: Annotated[float, Field(ge=0)] = 1e-5
    grad_norm_rel: Annotated[float, Field(ge=0)] = 1e-4
    weights_max_abs: Annotated[float, Field(ge=0)] = 1e-6


class Gate(Strict):
    recipe: NonEmptyStr
    reference: LayoutPatch
    candidates: Annotated[list[LayoutPatch], Field(min_length=1)]
    compare: list[Literal["logprobs", "loss", "grad_norm", "weights"]] = ["logprobs", "loss", "grad_norm"]
    steps: PositiveInt = 1
    tolerances: Tolerances = Tolerances()


class Benchmark(Strict):
    recipes: Annotated[list[NonEmptyStr], Field(min_length=1)]
    episodes: PositiveInt = 5
    warmup_episodes: NonNegativeInt = 1
    repeats: PositiveInt = 1


# --------------------------------------------------------------------------- the file


class Matrix(Strict):
    images: dict[str, Image]
    models: dict[str, Model]
    layouts: dict[str, Layout]
    recipes: dict[str, Recipe]
    gates: dict[str, Gate] = {}
    benchmarks: dict[str, Benchmark] = {}

    def resolve(self, recipe_name: str) -> ResolvedRecipe:
        """The recipe with its references replaced by the entries they name, plus derived sizes."""
        from matrix.rules import derived_sizes

        recipe = self.recipes[recipe_name]
        layout = self.layouts[recipe.layout]
        min_gpus, dp = derived_sizes(layout, recipe.gpus)
        return ResolvedRecipe(
            name=recipe_name,
            recipe=recipe,
            model=self.models[recipe.model],
            image=self.images[recipe.image],
            layout=layout,
            min_gpus=min_gpus,
            dp=dp,
        )


class ResolvedRecipe(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    recipe: Recipe
    model: Model
    image: Image
    layout: Layout
    min_gpus: int
    dp: int
