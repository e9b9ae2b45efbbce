"""BraTS metrics: nested tumour regions, Dice per region and mean, HD95.

Labels (BraTS 2021): 1 necrotic / non-enhancing core, 2 oedema, 4 enhancing tumour (ET);
BraTS 2023 and later use 3 for ET (``et_label=3``). Evaluated regions, in this order:

    TC (tumour core)   = 1 | ET
    WT (whole tumour)  = 1 | 2 | ET
    ET (enhancing)     = ET

Empty cases (per region), chosen to match the BraTS challenge's convention:

    truth  prediction   Dice   HD95
    empty  empty        1      0
    empty  non-empty    0      image diagonal in mm
    non-e. empty        0      image diagonal in mm

The image diagonal is ``sqrt(sum((n_i * spacing_i) ** 2))``: 373.13 mm for the BraTS grid
240 x 240 x 155 at 1 mm, the value the BraTS challenge assigns. It is an upper bound of any
distance inside the image, so a missed or hallucinated region scores worse than any
prediction that finds it, and the mean over regions and cases stays finite.

Inputs may be NumPy arrays or torch tensors (any device); results are Python floats.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from bsf.errors import ConfigError, DataError

__all__ = ["BRATS_REGIONS", "brats_regions", "dice_score", "brats_dice", "hd95", "brats_hd95"]

#: Region names in channel order.
BRATS_REGIONS = ("TC", "WT", "ET")

ArrayLike = Union[np.ndarray, torch.Tensor]


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _to_bool(x: ArrayLike, what: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.dtype == bool:
        return arr
    binary = arr != 0
    if not np.array_equal(arr, binary):  # cheaper than np.unique on a full volume
        bad = np.unique(arr[(arr != 0) & (arr != 1)])[:10].tolist()
        raise DataError(f"{what} must be binary (0/1 or bool), found values {bad}")
    return binary


def brats_regions(label_map: ArrayLike, et_label: int = 4) -> np.ndarray:
    """The three nested BraTS regions of a label map.

    Args:
        label_map: integer labels ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) with values in
            ``{0, 1, 2, et_label}``.
        et_label: label of the enhancing tumour: 4 (BraTS 2021) or 3 (2023 and later).

    Returns:
        ``(3, X, Y, Z)`` bool: TC = 1 | ET, WT = 1 | 2 | ET, ET.

    Raises:
        DataError: labels other than 0, 1, 2 and ``et_label`` (e.g. a 2023 map read with
            ``et_label=4``); the message names them.
        ConfigError: ``et_label`` is 0, 1 or 2.
    """
    if et_label in (0, 1, 2):
        raise ConfigError(f"et_label must differ from 0, 1 and 2, got {et_label!r}")
    labels = _to_numpy(label_map)
    if labels.ndim == 4 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.ndim != 3:
        raise DataError(f"a label map must be 3-D (X, Y, Z), got shape {labels.shape}")
    if labels.dtype.kind == "f":
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise DataError("the label map holds non-integer values")
        labels = labels.astype(np.int64)
    present = np.unique(labels)
    unexpected = [int(v) for v in present if v not in (0, 1, 2, et_label)]
    if unexpected:
        raise DataError(
            f"label map has labels {unexpected} outside {{0, 1, 2, {et_label}}}; "
            "BraTS 2021 marks enhancing tumour 4, BraTS 2023+ marks it 3 (pass et_label=3 for 2023+ maps)"
        )
    et = labels == et_label
    tc = (labels == 1) | et
    wt = tc | (labels == 2)
    return np.stack([tc, wt, et])


def dice_score(pred: ArrayLike, truth: ArrayLike) -> float:
    """Dice ``2 |P & T| / (|P| + |T|)`` of two binary masks; 1.0 when both are empty."""
    p, t = _to_bool(pred, "prediction"), _to_bool(truth, "truth")
    if p.shape != t.shape:
        raise DataError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def _check_regions(pred_regions: ArrayLike, true_regions: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = _to_bool(pred_regions, "pred_regions")
    t = _to_bool(true_regions, "true_regions")
    if p.shape != t.shape:
        raise DataError(f"pred_regions shape {p.shape} differs from true_regions shape {t.shape}")
    if p.ndim != 4 or p.shape[0] != len(BRATS_REGIONS):
        raise DataError(f"regions must have shape (3, X, Y, Z) in the order TC, WT, ET; got {p.shape}")
    return p, t


def _with_mean(values: Sequence[float]) -> dict[str, float]:
    out = {name: float(v) for name, v in zip(BRATS_REGIONS, values)}
    out["mean"] = float(np.mean(values))
    return out


def brats_dice(pred_regions: ArrayLike, true_regions: ArrayLike) -> dict[str, float]:
    """Dice per region and their mean for one case.

    Args:
        pred_regions: ``(3, X, Y, Z)`` binary prediction (TC, WT, ET), e.g. sigmoid > 0.5.
        true_regions: ``(3, X, Y, Z)`` binary truth, e.g. from :func:`brats_regions`.

    Returns:
        ``{"TC", "WT", "ET", "mean"}``; a region empty in both is 1.0, empty in one only 0.0.
    """
    p, t = _check_regions(pred_regions, true_regions)
    return _with_mean([dice_score(p[i], t[i]) for i in range(len(BRATS_REGIONS))])


def _diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))


def _spacing(spacing: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(s > 0 for s in spacing):
        raise ConfigError(f"spacing must be {ndim} positive numbers, got {spacing}")
    return spacing


def hd95(
    pred: ArrayLike,
    truth: ArrayLike,
    spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
) -> float:
    """95th-percentile symmetric Hausdorff distance (mm) between two binary masks.

    Computed by ``monai.metrics.compute_hausdorff_distance(percentile=95)``: the larger of the
    two directed 95th percentiles of the distances between the masks' surface voxels.
    Both empty: 0.0. One empty: the image diagonal in mm (see the module docstring).
    """
    p, t = _to_bool(pred, "prediction"), _to_bool(truth, "truth")
    if p.shape != t.shape:
        raise DataError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    sp = _spacing(spacing, p.ndim)
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 0.0
    if not p_any or not t_any:
        return _diagonal(p.shape, sp)
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about an argument its own code passes (always_return_as_numpy).
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        value = compute_hausdorff_distance(
            torch.from_numpy(p[None, None]),
            torch.from_numpy(t[None, None]),
            include_background=True,
            percentile=95,
            spacing=list(sp),
        )
    return float(value.reshape(-1)[0])


def brats_hd95(
    pred_regions: ArrayLike,
    true_regions: ArrayLike,
    spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, float]:
    """HD95 (mm) per region and their mean for one case; empty regions as in :func:`hd95`.

    Args:
        pred_regions: ``(3, X, Y, Z)`` binary prediction (TC, WT, ET).
        true_regions: ``(3, X, Y, Z)`` binary truth.
        spacing: voxel size in mm along X, Y, Z (or one number).

    Returns:
        ``{"TC", "WT", "ET", "mean"}``, all finite.
    """
    p, t = _check_regions(pred_regions, true_regions)
    return _with_mean([hd95(p[i], t[i], spacing) for i in range(len(BRATS_REGIONS))])
