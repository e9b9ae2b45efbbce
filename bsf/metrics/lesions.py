"""ATLAS v2.0 challenge metrics for binary lesion masks, from 3D connected components.

Definitions (REFERENCE.md "Metrics", as in the ATLAS R2.0 / ISLES evaluation code):

* Dice ``2 |P & T| / (|P| + |T|)``.
* Volume difference ``| |T| - |P| |`` in mm^3 (voxel counts times the voxel volume
  ``prod(spacing)``; equal to voxels at 1 mm isotropic).
* Lesions are the connected components of a mask under full 26-connectivity (voxels sharing a
  face, an edge or a corner belong to the same lesion; ``connectivity=6`` or ``18`` on request).
* Simple lesion count ``| #lesions(T) - #lesions(P) |``.
* Lesion-wise F1 ``2 TP / (2 TP + FP + FN)`` where a truth lesion overlapping the prediction by
  at least one voxel is a TP, a truth lesion with no overlap an FN, and a predicted lesion
  overlapping no truth voxel an FP. (A predicted lesion touching two truth lesions makes two
  TPs; two predicted lesions on one truth lesion make one TP and no FP.)

Empty cases:

    truth  prediction   Dice   lesion-wise F1   volume difference / lesion count
    empty  empty        1      1                0 / 0
    empty  non-empty    0      0 (all FP)       as defined
    non-e. empty        0      0 (all FN)       as defined

Inputs may be NumPy arrays or torch tensors; results are Python floats / ints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bsf.errors import ConfigError, DataError
from bsf.metrics.brats import ArrayLike, _spacing, _to_bool, dice_score

__all__ = ["CONNECTIVITY", "LesionCounts", "lesion_counts", "lesion_metrics"]

#: Default lesion connectivity (3D, face + edge + corner neighbours), as in the ATLAS evaluation.
CONNECTIVITY = 26
_RANK = {6: 1, 18: 2, 26: 3}


@dataclass(frozen=True)
class LesionCounts:
    """Lesion detection counts of one case.

    Attributes:
        true_positives: truth lesions overlapping the prediction by at least one voxel.
        false_negatives: truth lesions with no predicted voxel.
        false_positives: predicted lesions with no truth voxel.
        truth_lesions: connected components of the truth.
        pred_lesions: connected components of the prediction.
    """

    true_positives: int
    false_negatives: int
    false_positives: int
    truth_lesions: int
    pred_lesions: int

    @property
    def f1(self) -> float:
        """``2 TP / (2 TP + FP + FN)``; 1.0 when truth and prediction have no lesion."""
        denom = 2 * self.true_positives + self.false_positives + self.false_negatives
        return 1.0 if denom == 0 else 2.0 * self.true_positives / denom


def _label(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    structure = ndimage.generate_binary_structure(3, _RANK[connectivity])
    labels, n = ndimage.label(mask, structure=structure)
    return labels, int(n)


def _masks(pred: ArrayLike, truth: ArrayLike, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    if connectivity not in _RANK:
        raise ConfigError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
    p, t = _to_bool(pred, "prediction"), _to_bool(truth, "truth")
    if p.shape != t.shape:
        raise DataError(f"prediction shape {p.shape} differs from truth shape {t.shape}")
    if p.ndim == 4 and p.shape[0] == 1:
        p, t = p[0], t[0]
    if p.ndim != 3:
        raise DataError(f"lesion masks must be 3-D (X, Y, Z), got shape {p.shape}")
    return p, t


def lesion_counts(pred: ArrayLike, truth: ArrayLike, *, connectivity: int = CONNECTIVITY) -> LesionCounts:
    """TP / FN / FP lesion counts of a binary prediction against a binary truth (see module docstring).

    Args:
        pred: ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) binary prediction.
        truth: binary truth of the same shape.
        connectivity: 26 (default), 18 or 6.
    """
    p, t = _masks(pred, truth, connectivity)
    truth_labels, n_truth = _label(t, connectivity)
    pred_labels, n_pred = _label(p, connectivity)
    hit_truth = np.unique(truth_labels[p & t])  # truth lesions with >= 1 predicted voxel
    tp = int(np.count_nonzero(hit_truth))
    pred_on_truth = np.unique(pred_labels[p & t])  # predicted lesions with >= 1 truth voxel
    fp = n_pred - int(np.count_nonzero(pred_on_truth))
    return LesionCounts(
        true_positives=tp,
        false_negatives=n_truth - tp,
        false_positives=fp,
        truth_lesions=n_truth,
        pred_lesions=n_pred,
    )


def lesion_metrics(
    pred: ArrayLike,
    truth: ArrayLike,
    spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
    *,
    connectivity: int = CONNECTIVITY,
) -> dict[str, float]:
    """The four ATLAS metrics of one case.

    Args:
        pred: ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) binary prediction.
        truth: binary truth of the same shape.
        spacing: voxel size in mm (three numbers or one); scales the volume difference only.
        connectivity: lesion connectivity, 26 (default, as the challenge), 18 or 6.

    Returns:
        ``{"dice", "volume_difference" (mm^3), "simple_lesion_count", "lesionwise_f1"}``;
        empty cases as in the module docstring.
    """
    p, t = _masks(pred, truth, connectivity)
    voxel_volume = math.prod(_spacing(spacing, 3))
    counts = lesion_counts(p, t, connectivity=connectivity)
    return {
        "dice": dice_score(p, t),
        "volume_difference": abs(int(t.sum()) - int(p.sum())) * voxel_volume,
        "simple_lesion_count": abs(counts.truth_lesions - counts.pred_lesions),
        "lesionwise_f1": counts.f1,
    }
