"""Evaluation metrics (NumPy / PyTorch on CPU), independent of the training code.

* :mod:`bsf.metrics.brats`: BraTS regions (TC, WT, ET), Dice per region and mean, HD95.
* :mod:`bsf.metrics.lesions`: ATLAS challenge metrics from 3D connected components: Dice,
  volume difference, simple lesion count, lesion-wise F1.

Empty cases are defined in each function's docstring.
"""

from bsf.metrics.brats import (
    BRATS_REGIONS,
    brats_dice,
    brats_hd95,
    brats_regions,
    dice_score,
    hd95,
)
from bsf.metrics.lesions import LesionCounts, lesion_counts, lesion_metrics

__all__ = [
    "BRATS_REGIONS",
    "LesionCounts",
    "brats_dice",
    "brats_hd95",
    "brats_regions",
    "dice_score",
    "hd95",
    "lesion_counts",
    "lesion_metrics",
]
