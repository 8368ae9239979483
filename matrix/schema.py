"""Typed schema of matrix.yaml (pydantic v2, strict: no unknown keys, no silent type coercion).

Field docstrings say what a value means; defaults carry their source (REFERENCE.md section) where they
come from a recipe we reproduce. Cross-entry rules (references, layouts against model shapes) live in
`matrix.rules`, because they need more than one entry at a time.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from matrix.layout import derived_sizes

INT32_MAX = 2**31 - 1  # every size ends up in a tensor shape or a megatron-core config: an int32 holds it
PositiveInt = Annotated[int, Field(gt=0, le=INT32_MAX)]
NonNegativeInt = Annotated[int, Field(ge=0, le=INT32_MAX)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
Beta = Annotated[float, Field(strict=True, ge=0, lt=1)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
Pin = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*(\[[A-Za-z0-9_,\-]+\])?==[A-Za-z0-9.+!\-]+$")]
Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
_OP_VERSION = r"\s*(==|!=|<=|>=|<|>|~=)\s*[A-Za-z0-9.*+!\-]+"
Bound = Annotated[str, Field(pattern=rf"^[A-Za-z0-9][A-Za-z0-9._\-]*{_OP_VERSION}(\s*,{_OP_VERSION})*$")]
GitCommit = Annotated[str, Field(pattern=r"^[0-9a-f]{40}$")]
PythonVersion = Annotated[str, Field(pattern=r"^3\.\d+$")]
FunctionRef = Annotated[str, Field(pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")]
# An entry's name becomes a directory (runs/<recipe>-..., build/images/<image>/) and a command-line word.
EntryName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._\-]{0,99}$")]

LOSS_CAP = 3.0  # ChatLearn's constant cap on the per-token policy loss (REFERENCE §4)


def pattern_names() -> dict[str, str]:
    """Human wording of each pattern, for error messages."""
    wording = {Pin: "an exact pin 'name==version' (extras allowed: 'ray[default]==2.46.0')",
               Bound: "a version bound 'name<26' or 'name>=1,<2'",
               Digest: "'sha256:' followed by 64 hex digits", GitCommit: "a full 40-hex-digit commit",
               PythonVersion: "a quoted Python version such as \"3.12\"",
               FunctionRef: "a function 'pkg.module:fn' (dotted module, a colon, the function's name)",
               EntryName: "a name of at most 100 letters, digits, '.', '_' or '-', not starting with '.' or '-'"}
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
    """None → render warns, build refuses unless `--allow-unpinned`, or unless a bootstrap is declared (the fallback)."""
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
    """None → render warns, build refuses unless `--allow-unpinned` (development)."""
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
    shared_ffn_hidden: PositiveInt | None = None
    """Total hidden size of the shared experts where it is not ``shared_experts × ffn_hidden`` (Qwen3-Next's
    ``shared_expert_intermediate_size`` may be any size megatron-core accepts); needs ``shared_experts`` ≥ 1."""
    first_dense_layers: NonNegativeInt = 0
    groups: PositiveInt = 1
    """Group-limited routing (DeepSeek-V3 ``n_group``): experts split into this many groups ..."""
    group_topk: PositiveInt = 1
    """... of which each token may use this many (``topk_group``), chosen by their top-2 score sums."""
    routed_scaling: PositiveFloat = 1.0
    """Factor on the routed experts' weights (``routed_scaling_factor``)."""
    # RL-stable router settings (REFERENCE §6): aux-loss-based balancing collapsed Moonlight's eval accuracy.
    router_load_balancing: Literal["none", "aux_loss", "seq_aux_loss"] = "none"
    aux_loss_coeff: Annotated[float, Field(ge=0)] = 0.0
    expert_bias: bool = False
    """Update the router's expert bias during training (aux-loss-free balancing). The bias a checkpoint
    ships (DeepSeek-V3's ``e_score_correction_bias``) routes either way, kept fixed when this is off."""
    bias_update_rate: Annotated[float, Field(ge=0)] = 0.0
    router_dtype: Literal["fp32", "fp64"] = "fp32"

    TRAINING_SETTINGS: ClassVar[tuple[str, ...]] = (
        "router_load_balancing", "aux_loss_coeff", "expert_bias", "bias_update_rate", "router_dtype")
    """How the router trains, not what the weights are: a checkpoint's config.json does not say them."""

    @property
    def shared_hidden(self) -> int:
        """Total hidden size of the shared experts (0: none)."""
        return (self.shared_ffn_hidden or self.ffn_hidden * self.shared_experts) if self.shared_experts else 0


