"""Sequence packing: the real tokens of several right-padded rows laid end to end in one sequence.

Each packed row keeps its own position ids (0, 1, … from its first token), which is how transformers'
attention masks tell packed sequences apart (a position that does not follow its predecessor starts a new
sequence), so packed rows never attend to each other. Log-probs come back in the batch's own layout: position
t of row i scores token t+1 of row i, (B, T-1), as ``trainer.batching`` lays them out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def budget_groups(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive rows grouped so that each group's tokens fit ``budget`` (a longer row goes alone)."""
    groups: list[list[int]] = []
    used = budget + 1
    for row, n in enumerate(lengths):
        if used + n > budget:
            groups.append([])
            used = 0
        groups[-1].append(row)
        used += n
    return groups


@dataclass(frozen=True)
class Packed:
    """Rows of a micro-batch as one sequence of ``width`` tokens (a multiple of ``multiple``)."""

    input_ids: Tensor  # (1, width)
    position_ids: Tensor  # (1, width)
    labels: Tensor  # (1, width): the next token of the same row (0 where there is none)
    scored: Tensor  # (width,) bool: the position has a next token in its row
    target: Tensor  # (width,) flat index into (rows, T-1) of what a position scores (used where scored)
    rows: int
    columns: int  # T-1

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def part(self, rank: int, parts: int) -> Packed:
        """The ``rank``-th of ``parts`` equal slices along the sequence (Ulysses)."""
        size = self.width // parts
        cut = slice(rank * size, (rank + 1) * size)
        return Packed(self.input_ids[:, cut], self.position_ids[:, cut], self.labels[:, cut], self.scored[cut],
                      self.target[cut], self.rows, self.columns)

    def unpack(self, values: Tensor) -> Tensor:
        """Per-position values (1, width) → (rows, T-1), zero where this slice scores nothing. Differentiable."""
        flat = values.reshape(-1)[self.scored]
        out = flat.new_zeros(self.rows * self.columns)
        return out.index_put((self.target[self.scored],), flat).reshape(self.rows, self.columns)

    def owned(self) -> Tensor:
        """(rows, T-1) 1 where this slice scores the position."""
        return self.unpack(torch.ones(1, self.width, device=self.input_ids.device))


def pack_rows(input_ids: Tensor, lengths: list[int], *, multiple: int = 1, pad_id: int = 0) -> Packed:
    """Pack the real tokens of right-padded rows (B, T), ``lengths[i]`` of row i; padded to a multiple of
    ``multiple`` at the end. The lengths are the host's (the caller reads them once for all micro-batches)."""
    rows, width = input_ids.shape
    ids, positions, labels, scored, target = [], [], [], [], []
    for i, n in enumerate(lengths):
        steps = torch.arange(n, device=input_ids.device)  # on the ids' device, as everything packed
        ids.append(input_ids[i, :n])
        positions.append(steps)
        labels.append(torch.cat([input_ids[i, 1:n], input_ids.new_zeros(min(n, 1))]))  # an empty row: none
        scored.append(steps < n - 1)
        target.append(i * (width - 1) + steps)
    total = sum(lengths)
    pad = -total % multiple or (0 if total else multiple)
    if pad:  # a sequence of its own (positions restart at 0), scoring nothing
        ids.append(input_ids.new_full((pad,), pad_id))
        positions.append(torch.arange(pad, device=input_ids.device))
        labels.append(input_ids.new_zeros(pad))
        scored.append(input_ids.new_zeros(pad, dtype=torch.bool))
        target.append(input_ids.new_zeros(pad))
    return Packed(torch.cat(ids)[None], torch.cat(positions)[None], torch.cat(labels)[None], torch.cat(scored),
                  torch.cat(target), rows, width - 1)


def empty(multiple: int, columns: int, device: torch.device) -> Packed:
    """A micro-batch of padding only, on ``device``: ranks with fewer micro-batches run these, as FSDP's
    collectives need."""
    nothing = torch.zeros(1, columns + 1, dtype=torch.long, device=device)
    return pack_rows(nothing, [0], multiple=multiple)
