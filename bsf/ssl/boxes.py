"""Random axis-aligned boxes drawn by the public SSL code's rule, vectorised over samples and boxes.

One *pass* of boxes per sample (Tang et al. 2022, ``patch_rand_drop``): a target of
``U(0, max_drop) * X*Y*Z`` voxels is drawn; boxes are added until the sum of their volumes (overlaps
counted again) passes it. Per axis of size n a box's corner is uniform in ``[0, n - int(min_fraction n))``
and its side uniform in ``[int(min_fraction n), int(max_fraction n))``; a box sticking out of the volume is
clipped at the border (its clipped volume is what counts).

The number of boxes a pass needs is random, so candidates are drawn in chunks for the whole batch until
every sample's running volume has passed its target (one host-device synchronisation per chunk). A box is
accepted iff the volumes of the boxes before it sum to less than the target, exactly the loop's rule.

Boxes are painted through a padded local grid: every box owns a ``(Sx, Sy, Sz)`` block of flat voxel
indices (S = the largest side per axis), the entries outside its clipped extent or of rejected boxes
pointing at one spare slot. "Which accepted box painted voxel v last" is then a ``scatter_reduce`` with
``amax`` of box numbers, exact and order-independent on every device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bsf.errors import ConfigError


@dataclass(frozen=True)
class AxisRule:
    """The integer ranges of one axis (upper bounds exclusive, as ``numpy.random.randint``).

    Attributes:
        size: n, the crop's side.
        corner_high: corners are uniform in [0, corner_high).
        side_low, side_high: sides are uniform in [side_low, side_high).
    """

    size: int
    corner_high: int
    side_low: int
    side_high: int

    @classmethod
    def of(cls, size: int, min_fraction: float, max_fraction: float) -> AxisRule:
        """The rule for a side of ``size`` voxels; raises ConfigError when no box of volume > 0 can be drawn."""
        side_low, side_high = int(min_fraction * size), int(max_fraction * size)
        if side_high < max(side_low + 1, 2):
            raise ConfigError(
                f"ssl boxes: a crop side of {size} voxels is too small for box sides in "
                f"[int({min_fraction} * {size}), int({max_fraction} * {size})) = [{side_low}, {side_high}); "
                f"raise data.roi or ssl.max_box_fraction"
            )
        return cls(size=size, corner_high=size - side_low, side_low=side_low, side_high=side_high)

    @property
    def pad(self) -> int:
        """The largest side a box can have on this axis."""
        return self.side_high - 1

    def mean_clipped_side(self) -> float:
        """Expected side after clipping at the border (exact, by enumeration)."""
        total = sum(
            min(corner + side, self.size) - corner
            for corner in range(self.corner_high)
            for side in range(self.side_low, self.side_high)
        )
        return total / (self.corner_high * (self.side_high - self.side_low))


@dataclass(frozen=True)
class Boxes:
    """One pass of boxes per sample, K candidates each (accepted ones first).

    Attributes:
        start: (B, K, 3) long, first voxel per axis.
        stop: (B, K, 3) long, one past the last voxel per axis, already clipped at the border.
        accepted: (B, K) bool, a prefix per sample.
    """

    start: Tensor
    stop: Tensor
    accepted: Tensor


def axis_rules(spatial: Sequence[int], min_fraction: float, max_fraction: float) -> list[AxisRule]:
    """One :class:`AxisRule` per spatial axis of ``spatial`` = (X, Y, Z)."""
    if len(spatial) != 3:
        raise ValueError(f"ssl boxes need 3 spatial axes, got {tuple(spatial)}")
    return [AxisRule.of(int(n), min_fraction, max_fraction) for n in spatial]


def _draw_chunk(
    batch: int, rules: Sequence[AxisRule], slots: int, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``slots`` fresh boxes per sample: (B, slots, 3) start and clipped stop."""
    starts, stops = [], []
    for rule in rules:
        corner = torch.randint(0, rule.corner_high, (batch, slots), generator=generator, device=device)
        side = torch.randint(rule.side_low, rule.side_high, (batch, slots), generator=generator, device=device)
        starts.append(corner)
        stops.append(torch.clamp(corner + side, max=rule.size))
    return torch.stack(starts, dim=-1), torch.stack(stops, dim=-1)


