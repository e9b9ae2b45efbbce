"""Synthetic lesion shapes on an output grid: glioma-like tumours (BraTS labels) and stroke blobs (ATLAS).

Shapes are noise-perturbed, randomly rotated ellipsoids evaluated only inside their bounding box.
Sizes have floors in voxels, so every label survives at coarse spacings (e.g. 3 or 4 mm).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from bsf.data.anatomy import Anatomy, Grid, smooth_field

# BraTS 2021 label values.
NECROTIC_CORE, EDEMA, ENHANCING = 1, 2, 4

# Rough centres (MNI mm, right hemisphere; x is mirrored for the left) of arterial territories:
# MCA cortex/white matter, PCA (occipital), ACA (medial frontal), deep lenticulostriate (basal ganglia).
TERRITORY_ANCHORS_MM = np.array([(38.0, -15.0, 20.0), (22.0, -72.0, 8.0), (8.0, 18.0, 42.0), (22.0, 2.0, 4.0)])

_ROUGHNESS = 0.2  # relative radial perturbation of the ellipsoids
_MAX_TRIES = 20


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def radial_distance(
    shape: tuple[int, int, int], spacing: float, centre_vox: np.ndarray, radii_mm: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Normalised radius of an irregular, randomly rotated ellipsoid at every voxel (float32, ``shape``).

    Inside the ellipsoid the value is < 1; nested shells are ``value < t`` for ``t < 1``. The radius is
    divided by ``1 + 0.2 * n`` with ``n`` a smooth random field (clipped to [-2, 2]), which makes the
    outline lobulated. Voxels outside the bounding box are ``inf``.
    """
    half = np.ceil(radii_mm.max() * (1 + 2 * _ROUGHNESS) / spacing) + 1
    box = tuple(slice(int(max(0, c - half)), int(min(n, c + half + 1))) for c, n in zip(centre_vox, shape))
    axes = np.ogrid[box]
    offsets = [(a - c).astype(np.float32) * np.float32(spacing) for a, c in zip(axes, centre_vox)]
    rotation = _random_rotation(rng)
    r2 = sum(
        (sum(np.float32(rotation[d, e]) * offsets[e] for e in range(3)) / np.float32(radii_mm[d])) ** 2
        for d in range(3)
    )
    box_shape = tuple(s.stop - s.start for s in box)
    wobble = np.clip(smooth_field(rng, box_shape, n_ctrl=4, rms=1.0), -2.0, 2.0)
    out = np.full(shape, np.inf, dtype=np.float32)
    out[box] = np.sqrt(r2) / (1.0 + _ROUGHNESS * wobble)
    return out


def _brain_depth(brain: np.ndarray, spacing: float) -> tuple[np.ndarray, int]:
    """Distance (mm) to the brain's edge on a grid strided to about 4 mm, and the stride used."""
    stride = max(1, round(4.0 / spacing))
    coarse = brain[::stride, ::stride, ::stride]
    return ndimage.distance_transform_edt(coarse, sampling=spacing * stride), stride


def _pick_centre(
    region: np.ndarray, brain: np.ndarray, spacing: float, depth_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """A random voxel of ``region`` at least ``depth_mm`` inside the brain (else the deepest one)."""
    depth, stride = _brain_depth(brain, spacing)
    ok = (depth >= depth_mm) & region[::stride, ::stride, ::stride]
    candidates = np.flatnonzero(ok) if ok.any() else np.array([np.argmax(depth)])
    return np.array(np.unravel_index(rng.choice(candidates), depth.shape), dtype=np.float64) * stride


def _draw_tumour(anatomy: Anatomy, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """One draw of nested shells: necrotic core, enhancing rim, then edema, clipped to the brain."""
    radii = np.maximum(rng.uniform(20.0, 36.0, size=3), 6.0 * spacing)
    margin = 1.5 * spacing / radii.min()  # thinnest shell, in units of the normalised radius
    t_enh = float(np.clip(rng.uniform(0.55, 0.75), 2 * margin, 1 - margin))
    t_core = float(np.clip(t_enh * rng.uniform(0.6, 0.8), margin, t_enh - margin))
    centre = _pick_centre(anatomy.wm > 0.5, anatomy.brain, spacing, t_enh * radii.max() + spacing, rng)
    r = radial_distance(anatomy.brain.shape, spacing, centre, radii, rng)
    labels = np.zeros(anatomy.brain.shape, dtype=np.uint8)
    labels[r < 1.0] = EDEMA
    labels[r < t_enh] = ENHANCING
    labels[r < t_core] = NECROTIC_CORE
    labels[~anatomy.brain] = 0
    return labels


def tumour_labels(anatomy: Anatomy, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """BraTS-style labels (uint8: 0, 1 core, 2 edema, 4 enhancing) of one tumour inside the brain.

    Redraws (deterministically, from ``rng``) until all three labels are present.
    """
    for _ in range(_MAX_TRIES):
        labels = _draw_tumour(anatomy, spacing, rng)
        if {NECROTIC_CORE, EDEMA, ENHANCING} <= set(np.unique(labels).tolist()):
            return labels
    raise RuntimeError(f"could not place a tumour with all labels at spacing {spacing} mm")


def _world_x(grid: Grid) -> np.ndarray:
    """World x coordinate (mm; + is right in RAS) of every voxel of ``grid``."""
    axes = np.ogrid[tuple(slice(0, n) for n in grid.shape)]
    x = sum(np.float32(grid.affine[0, e]) * axes[e].astype(np.float32) for e in range(3))
    return x + np.float32(grid.affine[0, 3])


def _draw_blob(allowed: np.ndarray, grid: Grid, anchor_mm: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One irregular blob near ``anchor_mm`` restricted to ``allowed`` (may come out empty)."""
    world = anchor_mm + rng.normal(0.0, 8.0, size=3)
    centre = (np.linalg.inv(grid.affine) @ np.append(world, 1.0))[:3]
    centre = np.clip(np.round(centre), 0, np.array(grid.shape) - 1)
    radii = np.maximum(rng.uniform(5.0, 18.0, size=3), 2.0 * grid.spacing)
    return (radial_distance(grid.shape, grid.spacing, centre, radii, rng) < 1.0) & allowed


def stroke_mask(anatomy: Anatomy, grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """A chronic-stroke lesion mask (uint8 0/1): one to three blobs in one arterial territory of one
    hemisphere, within grey + white matter."""
    side = rng.choice([-1.0, 1.0])
    anchor = TERRITORY_ANCHORS_MM[rng.integers(len(TERRITORY_ANCHORS_MM))] * np.array([side, 1.0, 1.0])
    allowed = (anatomy.gm + anatomy.wm > 0.5) & (_world_x(grid) * side > 0)
    lesion = np.zeros(grid.shape, dtype=bool)
    wanted, placed = int(rng.integers(1, 4)), 0
    for _ in range(_MAX_TRIES):
        if placed == wanted:
            break
        blob = _draw_blob(allowed, grid, anchor, rng)
        if blob.any():
            lesion |= blob
            placed += 1
    if not lesion.any():
        raise RuntimeError(f"could not place a stroke lesion at spacing {grid.spacing} mm")
    return lesion.astype(np.uint8)
