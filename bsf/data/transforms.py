"""MONAI transforms from the run config's ``data.transforms`` section (:class:`bsf.config.TransformsConfig`).

The deterministic part is described once, by :func:`preprocessing_steps`, as ``(MONAI transform name,
keyword arguments)`` pairs. That one description is what the training pipeline instantiates
(:func:`build_steps`), what the persistent cache key hashes (:func:`steps_key`: a changed setting never
reuses a stale cache entry) and what a MONAI bundle writes into its ``inference.json``.
The random part, :func:`random_transforms`, cuts the training crops and (fine-tuning) augments them.

A modality-aware model (``model.modalities``, the federation's union of modalities) takes more channels than a
site holds: :class:`ModelChannelsd` puts each held modality (``data.modalities``) into its model channel and leaves
the others empty (zeros, the mean of a z-scored channel), after the crop and augmentation, so an empty channel is
exactly zero in training as at prediction. :class:`RandModalityDropoutd` (``data.transforms.modality_dropout``)
then empties a random subset of the held modalities of a crop, so the model learns to work on any subset.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import monai.transforms
import torch
from monai.transforms import (
    Compose,
    NormalizeIntensityd,
    RandomizableTransform,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    ScaleIntensityRangePercentilesd,
    Transform,
)

from bsf.config import DataConfig
from bsf.data.index import MODALITIES
from bsf.errors import ConfigError

#: a MONAI dictionary transform by its name in ``monai.transforms``, with its keyword arguments (JSON-ready)
Step = tuple[str, dict[str, Any]]

#: the normalisation transforms: intensity only, nothing to invert after prediction
INTENSITY_ONLY = (NormalizeIntensityd, ScaleIntensityRangePercentilesd)

#: ``rotate90_prob: null`` resolves per data set: the paper rotates ATLAS crops only
ROTATE90_DEFAULT = {"atlas": 0.25}


def preprocessing_steps(cfg: DataConfig, keys: Sequence[str] = ("image",)) -> list[Step]:
    """The deterministic steps after loading, in order: orientation, spacing, foreground crop, normalisation, pad to ROI.

    ``keys``: ``["image"]`` or ``["image", "label"]``; spatial steps move both, normalisation only the image.
    """
    t, keys = cfg.transforms, list(keys)
    steps: list[Step] = []
    if t.orientation:
        steps.append(("Orientationd", {"keys": keys, "axcodes": t.orientation, "labels": [["L", "R"], ["P", "A"], ["I", "S"]]}))
    if t.spacing:
        steps.append(("Spacingd", {"keys": keys, "pixdim": list(t.spacing), "mode": ["bilinear", "nearest"][: len(keys)]}))
    if t.foreground_crop:
        # before normalising: the foreground test (> 0) needs the raw, brain-extracted intensities
        steps.append(("CropForegroundd", {"keys": keys, "source_key": "image", "margin": t.foreground_margin, "allow_smaller": True}))
    n = t.normalize
    if n.method == "zscore_nonzero":
        steps.append(("NormalizeIntensityd", {"keys": "image", "nonzero": True, "channel_wise": True}))
    elif n.method == "percentile":
        steps.append(
            (
                "ScaleIntensityRangePercentilesd",
                {"keys": "image", "lower": n.lower, "upper": n.upper, "b_min": n.b_min, "b_max": n.b_max, "clip": n.clip, "channel_wise": True},
            )
        )
    steps.append(("SpatialPadd", {"keys": keys, "spatial_size": list(cfg.roi)}))
    return steps


def build_steps(steps: Sequence[Step]) -> list[Transform]:
    """MONAI transform objects for ``steps``."""
    return [getattr(monai.transforms, name)(**kwargs) for name, kwargs in steps]


def steps_key(steps: Sequence[Step]) -> str:
    """A canonical text of ``steps`` (for cache keys): equal settings give equal text."""
    return json.dumps(steps, sort_keys=True, separators=(",", ":"))


def held_modalities(cfg: DataConfig) -> list[str]:
    """The modalities of a site's image files, in file order: ``data.modalities`` or the data set's full set."""
    return list(cfg.modalities) or MODALITIES[cfg.dataset]


class ModelChannelsd(Transform):
    """``image`` ``(len(held), *S)`` -> ``(len(channels), *S)``: each held modality in its model channel, the others zeros.

    Args:
        held: the modality of each input channel, in order (distinct names).
        channels: the model's input channels by modality name (``model.modalities``).

    Raises:
        ConfigError: a held modality that is not a model channel.
    """

    def __init__(self, held: Sequence[str], channels: Sequence[str]) -> None:
        foreign = [m for m in held if m not in channels]
        if foreign:
            raise ConfigError(f"data.modalities {list(held)}: {foreign} not among model.modalities {list(channels)}")
        self.held, self.channels = list(held), list(channels)
        self.index = [self.channels.index(m) for m in held]

    def missing(self) -> list[str]:
        """The model's channels this input leaves empty."""
        return [m for m in self.channels if m not in self.held]

    def expand(self, image: torch.Tensor) -> torch.Tensor:
        """``(len(held), *S)`` -> ``(len(channels), *S)`` (a new tensor, same dtype and device)."""
        if image.shape[0] != len(self.held):
            raise ValueError(f"image has {image.shape[0]} channel(s), expected {len(self.held)} ({', '.join(self.held)})")
        out = torch.zeros((len(self.channels), *image.shape[1:]), dtype=image.dtype, device=image.device)
        out[self.index] = image
        return out

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "image": self.expand(data["image"])}


