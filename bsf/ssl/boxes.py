"""Random axis-aligned boxes per sample, accepted in order while their union fits a voxel budget.

Everything is vectorised over samples and boxes: a box is the outer product of three 1-D
interval masks, so "is voxel (d, h, w) covered by any of the boxes selected by a weight vector"
is a batched 0/1 matrix product ``(B, D*H, K) @ (B, K, W)``. The longest accepted prefix of
boxes is found by a bisection with a fixed number of steps (ceil(log2(K + 1))), each step one
such product for the whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BoxMasks:
    """Voxel masks of the accepted boxes.

    Attributes:
        changed: (B, 1, D, H, W) bool, union of all accepted boxes.
        pasted: (B, 1, D, H, W) bool, union of the accepted paste boxes (a subset of ``changed``).
    """

    changed: Tensor
    pasted: Tensor


def _axis_masks(
    batch: int,
    spatial: Sequence[int],
    slots: int,
    side_fractions: tuple[float, float],
    generator: torch.Generator,
    device: torch.device,
) -> list[Tensor]:
    """Draw ``slots`` boxes per sample, each fully inside the volume.

    Each side is an integer in [round(min_fraction * n), int(max_fraction * n)] (at least 1),
    its start uniform over the positions that keep the box inside.

    Returns:
        One bool tensor per spatial axis of size n: (B, K, n), True inside the box's interval.
    """
    min_fraction, max_fraction = side_fractions
    masks = []
    for n in spatial:
        low = max(1, round(min_fraction * n))
        high = max(low, int(max_fraction * n))
        u_side, u_start = torch.rand((2, batch, slots), generator=generator, device=device)
        side = (low + (u_side * (high - low + 1)).floor().long()).clamp(max=high)
        start = torch.minimum((u_start * (n - side + 1)).floor().long(), n - side)
        coord = torch.arange(n, device=device)
        masks.append((coord >= start[..., None]) & (coord < (start + side)[..., None]))
    return masks


def _coverage(plane: Tensor, row: Tensor, weights: Tensor) -> Tensor:
    """Voxels covered by at least one box with weight 1.

    Args:
        plane: (B, D*H, K) float 0/1, box k covers (d, h) in its first two axes.
        row: (B, K, W) float 0/1, box k covers w in its last axis.
        weights: (B, K) float 0/1, which boxes count.

    Returns:
        (B, D*H, W) bool. Counts are small integers, exact in any float matmul precision.
    """
    return torch.bmm(plane * weights[:, None, :], row) > 0.5


def sample_box_masks(
    batch: int,
    spatial: Sequence[int],
    is_paste: Sequence[bool],
    side_fractions: tuple[float, float],
    max_fraction: float,
    generator: torch.Generator,
    device: torch.device,
) -> BoxMasks:
    """Draw ``len(is_paste)`` candidate boxes per sample and keep the longest prefix that fits.

    Box k is accepted iff the union of boxes 0..k covers at most
    ``floor(max_fraction * D*H*W)`` voxels (the union only grows, so accepted boxes form a prefix).

    Args:
        batch: B.
        spatial: (D, H, W).
        is_paste: per candidate slot, whether it is a paste box (else a noise box).
        side_fractions: (min, max) box side as a fraction of each volume side.
        max_fraction: bound on the accepted union as a fraction of D*H*W.
        generator: source of all randomness, on ``device``.
        device: where the masks are built.

    Returns:
        The accepted boxes' masks, (B, 1, D, H, W) each.
    """
    depth, height, width = spatial
    slots = len(is_paste)
    axis_d, axis_h, axis_w = _axis_masks(batch, spatial, slots, side_fractions, generator, device)
    plane = (axis_d[..., :, None] & axis_h[..., None, :]).flatten(2).transpose(1, 2).float()
    row = axis_w.float()
    budget = int(max_fraction * depth * height * width)

    slot_index = torch.arange(slots, device=device)
    low = torch.zeros(batch, dtype=torch.long, device=device)  # a prefix of this length fits
    high = torch.full((batch,), slots + 1, dtype=torch.long, device=device)  # this one does not
    for _ in range(slots.bit_length()):
        mid = (low + high) // 2
        union = _coverage(plane, row, (slot_index < mid[:, None]).float()).sum(dim=(1, 2))
        fits = union <= budget
        low = torch.where(fits, mid, low)
        high = torch.where(fits, high, mid)

    accepted = slot_index < low[:, None]
    paste_slot = torch.tensor(list(is_paste), dtype=torch.bool, device=device)
    shape = (batch, 1, depth, height, width)
    return BoxMasks(
        changed=_coverage(plane, row, accepted.float()).view(shape),
        pasted=_coverage(plane, row, (accepted & paste_slot).float()).view(shape),
    )
