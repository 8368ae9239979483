"""Rendering: StrictUndefined, stage order and markers, slots, unpinned warnings (--strict), the bake file."""

from __future__ import annotations

import json

import jinja2
import pytest
from rich.console import Console

from images import render
from images.common import LOCKS_DIR, REPO_ROOT, UsageError
from matrix import load_matrix

ORDER = ["base", "environment", "locked-set", "source-builds", "overrides-last", "patches", "harness", "fingerprint",
         "labels"]


@pytest.fixture
def rendered(tmp_path):
    m = load_matrix()
    render.render(m, list(m.images), LOCKS_DIR, REPO_ROOT / "matrix.yaml",
                  console=Console(quiet=True), out_dir=tmp_path / "images")
    return tmp_path


def _markers(text: str) -> list[str]:
    return [line.split("templates/")[1].split(".j2")[0] for line in text.splitlines() if "=== BEGIN" in line]


def test_missing_value_fails_the_render():
    m = load_matrix()
    image = m.images["cpu"]
    ctx = render.context("cpu", image, render.read_lock("cpu", image, LOCKS_DIR), render.load_patches("cpu", image))
    del ctx["pip"]
    with pytest.raises(jinja2.UndefinedError, match="'pip' is undefined"):
        render.environment().get_template("Dockerfile.j2").render(ctx)


def test_install_order_survives_reinstalls(rendered):
    text = (rendered / "images" / "vllm-te27" / "Dockerfile").read_text()
    assert _markers(text) == [s for s in ORDER if s not in ("overrides-last", "patches")]
    assert text.index("PIP_CONSTRAINT") < text.index("pip uninstall -y transformer-engine") < text.index(
        "--require-hashes -r /ctx/lock.txt")
    assert text.index("--require-hashes -r /ctx/lock.txt") < text.index("TransformerEngine") < text.index(
        "COPY harness/")
    assert "Generated from matrix.yaml by `nox -s render -- vllm-te27`" in text


def test_source_builds_are_pinned_and_get_the_build_settings(rendered):
    text = (rendered / "images" / "vllm-te27" / "Dockerfile").read_text()
    for commit in ("fedd9ddc739a4f28b2ee705df5577d20d33400ec", "1a2c3e8c25251fa30ebee074c27ecbf69c2bad2b",
                   "e552ad997605dd883825106776eba230a6820345"):
        assert f"@{commit}\"" in text
    assert text.count("MAX_JOBS=8 NVCC_THREADS=4 NVTE_BUILD_THREADS_PER_JOB=1 TORCH_CUDA_ARCH_LIST=9.0 ") == 3
    te = text[text.index("# transformer-engine v2.7"):text.index("# apex")]
    assert 'CUDNN_PATH="$(python3 -c' in te and "/usr/local/cuda/include/" in te
    assert "flash-attn" in text[text.index("pip uninstall -y"):text.index("--require-hashes")]
    assert "--force-reinstall" not in text  # cuDNN is installed once, by the locked set


def test_skipped_stages_leave_markers(rendered):
    text = (rendered / "images" / "cpu" / "Dockerfile").read_text()
    assert _markers(text) == ["base", "locked-set", "harness", "fingerprint", "labels"]
    assert "# --- No source-builds stage: matrix.yaml images.cpu.source_builds is empty" in text
    vllm = (rendered / "images" / "vllm-te27" / "Dockerfile").read_text()
    assert "# --- No patches stage: matrix.yaml images.vllm-te27.patches is empty" in vllm
    sglang = (rendered / "images" / "sglang-te27" / "Dockerfile").read_text()
    assert ("/ctx/patching.py /ctx/patches/sglang-memory-pool.patch "
            "/ctx/patches/sglang-model-runner-memory-saver.patch") in sglang
    assert "CAUSAL_CONV1D_FORCE_BUILD=TRUE" in sglang