class YaRN(Strict):
    """YaRN rope scaling (DeepSeek-V3's ``rope_scaling`` with type yarn)."""

    factor: PositiveFloat
    original_max_position: PositiveInt
    beta_fast: PositiveFloat = 32.0
    beta_slow: PositiveFloat = 1.0
    mscale: PositiveFloat = 1.0
    mscale_all_dim: Annotated[float, Field(ge=0)] = 0.0


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
    partial_rotary_factor: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Share of each attention head's dims that rope rotates (the first ones); Qwen3-Next: 0.25."""
    norm_eps: PositiveFloat = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    rope_scaling: YaRN | None = None
    moe: MoE | None = None
    mla: MLA | None = None
    linear_attention: LinearAttention | None = None


Family = Literal["qwen2", "qwen3", "qwen3_moe", "deepseek_v3", "qwen3_next"]


class PrepareStep(Strict):
    step: Literal["fp8-to-bf16", "drop-config-key", "set-config", "hf-to-mcore"]
    why: NonEmptyStr
    args: dict[str, str | int | float | bool | None | dict[str, str]] = {}


CPU_IMAGE = "cpu"
"""The image recipes that run on laptops and CI name (``images.cpu``); any other image is a GPU image."""


class Model(Strict):
    family: Family
    hf_id: NonEmptyStr | None = None
    """The hub repository; its snapshot in the local Hugging Face cache holds the weights unless ``weights`` is
    set. None (and no ``weights``) → a tiny random model built locally (CPU stand-in of its family)."""
    hub: Literal["huggingface", "modelscope"] = "huggingface"
    """Where `nox -s prepare` downloads ``hf_id`` from (huggingface_hub or modelscope)."""
    weights: NonEmptyStr | None = None
    """A local directory to start from (absolute, or relative to the directory the trainer starts in): an HF
    checkpoint (config.json + safetensors) or a megatron-core directory of ``python -m trainer.convert
    hf-to-mcore``; its config must describe this model (``trainer.models.pretrained``)."""
    stands_in_for: NonEmptyStr | None = None
    trust_remote_code: bool = False
    """Run the Python its hub repository ships for its tokenizer (Moonlight's tiktoken tokenizer is such code;
    transformers refuses it otherwise). Only for a repository you trust."""
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
    ulysses: PositiveInt = 1
    """FSDP only: Ulysses sequence parallelism (the seed's ulysses_sequence_parallel_size): this many ranks
    share each packed micro-batch, split along the sequence, and exchange heads for sequence around attention."""

    @property
    def expert_tp(self) -> int:
        return self.etp if self.etp is not None else self.tp


# --------------------------------------------------------------------------- recipes