class RandModalityDropoutd(RandomizableTransform):
    """With probability ``prob``, empty (zero) a random subset of the ``present`` channels of ``image`` ``(C, *S)``,
    keeping at least one: the kept set is uniform over the non-empty proper subsets of ``present``.

    Randomness comes only from the transform's own state (``set_random_state``; the training stream seeds it per
    sample), so a sample's hidden modalities are reproducible. Fewer than two present channels: nothing to hide.
    """

    def __init__(self, prob: float, present: Sequence[int]) -> None:
        RandomizableTransform.__init__(self, prob)
        self.present = list(present)
        self.hidden: list[int] = []

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        n = len(self.present)
        self.hidden = []
        if self._do_transform and n >= 2:
            kept = int(self.R.randint(1, 2**n - 1))  # bit i set: present[i] kept; never 0 (none) or 2**n - 1 (all)
            self.hidden = [c for i, c in enumerate(self.present) if not (kept >> i) & 1]

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        self.randomize()
        if not self.hidden:
            return data
        image = data["image"].clone()
        image[self.hidden] = 0
        return {**data, "image": image}


def model_channels(cfg: DataConfig, channels: Sequence[str]) -> ModelChannelsd | None:
    """The transform from this site's channels to the model's ``channels`` (``None`` when they are the same)."""
    held = held_modalities(cfg)
    if not channels or list(channels) == held:
        return None
    return ModelChannelsd(held, channels)


def modality_transforms(cfg: DataConfig, channels: Sequence[str] = ()) -> list[Transform]:
    """The training crops' last steps: to the model's ``channels`` (:func:`model_channels`), then modality dropout
    (``data.transforms.modality_dropout`` > 0) over the held modalities. Empty when neither applies."""
    layout = model_channels(cfg, channels)
    steps: list[Transform] = [layout] if layout is not None else []
    if cfg.transforms.modality_dropout > 0:
        present = layout.index if layout is not None else list(range(len(held_modalities(cfg))))
        steps.append(RandModalityDropoutd(cfg.transforms.modality_dropout, present))
    return steps


def random_transforms(cfg: DataConfig, with_label: bool, channels: Sequence[str] = ()) -> Compose:
    """``data.crops_per_volume`` crops of ``data.roi`` per volume, as a list of dicts; with a label also the
    fine-tuning augmentation of image and label (``data.transforms.augment``); then :func:`modality_transforms`
    towards the model's ``channels`` (by modality name; empty: the site's own channels).

    Every augmentation transform is present even at probability 0, so the random streams of the others do
    not depend on which are switched off; the modality steps come last, so switching them on leaves the
    crops and augmentation of every sample as they were.
    """
    keys = ["image", "label"] if with_label else ["image"]
    roi, crop = list(cfg.roi), cfg.transforms.crop
    if crop.mode == "pos_neg":
        first = RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=roi, pos=crop.pos, neg=crop.neg, num_samples=cfg.crops_per_volume, allow_smaller=False
        )
    else:
        first = RandSpatialCropSamplesd(keys=keys, roi_size=roi, num_samples=cfg.crops_per_volume, random_size=False)
    modality = modality_transforms(cfg, channels)
    if not with_label:
        return Compose([first, *modality])
    a = cfg.transforms.augment
    rotate = a.rotate90_prob if a.rotate90_prob is not None else ROTATE90_DEFAULT.get(cfg.dataset, 0.0)
    return Compose(
        [
            first,
            *(RandFlipd(keys=keys, prob=p, spatial_axis=axis) for axis, p in enumerate(a.flip_prob)),
            RandRotate90d(keys=keys, prob=rotate, spatial_axes=(0, 1)),
            RandScaleIntensityd(keys="image", factors=a.scale_intensity_factor, prob=a.scale_intensity_prob),
            RandShiftIntensityd(keys="image", offsets=a.shift_intensity_offset, prob=a.shift_intensity_prob),
            *modality,
        ]
    )
