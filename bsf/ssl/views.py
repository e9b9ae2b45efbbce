"""Two rotated, corrupted views of each crop for the SSL pretext tasks, drawn as the public code draws them.

The rules are those of MONAI research-contributions ``SwinUNETR/Pretrain/utils/ops.py`` (Tang et al. 2022;
BrainSegFounder's ``pretrain/utils/ops.py`` is the same code), per sample of shape (C, X, Y, Z):

- rotation ``x.rot90(k, (2, 3))``: in the plane of the last two spatial axes, k uniform in 0..3;
- one pass of noise boxes (:mod:`bsf.ssl.boxes`), each box fresh Gaussian noise over all channels, min-max
  scaled to exactly [0, 1] within the box; later boxes paint over earlier ones;
- for each sample i an index j uniform in 0..B-1; only if j != i, a second pass of boxes copies sample j's
  *current* view into sample i (j's corrupted view when j < i, its clean view when j > i, as the public loop
  runs in order). A paste happens with probability 1 - 1/B, never at B = 1.

All randomness comes from an explicit ``torch.Generator`` on the tensor's device (never the global RNG), so a
seed and a device give the same views every time. Boxes are drawn and painted for the whole batch at once; only
the paste resolution runs over the B samples in order (one ``torch.where`` each), as its dependencies demand.
Drawing a pass synchronises host and device once per chunk of candidate boxes (usually one or two chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from bsf.errors import ConfigError
from bsf.ssl.boxes import AxisRule, axis_rules, box_voxel_index, draw_boxes, last_painter

NUM_ROTATIONS = 4
MIN_BOX_FRACTION = 0.05  # smallest box side as a fraction of the crop side: the public code's ``tolr``
NOISE_RANGES = ("crop", "unit")


def rotate90(x: Tensor, k: Tensor) -> Tensor:
    """Rotate each sample by k*90 degrees in the plane of its last two spatial axes (the public code's plane).

    Sample i becomes ``torch.rot90(x[i], k[i], dims=(2, 3))`` (``x[i]`` is (C, X, Y, Z)).

    Args:
        x: (B, C, X, Y, Z) with Y == Z.
        k: (B,) integer; taken modulo 4.

    Returns:
        (B, C, X, Y, Z), a new tensor.
    """
    if x.ndim != 5 or x.shape[3] != x.shape[4]:
        raise ValueError(f"rotate90 needs (B, C, X, Y, Z) with Y == Z, got {tuple(x.shape)}")
    if k.shape != x.shape[:1]:
        raise ValueError(f"rotate90 needs one k per sample, got k of shape {tuple(k.shape)}")
    k = k.remainder(NUM_ROTATIONS)
    out = torch.empty_like(x)
    for turns in range(NUM_ROTATIONS):
        index = (k == turns).nonzero().squeeze(1)
        out.index_copy_(0, index, torch.rot90(x.index_select(0, index), turns, dims=(3, 4)))
    return out


@dataclass(frozen=True)
class CorruptionConfig:
    """The box rule of the public code, and where its noise lives.

    Attributes:
        max_box_fraction: box sides are drawn in [int(0.05 n), int(max_box_fraction n)) (the public ``max_block_sz``).
        max_drop_fraction: each pass adds boxes until their summed volume passes ``U(0, max_drop_fraction)``
            of the crop's voxels (the public ``max_drop``; overlaps count twice, so this is no bound on the union).
        noise_range: ``crop`` maps each box's [0, 1] noise affinely onto the crop's own [min, max] per channel,
            so noise spans the crop's range as it does in the public code, whose inputs lie in [0, 1];
            ``unit`` keeps the noise in [0, 1] literally, whatever the input's scale.
    """

    max_box_fraction: float = 0.25
    max_drop_fraction: float = 0.30
    noise_range: Literal["crop", "unit"] = "crop"

    def __post_init__(self) -> None:
        if not MIN_BOX_FRACTION < self.max_box_fraction <= 1.0:
            raise ConfigError(f"max_box_fraction must be in ({MIN_BOX_FRACTION}, 1], got {self.max_box_fraction}")
        if not 0.0 <= self.max_drop_fraction <= 1.0:
            raise ConfigError(f"max_drop_fraction must be in [0, 1], got {self.max_drop_fraction}")
        if self.noise_range not in NOISE_RANGES:
            raise ConfigError(f"noise_range must be one of {NOISE_RANGES}, got {self.noise_range!r}")

    def rules(self, spatial: tuple[int, ...]) -> list[AxisRule]:
        """The per-axis box ranges for crops of ``spatial`` = (X, Y, Z)."""
        return axis_rules(spatial, MIN_BOX_FRACTION, self.max_box_fraction)


@dataclass(frozen=True)
class Corruption:
    """A corrupted batch and where it changed.

    Attributes:
        image: (B, C, X, Y, Z) the corrupted views.
        noise: (B, 1, X, Y, Z) bool, voxels painted by a noise box (pasting may have covered some again).
        pasted: (B, 1, X, Y, Z) bool, voxels painted by a paste box; all False for samples that drew themselves.
    """

    image: Tensor
    noise: Tensor
    pasted: Tensor

    @property
    def changed(self) -> Tensor:
        """(B, 1, X, Y, Z) bool, voxels painted by any box."""
        return self.noise | self.pasted


def _box_noise(channels: int, index: Tensor, voxels: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Fresh Gaussian noise per box, min-max scaled to exactly [0, 1] over the box's channels and voxels.

    Args:
        channels: C.
        index: (B, K, S) from :func:`box_voxel_index`; cells equal to ``voxels`` lie outside the box.
        voxels: X*Y*Z, the spare slot.

    Returns:
        (B, K, C, S); a box whose noise is constant (one voxel, one channel) gets 0 (the public code: 0/0).
    """
    batch, slots, cells = index.shape
    noise = torch.randn((batch, slots, channels, cells), generator=generator, device=index.device, dtype=dtype)
    outside = (index == voxels).unsqueeze(2)
    low = noise.masked_fill(outside, math.inf).amin(dim=(2, 3), keepdim=True)
    high = noise.masked_fill(outside, -math.inf).amax(dim=(2, 3), keepdim=True)
    return (noise - low) / (high - low).clamp_min(torch.finfo(dtype).tiny)


def _paint_noise(x: Tensor, cfg: CorruptionConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One pass of noise boxes per sample, later boxes over earlier ones.

    Returns:
        (B, C, X, Y, Z) painted copy of ``x`` and the (B, 1, X, Y, Z) bool mask of painted voxels.
    """
    batch, channels, *spatial = x.shape
    rules = cfg.rules(tuple(spatial))
    voxels = math.prod(spatial)
    boxes = draw_boxes(batch, rules, cfg.max_drop_fraction, generator, x.device)
    index = box_voxel_index(boxes, rules)  # (B, K, S), spare slot = voxels
    noise = _box_noise(channels, index, voxels, generator, x.dtype)
    if cfg.noise_range == "crop":
        low = x.amin(dim=(2, 3, 4)).view(batch, 1, channels, 1)
        high = x.amax(dim=(2, 3, 4)).view(batch, 1, channels, 1)
        noise = low + noise * (high - low)
    painter = last_painter(index, voxels)  # (B, N)
    box = torch.arange(index.shape[1], device=x.device).view(1, -1, 1)
    shows = painter.gather(1, index.clamp(max=voxels - 1).flatten(1)).view(index.shape) == box
    target = torch.where(shows & (index < voxels), index, voxels)  # each voxel written by its last painter only
    out = torch.cat([x.flatten(2), x.new_zeros(batch, channels, 1)], dim=2)
    out.scatter_(2, target.flatten(1)[:, None, :].expand(-1, channels, -1), noise.transpose(1, 2).flatten(2))
    mask = (painter >= 0).view(batch, 1, *spatial)
    return out[..., :voxels].view_as(x), mask


def _paste_masks(x: Tensor, cfg: CorruptionConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each sample's paste source j (uniform in 0..B-1) and its paste boxes, empty where j == i.

    Returns:
        (B,) long source index and (B, 1, X, Y, Z) bool mask of pasted voxels.
    """
    batch, _, *spatial = x.shape
    rules = cfg.rules(tuple(spatial))
    source = torch.randint(0, batch, (batch,), generator=generator, device=x.device)
    boxes = draw_boxes(batch, rules, cfg.max_drop_fraction, generator, x.device)
    covered = last_painter(box_voxel_index(boxes, rules), math.prod(spatial)) >= 0
    covered &= (source != torch.arange(batch, device=x.device))[:, None]
    return source, covered.view(batch, 1, *spatial)


def corrupt(x: Tensor, generator: torch.Generator, cfg: CorruptionConfig = CorruptionConfig()) -> Corruption:
    """Noise boxes, then boxes pasted from another sample's current view, by the public code's rules.

    Args:
        x: (B, C, X, Y, Z) float.
        generator: source of all randomness, on ``x.device``.
        cfg: box rule and noise range.

    Returns:
        The corrupted views and the masks of the voxels each pass painted.
    """
    batch = x.shape[0]
    noised, noise_mask = _paint_noise(x, cfg, generator)
    source, paste_mask = _paste_masks(x, cfg, generator)
    views = torch.cat([x, noised])  # rows 0..B-1 clean, row B + i sample i's view so far
    for i in range(batch):  # in order: a source j < i is final by now, a source j > i still clean
        j = source[i : i + 1]
        current = views.index_select(0, j + batch * (j < i))[0]
        views[batch + i] = torch.where(paste_mask[i], current, noised[i])
    return Corruption(image=views[batch:], noise=noise_mask, pasted=paste_mask)


@dataclass
class SSLViews:
    """One SSL batch built from B crops.

    Attributes:
        inputs: (2B, C, X, Y, Z) corrupted rotated views, [view 1 of samples 0..B-1; view 2].
        targets: (2B, C, X, Y, Z) the same rotated views, uncorrupted.
        rotation_labels: (2B,) long, k in 0..3 of each view.
    """

    inputs: Tensor
    targets: Tensor
    rotation_labels: Tensor


def make_ssl_views(x: Tensor, generator: torch.Generator, cfg: CorruptionConfig = CorruptionConfig()) -> SSLViews:
    """Two views of each crop, each rotated by its own random k*90 degrees, then corrupted.

    Each view batch is corrupted on its own (as in the public code), so pasted content comes from
    another crop of the same view batch, never from the other view of the same crop.

    Args:
        x: (B, C, X, Y, Z) float crops with Y == Z.
        generator: source of all randomness, on ``x.device``.
        cfg: corruption settings.

    Returns:
        The views, targets and rotation labels, 2B of each.
    """
    batch = x.shape[0]
    labels = torch.randint(0, NUM_ROTATIONS, (2 * batch,), generator=generator, device=x.device)
    targets = rotate90(torch.cat([x, x]), labels)
    view1 = corrupt(targets[:batch], generator, cfg).image
    view2 = corrupt(targets[batch:], generator, cfg).image
    return SSLViews(inputs=torch.cat([view1, view2]), targets=targets, rotation_labels=labels)
