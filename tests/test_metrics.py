"""Tests for bsf.metrics against independent computations and hand-built cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from bsf.errors import DataError
from bsf.metrics import (
    brats_dice,
    brats_hd95,
    brats_regions,
    dice_score,
    hd95,
    lesion_counts,
    lesion_metrics,
)

# --- BraTS regions and Dice -----------------------------------------------------------------


def test_brats_regions_2021_and_2023_labels():
    labels = np.array([0, 1, 2, 4]).reshape(1, 1, 4)
    tc, wt, et = brats_regions(labels)
    assert tc.ravel().tolist() == [False, True, False, True]
    assert wt.ravel().tolist() == [False, True, True, True]
    assert et.ravel().tolist() == [False, False, False, True]
    regions_2023 = brats_regions(torch.tensor([0, 1, 2, 3]).reshape(1, 1, 1, 4), et_label=3)
    assert np.array_equal(regions_2023, brats_regions(labels))
    with pytest.raises(DataError, match=r"\[3\].*et_label"):
        brats_regions(np.array([0, 1, 2, 3]).reshape(1, 1, 4))


def test_dice_matches_monai_dicemetric():
    rng = np.random.default_rng(0)
    for fill in (0.1, 0.5):
        pred = rng.random((3, 12, 12, 12)) < fill
        true = rng.random((3, 12, 12, 12)) < 0.3
        ours = brats_dice(pred, true)
        monai = DiceMetric(include_background=True, reduction="none")(
            torch.from_numpy(pred[None]).float(), torch.from_numpy(true[None]).float()
        )[0]
        for i, name in enumerate(("TC", "WT", "ET")):
            assert ours[name] == pytest.approx(monai[i].item(), abs=1e-6)
        assert ours["mean"] == pytest.approx(monai.mean().item(), abs=1e-6)


def test_dice_empty_cases():
    empty, full = np.zeros((4, 4, 4), bool), np.ones((4, 4, 4), bool)
    assert dice_score(empty, empty) == 1.0
    assert dice_score(full, empty) == 0.0 and dice_score(empty, full) == 0.0
    regions = np.stack([full, full, empty])
    assert brats_dice(regions, regions) == {"TC": 1.0, "WT": 1.0, "ET": 1.0, "mean": 1.0}
    assert brats_dice(regions, np.stack([full, full, full]))["ET"] == 0.0
    with pytest.raises(DataError, match="binary"):
        dice_score(np.full((2, 2, 2), 2), full[:2, :2, :2])


# --- HD95 -----------------------------------------------------------------------------------


def _cube(shape, start, side=10):
    mask = np.zeros(shape, bool)
    x, y, z = start
    mask[x : x + side, y : y + side, z : z + side] = True
    return mask


@pytest.mark.parametrize("k", [1, 3])
def test_hd95_of_a_cube_shifted_by_k_voxels_is_k(k):
    # Every surface voxel of the shifted cube lies within k of the other surface, and its whole
    # far face (100 of 488 surface voxels, > 5 %) lies exactly k away: both 95th percentiles are k.
    shape = (30, 30, 30)
    truth, pred = _cube(shape, (8, 8, 8)), _cube(shape, (8 + k, 8, 8))
    assert hd95(pred, truth) == pytest.approx(k, abs=1e-5)
    assert hd95(pred, truth, spacing=(2.0, 1.0, 1.0)) == pytest.approx(2 * k, abs=1e-5)
    assert hd95(pred, truth, spacing=(1.0, 3.0, 3.0)) == pytest.approx(k, abs=1e-5)
    assert hd95(truth, truth) == 0.0


def test_hd95_of_two_voxels_is_their_distance():
    a, b = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    a[1, 1, 1], b[4, 5, 1] = True, True
    assert hd95(a, b) == pytest.approx(5.0, abs=1e-5)


def test_hd95_empty_cases_use_the_image_diagonal():
    empty = np.zeros((240, 240, 155), bool)
    one = empty.copy()
    one[100, 100, 70] = True
    assert hd95(empty, empty) == 0.0
    assert hd95(one, empty) == pytest.approx(373.13, abs=0.01)  # the BraTS challenge's value
    assert hd95(empty, one, spacing=(2, 1, 1)) == pytest.approx(math.sqrt(480**2 + 240**2 + 155**2))
    shape = (20, 20, 20)
    cube, none = _cube(shape, (5, 5, 5)), np.zeros(shape, bool)
    result = brats_hd95(np.stack([cube, cube, none]), np.stack([cube, none, none]))
    assert result["TC"] == 0.0 and result["ET"] == 0.0
    assert result["WT"] == pytest.approx(math.sqrt(3) * 20)
    assert math.isfinite(result["mean"]) and result["mean"] == pytest.approx(result["WT"] / 3)


# --- ATLAS lesion metrics -------------------------------------------------------------------


def _blob(mask, x, y, z, side=3):
    mask[x : x + side, y : y + side, z : z + side] = True


def test_lesions_two_hits_one_miss_one_false_positive():
    truth, pred = np.zeros((30, 30, 30), bool), np.zeros((30, 30, 30), bool)
    for x in (2, 12, 22):  # three 27-voxel truth lesions
        _blob(truth, x, 2, 2)
    _blob(pred, 2, 2, 2)  # hits lesion 1 exactly (27 voxels)
    _blob(pred, 13, 3, 3, side=2)  # hits lesion 2 (8 voxels, all inside)
    _blob(pred, 12, 20, 20, side=4)  # a false lesion (64 voxels); lesion 3 is missed
    counts = lesion_counts(pred, truth)
    assert (counts.true_positives, counts.false_positives, counts.false_negatives) == (2, 1, 1)
    m = lesion_metrics(pred, truth)
    assert m["lesionwise_f1"] == pytest.approx(2 / 3)
    assert m["simple_lesion_count"] == 0
    assert m["volume_difference"] == abs(81 - (27 + 8 + 64)) == 18
    assert m["dice"] == pytest.approx(2 * (27 + 8) / (81 + 99))
    assert lesion_metrics(pred, truth, spacing=(1.0, 1.0, 2.5))["volume_difference"] == pytest.approx(45.0)


def test_lesions_use_26_connectivity_and_count_one_prediction_on_two_lesions_twice():
    truth, pred = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    truth[1, 1, 1] = truth[2, 2, 2] = True  # corner neighbours: one lesion with 26-connectivity
    assert lesion_counts(pred, truth).truth_lesions == 1
    assert lesion_counts(pred, truth, connectivity=6).truth_lesions == 2
    truth[:] = False
    truth[1, 1, 1] = truth[1, 1, 5] = True
    pred[1, 1, 1:6] = True  # one predicted lesion covering both truth lesions
    counts = lesion_counts(pred, truth)
    assert (counts.true_positives, counts.false_positives, counts.false_negatives) == (2, 0, 0)
    assert lesion_metrics(pred, truth)["simple_lesion_count"] == 1


def test_lesion_empty_cases():
    empty = np.zeros((6, 6, 6), bool)
    lesion = empty.copy()
    lesion[2:4, 2:4, 2:4] = True
    assert lesion_metrics(empty, empty) == {
        "dice": 1.0,
        "volume_difference": 0.0,
        "simple_lesion_count": 0,
        "lesionwise_f1": 1.0,
    }
    false_alarm = lesion_metrics(torch.from_numpy(lesion), torch.from_numpy(empty))
    assert false_alarm["dice"] == 0.0 and false_alarm["lesionwise_f1"] == 0.0
    assert false_alarm["volume_difference"] == 8.0 and false_alarm["simple_lesion_count"] == 1
    missed = lesion_metrics(empty, lesion)
    assert missed["dice"] == 0.0 and missed["lesionwise_f1"] == 0.0
    with pytest.raises(DataError, match="shape"):
        lesion_metrics(empty, lesion[:5])
