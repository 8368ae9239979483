"""Which matrix layouts a megatron-core conversion can be sharded for, and the world of ranks that runs it."""

from __future__ import annotations

from pathlib import Path

from matrix.schema import Layout, Model
from trainer.convert import ConvertError


def matrix_layout(name: str) -> Layout:
    """A matrix layout that megatron-core state can be sharded for (unknown and FSDP layouts refused)."""
    from matrix import load_matrix

    layouts = load_matrix().layouts
    if name not in layouts:
        raise ConvertError(f"--layout {name!r} is not a matrix layout ({', '.join(layouts)})")
    if layouts[name].fsdp:
        raise ConvertError(
            f"--layout {name} is an FSDP layout: FSDP runs load the HF checkpoint itself; "
            f"convert nothing (or use --layout single for a megatron-core run)"
        )
    return layouts[name]


def conversion_world(layout: Layout) -> tuple[Layout, int]:
    """The layout as a conversion runs it (CP 1) and its world: the fewest ranks megatron's dense and expert
    grids both fit, lcm(TP·PP, ETP·EP·PP)."""
    from matrix.layout import ParallelLayout

    layout = layout.model_copy(update={"cp": 1, "dp": None})
    return layout, ParallelLayout.of(layout, 1).min_world


def check_fits(layout: Layout, name: str, model: Model, world: int, where: Path) -> None:
    """The trainer's own checks of a layout against a model (heads % TP, experts % EP, layers over stages)."""
    from matrix.layout import ParallelLayout

    for key, message in ParallelLayout.of(layout, world).model_problems(model.shape, str(where)):
        raise ConvertError(f"--layout {name}: {key}: {message}")
