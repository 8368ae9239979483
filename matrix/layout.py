"""One object for a layout's degrees: sizes, world size, rank coordinates and the arithmetic that checks them.

As torchtitan's ``ParallelDims``: every rule about degrees lives here, and refusals show the arithmetic.
The matrix (``matrix/rules.py``) asks this object whether a layout fits a model, a sequence length and a GPU
count; the entry point builds it once and sets up process groups from it. Pure Python: no torch import, so
the matrix stays light.

Rank order is megatron-core's default ``tp-cp-ep-dp-pp``: TP varies fastest, then CP, then DP, then PP
(EP/ETP are laid over the same ranks by megatron's expert grid).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from math import lcm
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the schema imports this module: the arithmetic reads its entries' fields only
    from matrix.schema import Layout, Shape

Finding = tuple[str, str]  # (layout key the problem is about, message)


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of one layout on ``world_size`` processes (GPUs; processes on CPU)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    world_size: int = 1
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    sequence_parallel: bool = False
    fsdp: bool = False
    ulysses: int = 1
    """FSDP only: ranks that share one packed micro-batch along the sequence (Ulysses)."""
    etp_declared: int = 1
    """ETP as written in the matrix (1 when left to default to TP): a dense model must not ask for it."""

    @classmethod
    def of(cls, layout: Layout, gpus: int) -> ParallelLayout:
        return cls(tp=layout.tp, pp=layout.pp, cp=layout.cp, ep=layout.ep, etp=layout.expert_tp, world_size=gpus,
                   first_stage_layers=layout.first_stage_layers, last_stage_layers=layout.last_stage_layers,
                   sequence_parallel=layout.sequence_parallel, fsdp=layout.fsdp,
                   ulysses=layout.ulysses, etp_declared=layout.etp or 1)

    # ------------------------------------------------------------------ sizes

    @property
    def dense_size(self) -> int:
        """Ranks one copy of the dense part of the model spans: TP·CP·PP."""
        return self.tp * self.cp * self.pp

    @property
    def expert_size(self) -> int:
        """Ranks one copy of the expert part spans: ETP·EP·PP."""
        return self.etp * self.ep * self.pp

    @property
    def min_world(self) -> int:
        """megatron-core needs world % (TP·CP·PP) == 0 and world % (ETP·EP·PP) == 0 (REFERENCE §5)."""
        return lcm(self.dense_size, self.expert_size)

    @property
    def dp(self) -> int:
        """Data-parallel ranks: world / (TP·CP·PP); with FSDP world / Ulysses (parameters shard over all ranks)."""
        return self.world_size // self.ulysses if self.fsdp else self.world_size // self.dense_size

    @property
    def degrees(self) -> tuple[int, int, int, int, int]:
        return (self.tp, self.pp, self.cp, self.ep, self.etp)

    def describe(self) -> str:
        """The degrees as a user writes them, e.g. ``tp=2 pp=1 cp=2 ep=1 etp=2`` or ``fsdp=8 ulysses=2``."""
        if self.fsdp:
            return f"fsdp={self.world_size} ulysses={self.ulysses}"
        return f"tp={self.tp} pp={self.pp} cp={self.cp} ep={self.ep} etp={self.etp}"

    def coords(self, rank: int) -> dict[str, int]:
        """(tp, cp, dp, pp) coordinates of a global rank in megatron's ``tp-cp-ep-dp-pp`` order."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")
        tp, rest = rank % self.tp, rank // self.tp
        cp, rest = rest % self.cp, rest // self.cp
        dp, pp = rest % self.dp, rest // self.dp
        return {"tp": tp, "cp": cp, "dp": dp, "pp": pp}

    def sequence_unit(self) -> int:
        """Sequence lengths must divide by this: 2·CP (load-balanced causal chunks), 2·TP·CP with SP."""
        return 2 * self.cp * (self.tp if self.sequence_parallel and self.tp > 1 else 1)

    def stage_layers(self, layers: int) -> list[int]:
        """Decoder layers per PP stage, with megatron's optional uneven first/last stage."""
        first, last = self.first_stage_layers, self.last_stage_layers
        middle = self.pp - (first is not None) - (last is not None)
        rest = layers - (first or 0) - (last or 0)
        each = rest // middle if middle else 0
        sizes = [each] * self.pp
        if first is not None:
            sizes[0] = first
        if last is not None:
            sizes[-1] = last
        return sizes

    # ------------------------------------------------------------------ checks

    def stage_problems(self, layers: int) -> Iterator[Finding]:
        first, last, pp = self.first_stage_layers, self.last_stage_layers, self.pp
        if pp == 1:
            if first or last:
                yield "first_stage_layers", "uneven stages need pp > 1"
            return
        rest, middle = layers - (first or 0) - (last or 0), pp - (first is not None) - (last is not None)
        shown = f"layers={layers} - first={first or 0} - last={last or 0} = {rest}"
        if rest < 0 or (middle == 0 and rest != 0):
            yield "pp", f"{pp} stages cannot hold {shown} layers"
        elif middle and rest % middle:
            yield "pp", (f"{shown} layers do not split over {middle} stage(s); pick first/last stage layers or pp "
                         f"so it divides")
        elif middle and rest // middle == 0:
            yield "pp", f"{shown} layers leave {middle} middle stage(s) empty; use fewer stages"

    def model_problems(self, shape: Shape, model_name: str) -> Iterator[Finding]:
        """Heads, query groups and linear-attention heads % TP; experts % EP; layers over PP stages."""
        heads = {"heads": shape.heads, "query_groups": shape.query_groups}
        if shape.mla is not None:
            heads.pop("query_groups")  # MLA has one query group per head
        if shape.linear_attention is not None:
            heads |= {"linear_attention.key_heads": shape.linear_attention.key_heads,
                      "linear_attention.value_heads": shape.linear_attention.value_heads}
        for what, n in heads.items():
            if n % self.tp:
                yield "tp", f"{self.tp} does not divide {what}={n} of model {model_name}"
        if shape.heads % self.ulysses:
            yield "ulysses", (f"{self.ulysses} does not divide heads={shape.heads} of model {model_name}: Ulysses "
                              f"gives each rank heads / ulysses heads")
        if shape.linear_attention is not None and self.cp > 1:
            yield "cp", (f"{self.cp}: model {model_name} has gated delta-net (linear attention) layers, which "
                         f"megatron-core 0.16.1 cannot split over context-parallel ranks (GatedDeltaNet has no "
                         f"CP); use cp: 1")
        if shape.moe is None:
            if self.ep > 1 or self.etp_declared > 1:
                yield "ep", (f"model {model_name} is dense: expert parallelism (ep={self.ep}, etp={self.etp}) "
                             f"needs MoE")
        else:
            if shape.moe.experts % self.ep:
                yield "ep", f"{self.ep} does not divide experts={shape.moe.experts} of model {model_name}"
            if self.tp > 1 and not self.sequence_parallel:
                # megatron-core refuses to train MoE with TP > 1 unless sequence parallelism is on
                yield "sequence_parallel", (f"model {model_name} is MoE and tp={self.tp}: megatron-core needs "
                                            f"sequence_parallel: true with both")
        for key, msg in self.stage_problems(shape.layers):
            yield key, f"{msg} (model {model_name})"

    def sequence_problem(self, prompt_len: int, response_len: int) -> str | None:
        seq, unit = prompt_len + response_len, self.sequence_unit()
        if unit > 1 and seq % unit:
            shown = "2·TP·CP" if unit != 2 * self.cp else "2·CP"
            return (f"sequence length {prompt_len}+{response_len}={seq} is not a multiple of {shown}={unit}; "
                    f"pick lengths whose sum divides by {unit}")
        return None

    def world_problem(self, declared_dp: int | None, name: str = "") -> str | None:
        """Why ``world_size`` processes cannot hold this layout (None: they can)."""
        arithmetic = (f"lcm(TP·CP·PP={self.dense_size}, ETP·EP·PP={self.expert_size}) = "
                      f"{lcm(self.dense_size, self.expert_size)}")
        if self.fsdp:
            if declared_dp is not None and self.world_size != declared_dp * self.ulysses:
                return (f"{self.world_size} does not match layout {name} (FSDP over dp={declared_dp} · "
                        f"ulysses={self.ulysses}); declare gpus: {declared_dp * self.ulysses}")
            if self.world_size % self.ulysses:
                return f"{self.world_size} is not a multiple of ulysses={self.ulysses}"
            return None
        if declared_dp is not None and self.world_size != self.dense_size * declared_dp:
            return (f"{self.world_size} does not match layout {name}: TP·CP·PP·DP={self.dense_size}·{declared_dp} = "
                    f"{self.dense_size * declared_dp}; declare gpus: {self.dense_size * declared_dp}")
        if self.world_size < self.min_world:
            return f"{self.world_size} is too few: {arithmetic}; declare gpus: {self.min_world}"
        if self.world_size % self.min_world:
            return f"{self.world_size} is not a multiple of {arithmetic}; use a multiple of {self.min_world}"
        return None

    def node_problem(self, gpus_per_node: int, experts_in_node: bool = False) -> tuple[str, str] | None:
        """(what, why) when ``gpus_per_node``-device nodes cannot hold this layout: the world is whole nodes, and
        ranks are numbered node by node, so a TP group (the innermost, consecutive ranks) stays inside a node when
        its size divides the node's; with ``experts_in_node`` the ETP·EP expert groups too. None: they can."""
        if self.world_size <= gpus_per_node:
            return None  # one node holds every rank
        if self.world_size % gpus_per_node:
            return "gpus_per_node", (f"{self.world_size} GPUs are not whole nodes of {gpus_per_node}; use a "
                                     f"multiple of {gpus_per_node} GPUs or another gpus_per_node")
        if gpus_per_node % self.tp:
            return "gpus_per_node", (f"tp={self.tp} would split tensor-parallel groups across nodes of "
                                     f"{gpus_per_node}; use a tp that divides {gpus_per_node}")
        if experts_in_node and gpus_per_node % (self.etp * self.ep):
            return "gpus_per_node", (f"ETP·EP={self.etp}·{self.ep}={self.etp * self.ep} would split expert groups "
                                     f"across nodes of {gpus_per_node} (experts_in_node: true); use degrees whose "
                                     f"product divides {gpus_per_node}")
        return None


def derived_sizes(layout: Layout, gpus: int) -> tuple[int, int]:
    """(minimum GPU count, data-parallel size) of a matrix layout on ``gpus`` devices."""
    dims = ParallelLayout.of(layout, gpus)
    if layout.fsdp:
        return (layout.dp or 1) * layout.ulysses, dims.dp
    minimum = dims.min_world if layout.dp is None else lcm(dims.min_world, dims.dense_size * layout.dp)
    return minimum, dims.dp
