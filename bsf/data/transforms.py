"""MONAI transforms from the run config's ``data.transforms`` section (:class:`bsf.config.TransformsConfig`).

The deterministic part is described once, by :func:`preprocessing_steps`, as ``(MONAI transform name,
keyword arguments)`` pairs. That one description is what the training pipeline instantiates
(:func:`build_steps`), what the persistent cache key hashes (:func:`steps_key`: a changed setting never
reuses a stale cache entry) and what a MONAI bundle writes into its ``inference.json``.
The random part, :func:`random_transforms`, cuts the training crops and (fine-tuning) augments them.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import monai.transforms
from monai.transforms import (
    Compose,
    NormalizeIntensityd,
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


def random_transforms(cfg: DataConfig, with_label: bool) -> Compose:
    """``data.crops_per_volume`` crops of ``data.roi`` per volume, as a list of dicts; with a label also the
    fine-tuning augmentation of image and label (``data.transforms.augment``).

    Every augmentation transform is present even at probability 0, so the random streams of the others do
    not depend on which are switched off.
    """
    keys = ["image", "label"] if with_label else ["image"]
    roi, crop = list(cfg.roi), cfg.transforms.crop
    if crop.mode == "pos_neg":
        first = RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=roi, pos=crop.pos, neg=crop.neg, num_samples=cfg.crops_per_volume, allow_smaller=False
        )
    else:
        first = RandSpatialCropSamplesd(keys=keys, roi_size=roi, num_samples=cfg.crops_per_volume, random_size=False)
    if not with_label:
        return Compose([first])
    a = cfg.transforms.augment
    rotate = a.rotate90_prob if a.rotate90_prob is not None else ROTATE90_DEFAULT.get(cfg.dataset, 0.0)
    return Compose(
        [
            first,
            *(RandFlipd(keys=keys, prob=p, spatial_axis=axis) for axis, p in enumerate(a.flip_prob)),
            RandRotate90d(keys=keys, prob=rotate, spatial_axes=(0, 1)),
            RandScaleIntensityd(keys="image", factors=a.scale_intensity_factor, prob=a.scale_intensity_prob),
            RandShiftIntensityd(keys="image", offsets=a.shift_intensity_offset, prob=a.shift_intensity_prob),
        ]
    )
