"""Rendering: StrictUndefined, stage order and markers, slots, --strict, the bake file."""

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
    render.render(m, list(m.images), LOCKS_DIR, REPO_ROOT / "matrix.yaml", strict=False,
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
    assert _markers(text) == ORDER
    assert text.index("PIP_CONSTRAINT") < text.index("--require-hashes -r /ctx/lock.txt")
    assert text.index("TransformerEngine") < text.index("--force-reinstall") < text.index("patching.py")
    assert text.index("patching.py") < text.index("COPY harness/")
    assert "Generated from matrix.yaml by `nox -s render -- vllm-te27`" in text


def test_skipped_stages_leave_markers(rendered):
    text = (rendered / "images" / "cpu" / "Dockerfile").read_text()
    assert _markers(text) == ["base", "locked-set", "harness", "fingerprint", "labels"]
    assert "# --- No source-builds stage: matrix.yaml images.cpu.source_builds is empty" in text
    sglang = (rendered / "images" / "sglang-te27" / "Dockerfile").read_text()
    assert "# --- No patches stage: slot(s) with no hunks, nothing to apply: sglang-memory-pool" in sglang
    assert "CAUSAL_CONV1D_FORCE_BUILD=TRUE" in sglang


def test_labels_carry_the_lock_hash(rendered):
    summary = json.loads((LOCKS_DIR / "cpu.summary.json").read_text())
    text = (rendered / "images" / "cpu" / "Dockerfile").read_text()
    assert f'LABEL io.grpo-stack.lock-hash="{summary["lock_hash"]}"' in text
    for key in ("title", "version", "revision", "created", "source"):
        assert f"LABEL org.opencontainers.image.{key}=" in text


def test_context_holds_lock_patches_and_overrides(rendered):
    ctx = rendered / "images" / "vllm-te27" / "context"
    assert (ctx / "lock.txt").read_text() == (LOCKS_DIR / "vllm-te27.lock.txt").read_text()
    last = (ctx / "reinstall-last.txt").read_text()
    assert "nvidia-cudnn-cu12==9.8.0.87 \\\n    --hash=sha256:" in last and "torch==" not in last
    assert (ctx / "patches" / "megatron-mla-down-proj.patch").is_file()
    assert (ctx / "harness" / "matrix.yaml").is_file() and (ctx / "harness" / "pyproject.toml").is_file()


def test_bake_file_has_one_target_per_image(rendered):
    bake = json.loads((rendered / "docker-bake.json").read_text())
    assert bake["group"]["default"]["targets"] == ["vllm-te27", "sglang-te27", "cpu"]
    assert bake["target"]["cpu"]["dockerfile"] == "../Dockerfile"
    assert bake["variable"]["GENERATED_BY"]["default"] == "nox -s render"


def test_strict_refuses_and_writes_nothing(tmp_path):
    m = load_matrix()
    with pytest.raises(UsageError, match="sglang-memory-pool.patch: a slot with no hunks"):
        render.render(m, ["sglang-te27"], LOCKS_DIR, REPO_ROOT / "matrix.yaml", strict=True,
                      console=Console(quiet=True), out_dir=tmp_path / "images")
    assert not (tmp_path / "images").exists()


def test_unknown_patch_lists_the_valid_ones(cli, matrix_copy):
    matrix_copy.replace("patches: [megatron-mla-down-proj]", "patches: [megatron-mla]")
    code, _, err = cli("render", "vllm-te27")
    assert code == 2
    assert "images.vllm-te27.patches: no patch file for megatron-mla" in err
    assert "megatron-mla-down-proj, sglang-memory-pool" in err


def test_stale_lock_is_refused(cli, matrix_copy):
    matrix_copy.replace("- pandas==3.1.1", "- pandas==3.1.0")
    code, _, err = cli("render", "cpu")
    assert code == 2 and "cpu.lock.txt: stale" in err


@pytest.mark.parametrize("image", ["vllm-te27", "sglang-te27", "cpu"])
def test_every_image_names_itself_and_writes_no_bytecode(rendered, image):
    text = (rendered / "images" / image / "Dockerfile").read_text()
    assert f"\nENV GRPO_STACK_IMAGE={image}\n" in text  # what trainer/preflight.py reads
    assert text.index("ARG PYTHONDONTWRITEBYTECODE=1") < text.index("RUN ")
    assert "/var/cache/ldconfig/aux-cache" in text or "apt-get" not in text
    assert text.index("COPY harness/") < text.index("COPY lock.txt /etc/grpo-stack/lock.txt") < text.index(
        "-m images.fingerprint record")


def test_lock_header_carries_constraints_with_their_reason():
    text = (LOCKS_DIR / "vllm-te27.lock.txt").read_text()
    assert "# constraints (bounds the resolver cannot see):\n#   pyarrow<26: pyarrow 26 raises ImportError" in text
    assert "\npyarrow==25.0.1 \\\n" in text and "\nnumpy==1.26.4 \\\n" in text