class Rollout(Strict):
    """The rollout engine and its settings (trainer/rollout/; vLLM's and SGLang's names in the docstrings)."""

    engine: Literal["vllm", "sglang", "torch"]
    tp: PositiveInt = 1
    """Tensor parallelism of one engine (vLLM tensor_parallel_size, SGLang tp_size)."""
    engines: PositiveInt | None = None
    """Engine replicas (``trainer.rollout.replicas``: prompts split among them, each on devices of its own); None →
    gpus / tp when colocated, else 1. Colocated, tp × engines must be the recipe's gpus. They start from the
    driver's process, so at most gpus_per_node / tp of them run (engines on other nodes are not built)."""
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.6
    """Share of each GPU the engine may take for itself (vLLM gpu_memory_utilization, SGLang mem_fraction_static,
    each translated so that memory the trainer holds when the engine starts is not counted: docs/rollout.md);
    colocated engines leave the rest to the trainer."""
    enforce_eager: bool = False
    """No CUDA graphs (vLLM enforce_eager, SGLang disable_cuda_graph): slower decoding, faster start, less memory."""
    max_model_len: PositiveInt | None = None
    """Longest prompt + response the engine serves (vLLM max_model_len, SGLang context_length); None → the
    recipe's grpo.max_prompt_len + grpo.max_response_len."""
    max_num_seqs: PositiveInt = 256
    """Sequences decoded at once (vLLM max_num_seqs, SGLang max_running_requests)."""
    colocate: bool = True
    """The engine shares the trainer's GPUs: it sleeps while the trainer trains (false: GPUs of its own)."""
    sleep_level: Literal[0, 1, 2] = 1
    """Colocated only. 1: weights offloaded to host memory and KV cache freed; 2: both freed (the next sync
    reloads every weight); 0: never sleep. (vLLM sleep(level); SGLang release_memory_occupation.)"""
    sync_bucket_mb: PositiveFloat = 512.0
    """Largest weight-sync bucket in MiB (the policy's HF-named tensors are sent in buckets of at most this);
    must hold the model's largest tensor."""


def _top_k(value: int) -> int:
    if value == 0 or value < -1:
        raise PydanticCustomError("top_k", "top_k must be -1 (off) or a positive number of tokens (vLLM's range)")
    return value