def draw_boxes(
    batch: int, rules: Sequence[AxisRule], max_drop: float, generator: torch.Generator, device: torch.device
) -> Boxes:
    """One pass of boxes per sample, drawn by the public code's rule (see the module docstring).

    Args:
        batch: B.
        rules: one per spatial axis, from :func:`axis_rules`.
        max_drop: the target is ``U(0, max_drop) * X*Y*Z`` voxels per sample.
        generator: source of all randomness, on ``device``.
        device: where the boxes are drawn.

    Returns:
        The candidates, trimmed to the largest number of accepted boxes in the batch.
    """
    voxels = math.prod(rule.size for rule in rules)
    target = torch.rand(batch, generator=generator, device=device, dtype=torch.float64) * (max_drop * voxels)
    mean_volume = math.prod(rule.mean_clipped_side() for rule in rules)
    chunk = max(8, math.ceil(max_drop * voxels / mean_volume))  # enough, on average, for the largest target
    starts, stops = [], []
    reached = torch.zeros(batch, dtype=torch.float64, device=device)
    while True:
        start, stop = _draw_chunk(batch, rules, chunk, generator, device)
        starts.append(start)
        stops.append(stop)
        reached = reached + (stop - start).prod(dim=-1).sum(dim=-1)
        if not bool((reached < target).any()):
            break
    start, stop = torch.cat(starts, dim=1), torch.cat(stops, dim=1)
    volume = (stop - start).prod(dim=-1).to(torch.float64)
    before = volume.cumsum(dim=1) - volume  # volume of the boxes before each box
    accepted = before < target[:, None]
    used = int(accepted.sum(dim=1).max())
    return Boxes(start=start[:, :used], stop=stop[:, :used], accepted=accepted[:, :used])


def box_voxel_index(boxes: Boxes, rules: Sequence[AxisRule]) -> Tensor:
    """Flat voxel index of every cell of every box's padded local grid.

    Returns:
        (B, K, Sx*Sy*Sz) long in [0, X*Y*Z]; the value X*Y*Z (a spare slot) marks cells outside a
        box's clipped extent and all cells of rejected boxes.
    """
    flat, inside = None, boxes.accepted[..., None, None, None]
    for axis, rule in enumerate(rules):
        coord = boxes.start[..., axis, None] + torch.arange(rule.pad, device=boxes.start.device)  # (B, K, S_a)
        valid = coord < boxes.stop[..., axis, None]
        shape = [*coord.shape[:2], 1, 1, 1]
        shape[2 + axis] = rule.pad
        coord, valid = coord.view(shape), valid.view(shape)
        flat = coord if flat is None else flat * rule.size + coord
        inside = inside & valid
    voxels = math.prod(rule.size for rule in rules)
    return torch.where(inside, flat, voxels).flatten(2)


def last_painter(index: Tensor, voxels: int) -> Tensor:
    """Which box painted each voxel last (boxes are painted in order 0, 1, ...).

    Args:
        index: (B, K, S) from :func:`box_voxel_index`.
        voxels: X*Y*Z.

    Returns:
        (B, X*Y*Z) long, the largest box number covering the voxel, -1 where no box does.
    """
    batch, slots, cells = index.shape
    box = torch.arange(slots, device=index.device).view(1, slots, 1).expand(batch, slots, cells)
    painter = torch.full((batch, voxels + 1), -1, dtype=torch.long, device=index.device)
    painter.scatter_reduce_(1, index.flatten(1), box.flatten(1), reduce="amax", include_self=True)
    return painter[:, :voxels]
