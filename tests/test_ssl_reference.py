"""The vectorised SSL views against a slow, direct transcription of the public code's rules.

The transcription below follows MONAI research-contributions ``SwinUNETR/Pretrain/utils/ops.py``
(``patch_rand_drop``, ``aug_rand``, ``rot_rand``) rule by rule, with plain loops and numpy's RandomState.
Both are drawn many times on the same inputs and their distributions compared.

Tolerances: two-sample Kolmogorov-Smirnov statistics must stay below the alpha = 1e-3 critical value
``1.949 * sqrt((n + m) / (n m))`` (conservative for the discrete statistics here); proportions must lie
within 4 binomial standard errors; label counts under the chi-square (3 dof) critical value 16.27
(alpha = 1e-3). The seeds are fixed, so the test is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bsf.ssl import CorruptionConfig, corrupt, make_ssl_views
from bsf.ssl.boxes import draw_boxes

BATCH = 3
SHAPE = (2, 32, 32, 32)  # (C, X, Y, Z) per sample
DRAWS = 300  # batches per implementation
MAX_DROP, MAX_BLOCK, TOLR = 0.3, 0.25, 0.05
UNIT = CorruptionConfig(noise_range="unit")  # the public code's literal [0, 1] noise


# ----------------------------------------------------------------------------------------------
# The public code's rules, transcribed
# ----------------------------------------------------------------------------------------------
def reference_pass(x: np.ndarray, rng: np.random.RandomState, sides: list, source: np.ndarray | None = None) -> int:
    """One ``patch_rand_drop`` on ``x`` (C, X, Y, Z) in place; appends each box's clipped sides to ``sides``; returns the number of boxes."""
    spatial = x.shape[1:]
    target = rng.uniform(0, MAX_DROP) * math.prod(spatial)
    low = [int(TOLR * n) for n in spatial]
    high = [int(MAX_BLOCK * n) for n in spatial]
    total = 0
    boxes = 0
    while total < target:
        start = [rng.randint(0, n - lo) for n, lo in zip(spatial, low)]
        stop = [min(rng.randint(lo, hi) + s, n) for s, lo, hi, n in zip(start, low, high, spatial)]
        region = (slice(None), *(slice(a, b) for a, b in zip(start, stop)))
        if source is None:
            noise = rng.standard_normal(x[region].shape)
            x[region] = (noise - noise.min()) / (noise.max() - noise.min())
        else:
            x[region] = source[region]
        total += math.prod(b - a for a, b in zip(start, stop))
        sides.append([b - a for a, b in zip(start, stop)])
        boxes += 1
    return boxes


def reference_corrupt(batch: np.ndarray, rng: np.random.RandomState, record: dict) -> np.ndarray:
    """``aug_rand``: per sample in order, noise boxes, then (if j != i) boxes from sample j's current view."""
    out = batch.copy()
    for i in range(len(out)):
        record["boxes_per_pass"].append(reference_pass(out[i], rng, record["sides"]))
        j = rng.randint(0, len(out))
        record["paste"].append(j != i)
        if j != i:
            reference_pass(out[i], rng, record["paste_sides"], source=out[j])
    return out


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_bound(n: int, m: int) -> float:
    """The alpha = 1e-3 critical value of the two-sample KS statistic."""
    return math.sqrt(-math.log(1e-3 / 2) / 2) * math.sqrt((n + m) / (n * m))


def assert_same_distribution(name: str, ours: np.ndarray, reference: np.ndarray) -> None:
    d, bound = ks_statistic(ours, reference), ks_bound(len(ours), len(reference))
    assert d < bound, (
        f"{name}: KS {d:.3f} >= {bound:.3f}; means ours {ours.mean():.4f}, reference {reference.mean():.4f}"
    )