def test_labels_carry_the_lock_hash(rendered):
    summary = json.loads((LOCKS_DIR / "cpu.summary.json").read_text())
    text = (rendered / "images" / "cpu" / "Dockerfile").read_text()
    labels = text[text.index("\nLABEL "):]
    assert text.count("\nLABEL ") == 1  # one instruction, one layer commit
    assert f'io.grpo-stack.lock-hash="{summary["lock_hash"]}" \\\n' in labels
    for key in ("title", "version", "revision", "created", "source", "base.name", "base.digest"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_context_holds_lock_patches_and_harness(rendered):
    ctx = rendered / "images" / "sglang-te27" / "context"
    assert (ctx / "lock.txt").read_text() == (LOCKS_DIR / "sglang-te27.lock.txt").read_text()
    assert (ctx / "patches" / "sglang-memory-pool.patch").is_file()
    assert (ctx / "harness" / "matrix.yaml").is_file() and (ctx / "harness" / "pyproject.toml").is_file()


def test_bake_file_has_one_target_per_image(rendered):
    bake = json.loads((rendered / "docker-bake.json").read_text())
    assert bake["group"]["default"]["targets"] == ["vllm-te27", "sglang-te27", "cpu"]
    assert bake["target"]["cpu"]["dockerfile"] == "../Dockerfile"
    assert bake["variable"]["GENERATED_BY"]["default"] == "nox -s render"
    cpu = bake["target"]["cpu"]
    assert cpu["secret"] == ["id=pip.conf,src=${PIP_CONF}", "id=ca.pem,src=${CA_PEM}", "id=netrc,src=${NETRC}"]
    assert cpu["cache-to"] == ["type=local,dest=${CACHE_DIR}/cpu,mode=max"] and cpu["platforms"] == ["linux/amd64"]
    assert cpu["args"]["BASE"] == "debian:bookworm-slim" and cpu["contexts"] == {
        "debian:bookworm-slim": "docker-image://debian:bookworm-slim"}


UNPINNED_BASES = [
    "matrix.yaml images.vllm-te27.base: nvcr.io/nvidia/pytorch:24.12-py3 has no digest; pull it once and write "
    "`digest: sha256:...` there",
    "matrix.yaml images.sglang-te27.base: nvcr.io/nvidia/pytorch:24.12-py3 has no digest; pull it once and write "
    "`digest: sha256:...` there"]


def test_render_warns_about_an_unpinned_base_and_renders_every_image(cli):
    """A fresh clone: `nox -s render` exits 0 although the NGC base has no digest (it exited 2 before)."""
    code, out, err = cli("render")
    assert code == 0, err
    assert [line.removeprefix("warning: ") for line in out.splitlines() if line.startswith("warning: ")] == UNPINNED_BASES
    assert out.count("rendered ") == 3


def test_strict_render_refuses_the_unpinned_and_writes_nothing(tmp_path):
    m = load_matrix()
    with pytest.raises(UsageError) as refused:
        render.render(m, ["vllm-te27", "sglang-te27"], LOCKS_DIR, REPO_ROOT / "matrix.yaml", Console(quiet=True),
                      strict=True, out_dir=tmp_path / "images")
    assert str(refused.value).splitlines() == [*UNPINNED_BASES, "(render without --strict warns instead)"]
    assert not (tmp_path / "images").exists()


def test_build_refuses_the_unpinned_gpu_image(cli):
    code, out, err = cli("build", "vllm-te27", "--dry-run", "--backend", "buildah")
    assert code == 2 and out == ""
    assert err.splitlines() == [f"build: {UNPINNED_BASES[0]}", "build: (--allow-unpinned builds anyway, for development)"]


def test_a_moving_source_ref_is_refused_by_build(cli, matrix_copy):
    matrix_copy.replace("        commit: e552ad997605dd883825106776eba230a6820345\n", "")
    code, _, err = cli("build", "vllm-te27", "--dry-run", "--allow-unpinned", "--backend", "buildah")
    assert code == 0
    code, _, err = cli("build", "vllm-te27", "--dry-run", "--backend", "buildah")
    assert code == 2
    assert "matrix.yaml images.vllm-te27.source_builds.apex: built from the moving ref '25.01'; set `commit`" in err


def test_unknown_patch_lists_the_valid_ones(cli, matrix_copy):
    matrix_copy.replace("patches: [sglang-memory-pool, sglang-model-runner", "patches: [megatron-mla, sglang-model-runner")
    code, _, err = cli("render", "sglang-te27")
    assert code == 2
    assert "images.sglang-te27.patches: no patch file for megatron-mla" in err
    assert "(images/patches/*.patch): sglang-memory-pool, sglang-model-runner-memory-saver" in err


def test_stale_lock_is_refused(cli, matrix_copy):
    matrix_copy.replace("- pandas==3.1.1", "- pandas==3.1.0")
    code, _, err = cli("render", "cpu")
    assert code == 2 and "cpu.lock.txt: stale" in err


@pytest.mark.parametrize("image", ["vllm-te27", "sglang-te27", "cpu"])
def test_every_image_names_itself_and_writes_no_bytecode(rendered, image):
    text = (rendered / "images" / image / "Dockerfile").read_text()
    assert f"\nENV GRPO_STACK_IMAGE={image}\n" in text  # what trainer/preflight.py reads
    assert text.index("ARG PYTHONDONTWRITEBYTECODE=1") < text.index("\nRUN ")
    assert "/var/cache/ldconfig/aux-cache" in text or "apt-get" not in text
    assert text.index("COPY harness/") < text.index("cp /ctx/lock.txt /etc/grpo-stack/lock.txt") < text.index(
        "-m images.fingerprint record")


def test_lock_header_carries_constraints_with_their_reason():
    text = (LOCKS_DIR / "vllm-te27.lock.txt").read_text()
    assert "# constraints (bounds the resolver cannot see):\n#   pyarrow<26: pyarrow 26 raises ImportError" in text
    assert "\npyarrow==25.0.1 \\\n" in text and "\nnumpy==1.26.4 \\\n" in text
