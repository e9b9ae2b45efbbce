"""Template anatomy for synthetic MRI: the MNI152 tissue maps, output grids, smooth random fields.

Everything is sampled directly onto the output grid: one ``map_coordinates`` pass per tissue map
through a (scaled, smoothly deformed) voxel-to-template mapping, so a coarse grid is cheap.
Random fields are built from a handful of random control values and interpolated with separable
Gaussian weights (three small matrix products), never by filtering a full-size volume.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` (3 ints) and ``affine`` (4 x 4, voxel index -> world mm, axis-aligned)."""

    shape: Shape3
    affine: np.ndarray

    def scaled(self, spacing: float) -> Grid:
        """The grid covering the same field of view with isotropic voxels of ``spacing`` mm.

        Assumes ``self`` has 1 mm voxels. Shape is ``round(n / spacing)`` per axis; the outer corner
        of voxel 0 stays where it was, so the field of view starts at the same world position.
        """
        shape = tuple(max(1, round(n / spacing)) for n in self.shape)
        affine = self.affine.copy()
        affine[:3, :3] = self.affine[:3, :3] * spacing
        affine[:3, 3] = self.affine[:3, 3] + self.affine[:3, :3] @ np.full(3, (spacing - 1.0) / 2.0)
        return Grid(shape=shape, affine=affine)  # type: ignore[arg-type]

    @property
    def spacing(self) -> float:
        """Voxel size in mm (the grids used here are isotropic)."""
        return float(np.linalg.norm(self.affine[:3, 0]))


@dataclass(frozen=True)
class Template:
    """The MNI152 2009a template at 1 mm: tissue probability maps (float32) and the brain mask."""

    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    grid: Grid

    @functools.cached_property
    def brain_centre_mm(self) -> np.ndarray:
        """World coordinates (mm) of the centre of the brain mask's bounding box."""
        idx = np.nonzero(self.mask > 0.5)
        centre_vox = np.array([(i.min() + i.max()) / 2.0 for i in idx] + [1.0])
        return (self.grid.affine @ centre_vox)[:3]


@dataclass(frozen=True)
class Anatomy:
    """One subject's anatomy on the output grid: tissue fractions (0 outside the brain) and the brain mask."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Load nilearn's bundled MNI152 2009a GM/WM maps and brain mask (197 x 233 x 189, 1 mm; offline)."""
    from nilearn import datasets

    def c_order(img: nib.Nifti1Image) -> np.ndarray:  # C order makes map_coordinates about 2x faster
        return np.ascontiguousarray(img.get_fdata(dtype=np.float32))

    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    return Template(
        gm=c_order(datasets.load_mni152_gm_template(resolution=1)),
        wm=c_order(datasets.load_mni152_wm_template(resolution=1)),
        mask=c_order(mask_img),
        grid=Grid(shape=mask_img.shape, affine=mask_img.affine.copy()),
    )


def _axis_weights(n_out: int, n_ctrl: int) -> np.ndarray:
    """Row-normalised Gaussian interpolation weights (n_out x n_ctrl) from evenly spaced control points."""
    t = np.linspace(0.0, 1.0, n_out)[:, None]
    c = np.linspace(0.0, 1.0, n_ctrl)[None, :]
    w = np.exp(-0.5 * ((t - c) * (n_ctrl - 1)) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_field(rng: np.random.Generator, shape: Shape3, n_ctrl: int, rms: float) -> np.ndarray:
    """A smooth zero-centred random field of ``shape`` with root-mean-square ``rms`` (float32).

    ``n_ctrl`` random control values per axis span the whole field, so smoothness is relative to the
    field of view and does not depend on the voxel size.
    """
    ctrl = rng.standard_normal((n_ctrl, n_ctrl, n_ctrl)).astype(np.float32)
    wx, wy, wz = (_axis_weights(n, n_ctrl) for n in shape)
    field = np.tensordot(wx, ctrl, axes=(1, 0))  # (X, c, c)
    field = np.tensordot(field, wy, axes=(1, 1))  # (X, c, Y)
    field = np.tensordot(field, wz, axes=(1, 1))  # (X, Y, Z)
    field -= field.mean()
    norm = float(np.sqrt(np.mean(field**2)))
    return field * np.float32(rms / norm) if norm > 0 else field


def bias_field(rng: np.random.Generator, shape: Shape3, strength: float = 0.15) -> np.ndarray:
    """A smooth multiplicative bias field ``exp(f)`` with ``f`` of RMS ``strength`` (float32, positive)."""
    return np.exp(smooth_field(rng, shape, n_ctrl=4, rms=strength))


def rician_noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise of std ``sigma``: non-negative, Rician."""
    real = image + np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
    imag = np.float32(sigma) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.sqrt(real * real + imag * imag)


def _template_coordinates(
    template: Template, grid: Grid, rng: np.random.Generator, displacement_mm: float, scale_jitter: float
) -> np.ndarray:
    """Template voxel coordinates (3, *grid.shape; float32) of every output voxel.

    The mapping is a random scaling about the brain centre plus a smooth random displacement
    (RMS ``displacement_mm`` per axis; the template has 1 mm voxels, so mm = template voxels).
    """
    centre = template.brain_centre_mm
    scale = np.diag(1.0 + rng.uniform(-scale_jitter, scale_jitter, size=3))
    world_to_tpl = np.linalg.inv(template.grid.affine)
    linear = world_to_tpl[:3, :3] @ scale @ grid.affine[:3, :3]
    offset = world_to_tpl[:3, :3] @ (scale @ (grid.affine[:3, 3] - centre) + centre) + world_to_tpl[:3, 3]
    axes = np.ogrid[tuple(slice(0, n) for n in grid.shape)]
    coords = np.empty((3, *grid.shape), dtype=np.float32)
    for d in range(3):
        base = sum(np.float32(linear[d, e]) * axes[e].astype(np.float32) for e in range(3))
        coords[d] = base + np.float32(offset[d]) + smooth_field(rng, grid.shape, 6, displacement_mm)
    return coords


def sample_anatomy(
    grid: Grid, rng: np.random.Generator, *, displacement_mm: float = 2.5, scale_jitter: float = 0.04
) -> Anatomy:
    """Deform the MNI152 template randomly and sample its tissue maps onto ``grid`` (trilinear).

    CSF is what the brain mask holds beyond GM and WM; all fractions are zero outside the brain.
    """
    template = load_template()
    coords = _template_coordinates(template, grid, rng, displacement_mm, scale_jitter)

    def sample(volume: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(volume, coords, order=1, prefilter=False, mode="constant", cval=0.0)

    mask = sample(template.mask)
    brain = mask > 0.5
    gm = np.where(brain, sample(template.gm), 0.0).astype(np.float32)
    wm = np.where(brain, sample(template.wm), 0.0).astype(np.float32)
    csf = np.where(brain, np.clip(mask - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    return Anatomy(gm=gm, wm=wm, csf=csf, brain=brain)
