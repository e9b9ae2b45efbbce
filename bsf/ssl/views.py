"""Two rotated, corrupted views of each crop for the SSL pretext tasks (Tang et al. 2022).

All randomness comes from an explicit ``torch.Generator`` on the tensor's device, so the same
seed gives the same views on CPU and on CUDA alike; nothing loops over samples or boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bsf.errors import ConfigError
from bsf.ssl.boxes import sample_box_masks

NUM_ROTATIONS = 4
_MIN_BOX_FRACTION = 0.05  # smallest box side, as in Tang et al.'s ``tolr``


def rotate90(x: Tensor, k: Tensor) -> Tensor:
    """Rotate each sample by k*90 degrees in the two axes after the channel axis.

    Sample i becomes ``torch.rot90(x[i], k[i], dims=(1, 2))``.

    Args:
        x: (B, C, D, H, W) with D == H.
        k: (B,) integer; taken modulo 4.

    Returns:
        (B, C, D, H, W), a new tensor.
    """
    if x.ndim != 5 or x.shape[2] != x.shape[3]:
        raise ValueError(f"rotate90 needs (B, C, D, H, W) with D == H, got {tuple(x.shape)}")
    if k.shape != x.shape[:1]:
        raise ValueError(f"rotate90 needs one k per sample, got k of shape {tuple(k.shape)}")
    k = k.remainder(NUM_ROTATIONS)
    out = torch.empty_like(x)
    for turns in range(NUM_ROTATIONS):
        index = (k == turns).nonzero().squeeze(1)
        out.index_copy_(0, index, torch.rot90(x.index_select(0, index), turns, dims=(2, 3)))
    return out


@dataclass(frozen=True)
class CorruptionConfig:
    """How much of each view is corrupted.

    Attributes:
        max_box_fraction: max side of a box as a fraction of each crop side.
        max_corrupted_fraction: bound on the fraction of voxels changed per sample (noise + pasted).
        noise_boxes: candidate boxes filled with noise.
        paste_boxes: candidate boxes pasted from another sample (noise when the batch has one sample).

    Candidates alternate between the two kinds and are accepted in order while their union stays
    within the budget. With the defaults the candidates' volumes add up to about 30 % of a crop,
    the mean of Tang et al.'s random noise and paste targets (each uniform in [0, 30 %]).
    """

    max_box_fraction: float = 0.25
    max_corrupted_fraction: float = 0.30
    noise_boxes: int = 32
    paste_boxes: int = 32

    def __post_init__(self) -> None:
        if not _MIN_BOX_FRACTION <= self.max_box_fraction <= 1.0:
            raise ConfigError(
                f"max_box_fraction must be in [{_MIN_BOX_FRACTION}, 1], got {self.max_box_fraction}"
            )
        if not 0.0 <= self.max_corrupted_fraction <= 1.0:
            raise ConfigError(
                f"max_corrupted_fraction must be in [0, 1], got {self.max_corrupted_fraction}"
            )
        if self.noise_boxes < 0 or self.paste_boxes < 0:
            raise ConfigError(
                f"noise_boxes and paste_boxes must be >= 0, got {self.noise_boxes}, {self.paste_boxes}"
            )


def _interleave(noise: int, paste: int) -> list[bool]:
    """Slot kinds (True = paste) spread evenly, so a binding budget leaves both kinds present."""
    noise_slots = [((i + 0.5) / noise, False) for i in range(noise)]
    paste_slots = [((j + 0.5) / paste, True) for j in range(paste)]
    order = sorted(noise_slots + paste_slots)
    return [is_paste for _, is_paste in order]


def _scaled_noise(x: Tensor, generator: torch.Generator) -> Tensor:
    """Gaussian noise min-max normalised per sample onto that sample's intensity range.

    Args:
        x: (B, C, D, H, W) float.

    Returns:
        (B, C, D, H, W), every value of sample i inside [x[i].min(), x[i].max()].
    """
    dims = tuple(range(1, x.ndim))
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    noise_min, noise_max = noise.amin(dim=dims, keepdim=True), noise.amax(dim=dims, keepdim=True)
    unit = (noise - noise_min) / (noise_max - noise_min).clamp_min(torch.finfo(x.dtype).tiny)
    low, high = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    return (low + unit * (high - low)).clamp(min=low, max=high)


def corrupt(
    x: Tensor, generator: torch.Generator, cfg: CorruptionConfig = CorruptionConfig()
) -> tuple[Tensor, Tensor]:
    """Fill random boxes with noise, then paste boxes from another sample of the batch.

    The paste source of sample i is sample (i + s) mod B for one random s in 1..B-1; with B == 1
    paste boxes are noise boxes. At most ``cfg.max_corrupted_fraction`` of each sample's voxels
    change (boxes span all channels).

    Args:
        x: (B, C, D, H, W) float.
        generator: source of all randomness, on ``x.device``.
        cfg: box sizes, counts and budget.

    Returns:
        The corrupted (B, C, D, H, W) tensor and the (B, 1, D, H, W) bool mask of changed voxels.
    """
    batch = x.shape[0]
    paste = cfg.paste_boxes if batch > 1 else 0
    masks = sample_box_masks(
        batch,
        x.shape[2:],
        _interleave(cfg.noise_boxes + cfg.paste_boxes - paste, paste),
        (_MIN_BOX_FRACTION, cfg.max_box_fraction),
        cfg.max_corrupted_fraction,
        generator,
        x.device,
    )
    out = torch.where(masks.changed, _scaled_noise(x, generator), x)
    if paste:
        shift = torch.randint(1, batch, (1,), generator=generator, device=x.device)
        source = x.index_select(0, (torch.arange(batch, device=x.device) + shift) % batch)
        out = torch.where(masks.pasted, source, out)
    return out, masks.changed


@dataclass
class SSLViews:
    """One SSL batch built from B crops.

    Attributes:
        inputs: (2B, C, D, H, W) corrupted rotated views, [view 1 of samples 0..B-1; view 2].
        targets: (2B, C, D, H, W) the same rotated views, uncorrupted.
        rotation_labels: (2B,) long, k in 0..3 of each view.
    """

    inputs: Tensor
    targets: Tensor
    rotation_labels: Tensor


def make_ssl_views(
    x: Tensor, generator: torch.Generator, cfg: CorruptionConfig = CorruptionConfig()
) -> SSLViews:
    """Two views of each crop, each rotated by its own random k*90 degrees, then corrupted.

    Each view batch is corrupted on its own (as in Tang et al.), so pasted content comes from
    another crop, never from the other view of the same crop.

    Args:
        x: (B, C, D, H, W) float crops with D == H.
        generator: source of all randomness, on ``x.device``.
        cfg: corruption settings.

    Returns:
        The views, targets and rotation labels, 2B of each.
    """
    batch = x.shape[0]
    labels = torch.randint(0, NUM_ROTATIONS, (2 * batch,), generator=generator, device=x.device)
    targets = rotate90(torch.cat([x, x]), labels)
    view1, _ = corrupt(targets[:batch], generator, cfg)
    view2, _ = corrupt(targets[batch:], generator, cfg)
    return SSLViews(inputs=torch.cat([view1, view2]), targets=targets, rotation_labels=labels)