def view_statistics(views: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample fractions of a corrupted batch of constant samples ``10 + i`` (noise is in [0, 1]).

    Returns:
        ``noise``, ``foreign`` (another sample's value) and ``changed`` fractions, each (B,), and the
        visible noise values (channel 0).
    """
    first = views[:, 0].reshape(len(views), -1)
    own = (10.0 + np.arange(len(views)))[:, None]
    noise = first <= 1.0
    return {
        "noise": noise.mean(axis=1),
        "foreign": ((first >= 10.0) & (first != own)).mean(axis=1),
        "changed": (first != own).mean(axis=1),
        "values": first[noise],
    }


def constant_batch() -> np.ndarray:
    """(B, C, X, Y, Z) float32, sample i constant 10 + i: each voxel's origin is readable from its value."""
    return np.broadcast_to((10.0 + np.arange(BATCH, dtype=np.float32)).reshape(-1, 1, 1, 1, 1), (BATCH, *SHAPE)).copy()


@pytest.fixture(scope="module")
def draws() -> dict:
    """DRAWS corrupted batches from each implementation, reduced to their statistics."""
    batch = constant_batch()
    rng = np.random.RandomState(0)
    generator = torch.Generator().manual_seed(0)
    record = {"boxes_per_pass": [], "sides": [], "paste_sides": [], "paste": []}
    stats = {"ours": [], "reference": []}
    ours_pasted = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tensors are small: one thread is several times faster on a busy CPU
    try:
        for _ in range(DRAWS):
            stats["reference"].append(view_statistics(reference_corrupt(batch, rng, record)))
            result = corrupt(torch.from_numpy(batch), generator, UNIT)
            stats["ours"].append(view_statistics(result.image.numpy()))
            ours_pasted.append(result.pasted.flatten(1).any(dim=1).numpy())
    finally:
        torch.set_num_threads(threads)
    merged = {
        who: {key: np.concatenate([s[key] for s in rows]) for key in rows[0]} for who, rows in stats.items()
    }
    merged["reference"]["paste"] = np.array(record["paste"])
    merged["ours"]["paste"] = np.concatenate(ours_pasted)
    merged["record"] = {key: np.array(value) for key, value in record.items()}
    return merged


# ----------------------------------------------------------------------------------------------
# The comparisons
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["noise", "foreign", "changed"])
def test_corrupted_fractions_match_the_reference(draws: dict, name: str) -> None:
    assert_same_distribution(f"{name} fraction", draws["ours"][name], draws["reference"][name])


@pytest.mark.parametrize("position", range(BATCH))
def test_noise_fraction_per_batch_position_matches(draws: dict, position: int) -> None:
    """Later samples paste from already corrupted sources: the position matters, in both."""
    ours, reference = (draws[who]["noise"].reshape(DRAWS, BATCH)[:, position] for who in ("ours", "reference"))
    assert_same_distribution(f"noise fraction at position {position}", ours, reference)


def test_paste_probability_is_one_minus_one_over_batch(draws: dict) -> None:
    expected = 1 - 1 / BATCH
    tolerance = 4 * math.sqrt(expected * (1 - expected) / (DRAWS * BATCH))
    for who in ("ours", "reference"):
        assert abs(draws[who]["paste"].mean() - expected) < tolerance, who
    # a paste leaves another sample's values behind (or that sample's noise): seen only in pasting samples
    assert ((draws["ours"]["foreign"] > 0) <= draws["ours"]["paste"]).all()


def test_noise_values_match_and_stay_in_unit_range(draws: dict) -> None:
    rng = np.random.default_rng(0)
    ours, reference = (rng.choice(draws[who]["values"], 4000, replace=False) for who in ("ours", "reference"))
    assert_same_distribution("noise values", ours, reference)
    for who in ("ours", "reference"):
        assert draws[who]["values"].min() >= 0.0 and draws[who]["values"].max() <= 1.0


def test_box_sides_and_boxes_per_pass_match(draws: dict) -> None:
    record = draws["record"]
    boxes = draw_boxes(len(record["boxes_per_pass"]), UNIT.rules(SHAPE[1:]), MAX_DROP, torch.Generator().manual_seed(1), torch.device("cpu"))
    sides = (boxes.stop - boxes.start)[boxes.accepted].numpy()
    reference_sides = np.concatenate([record["sides"], record["paste_sides"]])
    for axis in range(3):
        assert_same_distribution(f"clipped side, axis {axis}", sides[:, axis], reference_sides[:, axis])
    assert_same_distribution("boxes per pass", boxes.accepted.sum(dim=1).numpy(), record["boxes_per_pass"])


def test_rotation_is_in_the_last_two_spatial_axes_with_uniform_k() -> None:
    x = torch.randn(BATCH, 1, 8, 16, 16, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(3)
    labels = []
    for _ in range(60):
        views = make_ssl_views(x, generator)
        for i, k in enumerate(views.rotation_labels.tolist()):
            assert torch.equal(views.targets[i], x[i % BATCH].rot90(k, (2, 3)))  # rot_rand's plane
        labels += views.rotation_labels.tolist()
    counts = np.bincount(labels, minlength=4)
    expected = len(labels) / 4
    assert ((counts - expected) ** 2 / expected).sum() < 16.27, counts