class Sampling(Strict):
    temperature: Annotated[float, Field(ge=0)] = 1.0
    """0 → greedy."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, AfterValidator(_top_k)] = -1
    """-1 → off; otherwise ≥ 1."""


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
    adam_betas: Annotated[tuple[Beta, Beta], Field(strict=False)] = (0.9, 0.95)
    """[β1, β2], each in [0, 1) (a YAML list; strict mode alone would accept only a Python tuple)."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    grad_clip: PositiveFloat = 1.0
    # The variant names below are the names registered in trainer/algo and trainer/reward (a test keeps
    # them equal), so a typo is reported when the matrix loads, listing the valid names.
    advantage: Literal["grpo", "grpo_unbiased"] = "grpo"
    """grpo: ChatLearn (population std, eps 1e-5); grpo_unbiased: verl (ddof 1, eps 1e-6)."""
    policy_loss: Literal["vanilla", "dual_clip"] = "vanilla"
    """vanilla: ChatLearn's PPO clip + constant `loss_cap`; dual_clip: verl's, bounded by `dual_clip_c`."""
    clip_low: Probability = 0.2
    clip_high: Annotated[float, Field(ge=0)] = 0.2
    loss_cap: PositiveFloat | None = LOSS_CAP
    """vanilla only: per-token loss cap (ChatLearn 3.0); null → none."""
    dual_clip_c: Annotated[float, Field(gt=1)] | None = None
    """Bound -A·c on the loss where A < 0; None → off for vanilla, 3.0 (verl) for dual_clip."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_coef: Annotated[float, Field(ge=0)] = 0.0
    """0 → KL is not in the loss (ChatLearn); it is logged only if `log_reference_kl` asks."""
    log_reference_kl: bool | None = None
    """Build the reference model and run its log-prob pass every episode. None → only when `kl_coef` > 0 (the
    loss needs it); true → also with `kl_coef` 0, to log `loss/kl` (a reference forward per episode and a
    second copy of the weights); false with `kl_coef` > 0 is refused."""
    entropy_coef: Annotated[float, Field(ge=0)] = 0.0
    loss_agg: Literal["token-mean", "seq-mean-token-mean"] = "token-mean"
    """token-mean: ChatLearn, over the global batch; seq-mean-token-mean: verl's option."""
    grader: Literal["hendrycks", "math-verify"] = "hendrycks"
    reward: FunctionRef | None = None
    """Your own reward instead of the grader: "pkg.module:fn", a function (response_text, ground_truth, extra) -> float
    imported with the working directory on the path and run in the grader's bounded worker
    (trainer.reward.function; a crash, timeout or non-finite value is a 0 reward, counted as `reward/failed`)."""
    tis_cap: PositiveFloat | None = None
    """Truncated importance sampling (Yao et al. 2025; verl's `tis_imp_ratio_cap`): each token's policy loss is
    multiplied by min(p_trainer_old / p_engine, tis_cap), detached, correcting for the engine sampling from
    slightly different weights or kernels than the trainer's. None → off (the default; the loss is unchanged).
    At least 1: a token on which the two agree (ratio 1) must keep its whole loss. Needs the engine's raw
    log-probs (`trainer.algo.mismatch`: vLLM's V0 engine gives processed ones, refused under filtered sampling)."""

    max_staleness: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    """Off-policy pipelining (trainer.pipeline): optimizer steps by which the weights that generated a trained batch
    may lag the trainer's. 0 → every episode generates, then trains (synchronous, on-policy). k ≥ 1 → the engine,
    in a process of its own, generates the next episode while the trainer trains on this one, one episode ahead:
    a batch is then `steps_per_episode` steps old, so k must be at least `steps_per_episode`."""

    @field_validator("max_staleness")
    @classmethod
    def _staleness_holds_one_episode(cls, value: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps_per_episode", 1)
        if 0 < value < steps:
            raise PydanticCustomError(
                "max_staleness_below_episode", "max_staleness {k} is below steps_per_episode {steps}: a batch "
                "generated one episode ahead is {steps} optimizer steps old; use 0 (synchronous) or at least {steps}",
                {"k": value, "steps": steps})
        return value

    @field_validator("sampling")
    @classmethod
    def _groups_need_sampling(cls, value: Sampling, info: ValidationInfo) -> Sampling:
        n = info.data.get("samples_per_prompt", 1)
        if value.temperature == 0 and n > 1:
            raise PydanticCustomError(
                "greedy_group", "temperature 0 (greedy) gives the {n} samples of a prompt one response: every "
                "advantage is 0 and nothing is learned (vLLM refuses n > 1 greedy outright); sample at a temperature "
                "above 0 (1.0 is GRPO's usual)", {"n": n})
        return value

    @field_validator("tis_cap")
    @classmethod
    def _tis_cap_keeps_agreeing_tokens(cls, value: float | None) -> float | None:
        if value is not None and value < 1:
            raise PydanticCustomError(
                "tis_cap_below_one", "tis_cap {cap} < 1 would scale down the loss of every token on which engine "
                "and trainer agree (ratio 1); use a cap ≥ 1 (2 is usual) or null for off", {"cap": value})
        return value

    @field_validator("log_reference_kl")
    @classmethod
    def _kl_in_loss_needs_reference(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        kl_coef = info.data.get("kl_coef")
        if value is False and kl_coef:
            raise PydanticCustomError(
                "reference_needed", "log_reference_kl false, but kl_coef {kl_coef} puts the KL in the loss, which "
                "needs the reference log-probs; set kl_coef 0 or drop log_reference_kl", {"kl_coef": kl_coef})
        return value

    @field_validator("loss_cap")
    @classmethod
    def _cap_needs_vanilla(cls, value: float | None, info: ValidationInfo) -> float | None:
        if info.data.get("policy_loss") == "dual_clip" and value not in (None, LOSS_CAP):
            raise PydanticCustomError("policy_loss_option", "loss_cap is an option of policy_loss vanilla; "
                                      "dual_clip bounds the loss with dual_clip_c instead")
        return value


class Data(Strict):
    source: Literal["demo", "math-lighteval", "parquet"]
    """parquet: any parquet file in verl's layout (trainer.data.verl_parquet)."""
    path: NonEmptyStr | None = None
    """The parquet file (math-lighteval: preprocessed; parquet: verl's layout); None for the embedded demo task."""

    @model_validator(mode="after")
    def _parquet_needs_path(self) -> Data:
        if self.source == "parquet" and self.path is None:
            raise PydanticCustomError("path_needed", "data.source parquet reads data.path; set it to your parquet file")
        return self


class Run(Strict):
    episodes: Annotated[int, Field(gt=0, le=1_000_000)]
    """Training episodes; a million is ~100× the longest published GRPO run, more is a typo."""
    seed: int = 1234
    checkpoint_every: NonNegativeInt = 0
    """Episodes between checkpoints; 0 → only at the end."""
    full_recompute: bool = False
    """Recompute each layer's activations in backward from its input (megatron ``recompute_granularity: full``)."""
    selective_recompute: bool = False
    """Recompute only core attention in backward (megatron ``selective``); ignored under ``full_recompute``."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where each rank trains: auto → its GPU when the process sees CUDA, else the CPU (``trainer.platform``); a GPU
    image's recipe takes auto as cuda (``ResolvedRecipe.device``)."""
    warm_start_steps: NonNegativeInt = 0
    """Supervised steps on the demo task's answer format before GRPO (the embedded demo's tiny model)."""
    samples_per_episode: Annotated[int, Field(ge=0, le=1024)] = 4
    """Prompts per episode (one sampled response each) written to the run's samples.jsonl with their response,
    ground truth, reward and the engine's log-probs; 0 → no file."""
    stall_timeout_s: PositiveFloat | None = None
    """A run in which no rank progresses (finishes an episode) for this long is stopped, the stuck rank named
    (trainer.heartbeat; a one-process run watches itself: a stopped one is paused, not ended). None: 300 s for a CPU recipe, 1800 s for a GPU recipe; set it above a GPU
    recipe's longest episode plus checkpoint."""
    launcher: Literal["local", "ray"] = "local"
    """What starts the ranks (trainer.parallel.launcher): local → torch's elastic agent on this host; ray → a Ray
    placement group over the nodes of a Ray cluster (RAY_ADDRESS / --ray-address, else a local one). `--launcher`
    overrides it."""
    max_restarts: Annotated[int, Field(ge=0, le=100)] = 0
    """A multi-process run whose rank fails (raises, is killed, its node lost) is relaunched from its latest
    checkpoint up to this many times, each restart logged with its cause; 0 → the first failure ends the run."""
    distributed_optimizer: bool = False
    """megatron-core: each data-parallel rank keeps the optimizer state (AdamW moments, bf16's fp32 main parameters)
    of its share of the parameters only and sends its updated parameters to the others (megatron's
    ``use_distributed_optimizer``; trainer.parallel.distributed_optimizer): the same weights, ~1/DP of the state.
    FSDP2 shards that state already."""


class FSDPOptions(Strict):
    """Settings of the FSDP2 trainer (trainer: fsdp); ignored by megatron."""

    max_token_in_packing: PositiveInt = 4096
    """Token budget of one packed micro-batch (the seed's max_token_in_packing): rows are packed into one
    sequence up to this many tokens, each with its own position ids, so packed rows never attend to each other."""
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    """Mixed precision: dtype of the gathered parameters in forward/backward (the sharded master stays fp32)."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """Dtype of the gradient reduce-scatter."""


class Recipe(Strict):
    description: NonEmptyStr
    model: NonEmptyStr
    image: NonEmptyStr
    trainer: Literal["megatron", "fsdp"]
    rollout: Rollout
    layout: NonEmptyStr
    gpus: Annotated[int, Field(gt=0, le=100_000)]
    """Devices the recipe runs on (processes, on CPU); the largest clusters have ~100k."""
    gpus_per_node: PositiveInt | None = None
    """Devices of one node; None → 8 for a GPU recipe, all of ``gpus`` (one host) for a CPU one. The recipe runs on
    ``nodes`` = gpus / gpus_per_node nodes; TP groups never cross a node (ranks are numbered node by node)."""
    experts_in_node: bool = False
    """Keep each ETP·EP expert group inside a node too (its all-to-all on the node's fast links)."""
    grpo: GRPO
    data: Data
    run: Run
    eval: Eval = Eval()
    fsdp: FSDPOptions = FSDPOptions()
    precision: Literal["fp32", "bf16"] | None = None
    """Training precision. bf16: bf16 parameters and activations with fp32 main parameters, gradients and
    optimizer state (megatron), or FSDP2's bf16 parameters with fp32 reduction; fp32: everything fp32.
    None → the model's dtype (seed models bf16, the tiny CPU models fp32)."""


# --------------------------------------------------------------------------- gates and benchmarks


GPU_NODE = 8  # GPUs of a node when a GPU recipe does not say


def node_size(recipe: Recipe) -> int:
    """Devices per node of ``recipe``: its ``gpus_per_node``, else 8 on GPUs and every process on one CPU host."""
    return recipe.gpus_per_node or (recipe.gpus if recipe.image == CPU_IMAGE else GPU_NODE)


class LayoutPatch(Strict):
    """Degrees that differ from the recipe's layout; unnamed degrees keep the recipe's value."""

    tp: PositiveInt | None = None
    pp: PositiveInt | None = None
    cp: PositiveInt | None = None
    ep: PositiveInt | None = None
    etp: PositiveInt | None = None
    dp: PositiveInt | None = None
    first_stage_layers: PositiveInt | None = None
    last_stage_layers: PositiveInt | None = None
    sequence_parallel: bool | None = None
    fsdp: bool | None = None
    ulysses: PositiveInt | None = None
    trainer: Literal["megatron", "fsdp"] | None = None
    """The recipe's trainer for this layout: a gate can compare the FSDP2 and megatron-core backends."""
    distributed_optimizer: bool | None = None
    """The recipe's ``run.distributed_optimizer`` for this layout: a gate can compare it with the plain optimizer."""
    gpus: PositiveInt | None = None

    def applied_to(self, recipe: Recipe, layout: Layout) -> tuple[Recipe, Layout]:
        """``recipe`` with this patch's GPU count, trainer and optimizer, and ``layout`` with its degrees (a ValueError when
        the degrees cannot go together)."""
        changes = self.model_dump(exclude_none=True)
        run = recipe.run.model_copy(update={"distributed_optimizer": changes.pop(
            "distributed_optimizer", recipe.run.distributed_optimizer)})
        recipe = recipe.model_copy(update={"gpus": changes.pop("gpus", recipe.gpus),
                                           "trainer": changes.pop("trainer", recipe.trainer), "run": run})
        return recipe, Layout.model_validate(layout.model_dump() | changes)


class Tolerances(Strict):
    """What a layout may change, in fp32 on CPU. Sharding changes only the order of float sums (matmuls split
    over TP, softmax sums split over vocab slices, attention over gathered K/V), so differences are a few
    float32 ulps of the quantity, amplified by the steps taken: the defaults sit ~10× above what the gates
    measure here and far below what a planted fault moves (0.05–1 and more: see README, gates)."""

    logprobs_max_abs: Annotated[float, Field(ge=0)] = 1e-4
    """Per-token log-probs (~|logp| ≤ 10): fp32 rounding of reordered sums is ~1e-6 per op."""
    loss_rel: Annotated[float, Field(ge=0)] = 1e-4
    """The GRPO loss is a global token mean of O(1) terms: relative, since it can be far from 1."""
    grad_norm_rel: Annotated[float, Field(ge=0)] = 1e-3
    """The grad norm sums squares over every shard in a different order; relative."""
    weights_max_abs: Annotated[float, Field(ge=0)] = 1e-4
    """After the steps: Adam normalises each update to ~lr (1e-3 in the tiny recipes); where a gradient element
    is near zero, a rounding-level change of it moves that update by a fraction of lr, so lr/10."""


class Gate(Strict):
    recipe: NonEmptyStr
    reference: LayoutPatch
    candidates: Annotated[list[LayoutPatch], Field(min_length=1)]
    compare: list[Literal["logprobs", "loss", "grad_norm", "weights"]] = ["logprobs", "loss", "grad_norm", "weights"]
    steps: PositiveInt = 2
    """Training steps replayed on the saved rollout (the second step sees the first step's update)."""
    tolerances: Tolerances = Tolerances()


OverrideValue = str | int | float | bool | None


class BenchRecipe(Strict):
    """A recipe run under other settings in a suite: `overrides` are the trainer's `key=value` overrides."""

    recipe: NonEmptyStr
    name: NonEmptyStr | None = None
    """How results and reports call it (unique in the suite); default: the recipe's name."""
    overrides: dict[NonEmptyStr, OverrideValue] = {}
    layouts: list[NonEmptyStr] | None = None
    """This entry's layouts instead of the suite's (a family that refuses one of them, say CP for Qwen3-Next)."""

    @property
    def label(self) -> str:
        return self.name or self.recipe


class Benchmark(Strict):
    """A suite: every recipe on every layout, `repeats` times, each run `episodes` long."""

    description: NonEmptyStr | None = None
    recipes: Annotated[list[NonEmptyStr | BenchRecipe], Field(min_length=1)]
    layouts: list[NonEmptyStr] = []
    """Layouts each recipe runs on (GPU count = the layout's minimum); empty → each recipe's own."""
    episodes: PositiveInt = 5
    warmup_episodes: NonNegativeInt = 1
    """Leading episodes left out of the steady window (start-up, first-call allocations)."""
    repeats: PositiveInt = 1
    overrides: dict[NonEmptyStr, OverrideValue] = {}
    """Trainer overrides applied to every run of the suite."""
    env: dict[NonEmptyStr, str] = {}
    """Environment variables set for every run of the suite (say OMP_NUM_THREADS: threads per process)."""

    def entries(self) -> list[BenchRecipe]:
        """Every entry of `recipes` as a BenchRecipe (a bare name is a recipe under its own name)."""
        return [BenchRecipe(recipe=item) if isinstance(item, str) else item for item in self.recipes]


# --------------------------------------------------------------------------- the file


class Matrix(Strict):
    images: dict[EntryName, Image]
    models: dict[EntryName, Model]
    layouts: dict[EntryName, Layout]
    recipes: dict[EntryName, Recipe]
    gates: dict[EntryName, Gate] = {}
    benchmarks: dict[EntryName, Benchmark] = {}
    prepared: NonEmptyStr = "prepared"
    """Where `nox -s prepare` puts each model's weights (``<prepared>/<model>/``, relative to the repository or
    absolute) and where `nox -s train` finds them; a recipe's data goes to its ``data.path``."""

    def resolve(self, recipe_name: str) -> ResolvedRecipe:
        """The recipe with its references replaced by the entries they name, plus derived sizes."""
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

    @property
    def precision(self) -> str:
        """The recipe's training precision, or the model's dtype when the recipe leaves it unset."""
        return self.recipe.precision or self.model.dtype

    @property
    def runs_on_gpus(self) -> bool:
        """Whether the recipe needs GPUs: every recipe of a GPU image; a cpu-image recipe runs on processes, whatever
        its engine (the torch engine, vLLM's CPU build)."""
        return self.recipe.image != CPU_IMAGE

    @property
    def device(self) -> str:
        """``run.device`` for this recipe: ``auto`` is ``cuda`` for a recipe that needs GPUs, so a rank that sees
        none (a Ray node without GPUs, CUDA_VISIBLE_DEVICES emptied) is refused in one line instead of training on
        its host; a cpu-image recipe takes a GPU where its process sees one (the smoke on a GPU machine)."""
        device = self.recipe.run.device
        return "cuda" if device == "auto" and self.runs_on_gpus else device

    @property
    def gpus_per_node(self) -> int:
        return node_size(self.recipe)

    @property
    def nodes(self) -> int:
        """Nodes the recipe runs on (whole nodes: the matrix check refuses a partial one)."""
        return -(-self.recipe.gpus // self.gpus_per_node)

    @property
    def recompute(self) -> str:
        """none | selective | full, from the recipe's run settings (full wins)."""
        run = self.recipe.run
        return "full" if run.full_recompute else "selective" if run.selective_recompute else "none"
