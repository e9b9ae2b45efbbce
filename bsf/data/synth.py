"""Synthetic subjects written in the distributed layouts of UK Biobank, BraTS 2021 and ATLAS v2.0.

Each subject is a randomly scaled and smoothly deformed MNI152 template (GM, WM and CSF maps) sampled
directly onto the data set's output grid, rendered per contrast from tissue intensities, with lesions
where the data set has them, a smooth multiplicative bias field, a random global intensity scale and
Rician noise, and zero outside the brain (skull-stripped). Subject ``i`` uses
``numpy.random.default_rng([seed, i])``, so the same seed gives identical data.

A :class:`ScannerProfile` makes one site's images look like another scanner's (intensity scale, bias-field
strength, noise level, resolution); its defaults give the usual output bit for bit.

Subjects are written under the real data sets' ids (``BraTS2021_00000``, ...), so a folder that already holds one
of them (a real data set, or an earlier synthetic one) is refused before any work unless the caller says
``replace=True`` (``bsf data synth --force``); see :func:`check_synth_output`.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from bsf.data.anatomy import Anatomy, Grid, bias_field, load_template, rician_noise, sample_anatomy
from bsf.data.lesions import EDEMA, ENHANCING, NECROTIC_CORE, stroke_mask, tumour_labels
from bsf.errors import ConfigError, DataError, OutputError
from bsf.io import atomic_path
from bsf.outputs import check_output_files, check_output_folder, existing_outputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Contrast:
    """Mean intensity of white matter, grey matter and CSF in one MRI contrast (WM of T1w = 1)."""

    wm: float
    gm: float
    csf: float


T1 = Contrast(wm=1.0, gm=0.65, csf=0.25)  # also T1ce outside the tumour
T2 = Contrast(wm=0.45, gm=0.6, csf=1.0)
FLAIR = Contrast(wm=0.5, gm=0.6, csf=0.1)

BRATS_CONTRASTS: Mapping[str, Contrast] = {"flair": FLAIR, "t1ce": T1, "t1": T1, "t2": T2}
TUMOUR_INTENSITY: Mapping[str, Mapping[int, float]] = {
    "flair": {NECROTIC_CORE: 0.8, EDEMA: 1.0, ENHANCING: 0.85},
    "t1ce": {NECROTIC_CORE: 0.3, EDEMA: 0.6, ENHANCING: 1.6},
    "t1": {NECROTIC_CORE: 0.3, EDEMA: 0.55, ENHANCING: 0.5},
    "t2": {NECROTIC_CORE: 1.0, EDEMA: 0.85, ENHANCING: 0.75},
}
STROKE_T1_INTENSITY: Mapping[int, float] = {1: 0.35}

_BASE_INTENSITY = 1000.0
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class ScannerProfile:
    """How one site's scanner renders its images; the defaults are the synthesiser's usual output, bit for bit.

    Attributes:
        intensity_scale: multiplies every image (signal and noise alike, so the SNR stays), on top of each
            image's own random scale (0.7..1.3 x 1000). In (0, 100].
        bias_strength: RMS of the log of the smooth multiplicative bias field (0: no bias field). In [0, 1].
        noise: multiplies the Rician noise's std (each image draws 1..3 % of its scale); 0: noise-free. In [0, 10].
        resolution: FWHM in mm of the scanner's (Gaussian) point-spread function, or ``None`` for the output
            grid's own. When coarser than the output spacing ``s``, the noiseless image is blurred by a Gaussian
            of FWHM ``sqrt(resolution**2 - s**2)`` mm before the noise is added (an image acquired coarser and
            resampled: partial volume at tissue and tumour edges, noise still at the output grid). In [0.5, 20].

    Raises:
        ConfigError: a value of the wrong type or out of range, naming ``scanner.<key>``.
    """

    intensity_scale: float = 1.0
    bias_strength: float = 0.15
    noise: float = 1.0
    resolution: float | None = None

    def __post_init__(self) -> None:
        ranges = {"intensity_scale": (0.0, 100.0, False), "bias_strength": (0.0, 1.0, True),
                  "noise": (0.0, 10.0, True), "resolution": (0.5, 20.0, True)}
        for key, (low, high, low_ok) in ranges.items():
            value = getattr(self, key)
            if key == "resolution" and value is None:
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not (number and (low <= value if low_ok else low < value) and value <= high):
                bounds = f"{'[' if low_ok else '('}{low:g}, {high:g}]"
                extra = " or null" if key == "resolution" else ""
                raise ConfigError(f"scanner.{key} must be a number in {bounds}{extra}, got {value!r}")
            object.__setattr__(self, key, float(value))

    @classmethod
    def from_mapping(cls, raw: Any) -> "ScannerProfile":
        """A profile from a mapping of its keys (a site config's ``synthetic.scanner``; ``None``: the default).

        Raises:
            ConfigError: not a mapping, an unknown key (named, with the known ones), or a bad value.
        """
        if raw is None:
            return cls()
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(raw, Mapping):
            raise ConfigError(f"scanner must be a mapping of {', '.join(names)}, got {raw!r}")
        unknown = sorted(str(k) for k in raw if k not in names)
        if unknown:
            raise ConfigError(f"scanner.{unknown[0]} is not a scanner setting; choose from {', '.join(names)}")
        return cls(**raw)

    @property
    def tag(self) -> str:
        """A short name for folder names: ``""`` for the default profile, else e.g. ``"-scan-i1.5-b0.3-n2-r6"``."""
        if self == ScannerProfile():
            return ""
        resolution = "" if self.resolution is None else f"-r{self.resolution:g}"
        return f"-scan-i{self.intensity_scale:g}-b{self.bias_strength:g}-n{self.noise:g}{resolution}"


DEFAULT_SCANNER = ScannerProfile()
_MAX_SUBJECTS = {"ukb": 8_999_999, "brats": 100_000, "atlas": 999 * 999}

UKB_GRID = Grid(
    shape=(182, 218, 182),
    affine=np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]]),
)
BRATS_SHAPE = (240, 240, 155)


def _brats_grid() -> Grid:
    """240 x 240 x 155 at 1 mm, RAS, centred on the template's brain."""
    affine = np.eye(4)
    affine[:3, 3] = load_template().brain_centre_mm - (np.array(BRATS_SHAPE) - 1) / 2.0
    return Grid(shape=BRATS_SHAPE, affine=affine)


def output_grid(dataset: str, spacing: float = 1.0) -> Grid:
    """The grid a data set's volumes are written on: its 1 mm grid scaled to ``spacing`` mm (same FOV).

    UKB: FSL MNI152 182 x 218 x 182; BraTS: 240 x 240 x 155; ATLAS: MNI152NLin2009aSym 197 x 233 x 189.
    """
    one_mm = {"ukb": lambda: UKB_GRID, "brats": _brats_grid, "atlas": lambda: load_template().grid}
    return one_mm[dataset]().scaled(spacing)


def render(
    anatomy: Anatomy,
    contrast: Contrast,
    rng: np.random.Generator,
    labels: np.ndarray | None = None,
    lesion_intensity: Mapping[int, float] | None = None,
    scanner: ScannerProfile = DEFAULT_SCANNER,
    spacing: float = 1.0,
) -> np.ndarray:
    """One image (float32, non-negative, 0 outside the brain; the shape of ``anatomy.brain``) of ``anatomy`` in ``contrast``.

    Tissue intensities are jittered by up to 7 %; voxels with a label in ``lesion_intensity`` take that
    label's intensity instead. Then a bias field, a random global scale, the scanner's blur (``spacing``: the
    grid's voxel size in mm) and Rician noise are applied, as ``scanner`` sets them.
    """
    jitter = rng.uniform(0.93, 1.07, size=3)
    image = (
        anatomy.wm * np.float32(contrast.wm * jitter[0])
        + anatomy.gm * np.float32(contrast.gm * jitter[1])
        + anatomy.csf * np.float32(contrast.csf * jitter[2])
    )
    for label, value in (lesion_intensity or {}).items():
        image[labels == label] = value * rng.uniform(0.93, 1.07)
    scale = _BASE_INTENSITY * rng.uniform(0.7, 1.3) * scanner.intensity_scale
    image *= bias_field(rng, anatomy.brain.shape, scanner.bias_strength) * np.float32(scale)
    image = blur_to_resolution(image, spacing, scanner.resolution)
    image = rician_noise(image, rng, sigma=scale * rng.uniform(0.01, 0.03) * scanner.noise)
    image[~anatomy.brain] = 0.0
    return image.astype(np.float32, copy=False)


def blur_to_resolution(image: np.ndarray, spacing: float, resolution: float | None) -> np.ndarray:
    """``image`` (3D, ``spacing`` mm voxels) seen at ``resolution`` mm FWHM: a Gaussian blur of FWHM
    ``sqrt(resolution**2 - spacing**2)`` mm; unchanged (the same array) when ``resolution`` is ``None`` or <= ``spacing``."""
    if resolution is None or resolution <= spacing:
        return image
    sigma_voxels = math.sqrt(resolution**2 - spacing**2) / _FWHM_PER_SIGMA / spacing
    return ndimage.gaussian_filter(image, sigma_voxels, mode="nearest").astype(np.float32, copy=False)


def write_nifti(data: np.ndarray, grid: Grid, path: Path, space: str) -> None:
    """Write ``data`` on ``grid`` as a gzipped NIfTI to ``path`` atomically (temporary file, then rename).

    ``space`` is the NIfTI sform/qform code name ("mni", "scanner", ...).
    """
    image = nib.Nifti1Image(data, grid.affine)
    image.set_sform(grid.affine, code=space)
    image.set_qform(grid.affine, code=space)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp, gzip.open(tmp, "wb", compresslevel=1) as stream:
        stream.write(image.to_bytes())


@dataclass(frozen=True)
class SubjectFiles:
    """Where one synthetic subject goes: its id, its own folders (one that exists means the subject exists) and files."""

    name: str
    folders: tuple[Path, ...]
    files: tuple[Path, ...]


def _ukb_files(index: int, out_dir: Path) -> SubjectFiles:
    """``<id>_20252_2_0/T1/T1_brain_to_MNI.nii.gz`` and ``<id>_20253_2_0/T2_FLAIR/T2_FLAIR_brain_to_MNI.nii.gz``."""
    eid = 1_000_000 + index
    t1_dir, flair_dir = out_dir / f"{eid}_20252_2_0", out_dir / f"{eid}_20253_2_0"
    return SubjectFiles(str(eid), (t1_dir, flair_dir),
                        (t1_dir / "T1" / "T1_brain_to_MNI.nii.gz", flair_dir / "T2_FLAIR" / "T2_FLAIR_brain_to_MNI.nii.gz"))


def _brats_files(index: int, out_dir: Path) -> SubjectFiles:
    """``BraTS2021_<5 digits>/BraTS2021_<5 digits>_{flair,t1ce,t1,t2,seg}.nii.gz``."""
    case = f"BraTS2021_{index:05d}"
    case_dir = out_dir / case
    return SubjectFiles(case, (case_dir,), tuple(case_dir / f"{case}_{m}.nii.gz" for m in (*BRATS_CONTRASTS, "seg")))


def _atlas_files(index: int, out_dir: Path) -> SubjectFiles:
    """``ATLAS_2/Training/R<site>/sub-r<site>s<3 digits>/ses-1/anat/..._{T1w,label-L_desc-T1lesion_mask}.nii.gz``
    (999 subjects per site)."""
    site, number = index // 999 + 1, index % 999 + 1
    subject = f"sub-r{site:03d}s{number:03d}"
    subject_dir = out_dir / "ATLAS_2" / "Training" / f"R{site:03d}" / subject
    prefix = subject_dir / "ses-1" / "anat" / f"{subject}_ses-1_space-MNI152NLin2009aSym"
    return SubjectFiles(subject, (subject_dir,), (Path(f"{prefix}_T1w.nii.gz"), Path(f"{prefix}_label-L_desc-T1lesion_mask.nii.gz")))


_FILES: Mapping[str, Callable[[int, Path], SubjectFiles]] = {"ukb": _ukb_files, "brats": _brats_files, "atlas": _atlas_files}


def subject_files(dataset: str, index: int, out_dir: str | Path) -> SubjectFiles:
    """Where subject ``index`` of synthetic ``dataset`` goes under ``out_dir`` (nothing is written)."""
    return _FILES[dataset](index, Path(out_dir))


def check_synth_output(dataset: str, n_subjects: int, out_dir: str | Path, *, replace: bool = False) -> list[SubjectFiles]:
    """Where :func:`synthesize` would write, checked before any work.

    Raises:
        OutputError: naming the path: ``out_dir`` is a file or cannot be created, a folder stands where a file goes,
            or (unless ``replace``) a subject to write exists already (its folder, or one of its files).
    """
    out = check_output_folder(out_dir, what="output folder", reuse=True)
    plans = [subject_files(dataset, index, out) for index in range(n_subjects)]
    check_output_files([path for plan in plans for path in plan.files], what=f"{dataset} subject file", force=True)
    if not replace:
        taken = [plan for plan in plans if existing_outputs([*plan.folders, *plan.files])]
        if taken:
            shown = ", ".join(str(plan.folders[0]) for plan in taken[:3]) + (", ..." if len(taken) > 3 else "")
            raise OutputError(f"output folder {out}: already holds {len(taken)} of the {n_subjects} {dataset} subject(s) to write "
                              f"({shown}); pass --force to replace them")
    return plans


def _write_ukb(files: SubjectFiles, grid: Grid, rng: np.random.Generator, scanner: ScannerProfile) -> Path:
    """T1w and FLAIR of one subject; returns the T1 folder."""
    anatomy = sample_anatomy(grid, rng)
    t1_path, flair_path = files.files
    look = {"scanner": scanner, "spacing": grid.spacing}
    write_nifti(render(anatomy, T1, rng, **look), grid, t1_path, "mni")
    write_nifti(render(anatomy, FLAIR, rng, **look), grid, flair_path, "mni")
    return files.folders[0]


def _write_brats(files: SubjectFiles, grid: Grid, rng: np.random.Generator, scanner: ScannerProfile) -> Path:
    """The four modalities and the tumour labels of one case; returns the case folder."""
    anatomy = sample_anatomy(grid, rng)
    labels = tumour_labels(anatomy, grid.spacing, rng)
    *images, seg = files.files
    for (modality, contrast), path in zip(BRATS_CONTRASTS.items(), images):
        image = render(anatomy, contrast, rng, labels, TUMOUR_INTENSITY[modality], scanner, grid.spacing)
        write_nifti(image, grid, path, "scanner")
    write_nifti(labels, grid, seg, "scanner")
    return files.folders[0]


def _write_atlas(files: SubjectFiles, grid: Grid, rng: np.random.Generator, scanner: ScannerProfile) -> Path:
    """T1w and stroke-lesion mask of one subject; returns the subject folder."""
    anatomy = sample_anatomy(grid, rng)
    lesion = stroke_mask(anatomy, grid, rng)
    image = render(anatomy, T1, rng, lesion, STROKE_T1_INTENSITY, scanner, grid.spacing)
    t1w, mask = files.files
    write_nifti(image, grid, t1w, "mni")
    write_nifti(lesion, grid, mask, "mni")
    return files.folders[0]


_WRITERS: Mapping[str, Callable[[SubjectFiles, Grid, np.random.Generator, ScannerProfile], Path]] = {
    "ukb": _write_ukb,
    "brats": _write_brats,
    "atlas": _write_atlas,
}


def synthesize(
    dataset: str,
    n_subjects: int,
    out_dir: str | Path,
    *,
    spacing: float = 1.0,
    seed: int = 0,
    progress: bool = False,
    scanner: ScannerProfile = DEFAULT_SCANNER,
    replace: bool = True,
) -> list[Path]:
    """Write ``n_subjects`` synthetic subjects of ``dataset`` ("ukb", "brats" or "atlas") under ``out_dir``.

    Volumes have isotropic ``spacing`` mm voxels over the data set's usual field of view, rendered as
    ``scanner`` sets (the default: the usual output). Returns one folder per subject (for UKB the
    ``<id>_20252_2_0`` folder; its FLAIR lives in ``<id>_20253_2_0``).

    ``replace``: write over subjects that exist already (the default, for callers that own ``out_dir``); ``False``
    refuses them before any work (:func:`check_synth_output`), as ``bsf data synth`` does without ``--force``.
    """
    out_dir = Path(out_dir)
    if dataset not in _WRITERS:
        raise DataError(f"{out_dir}: unknown synthetic data set {dataset!r}; choose one of {', '.join(_WRITERS)}")
    if not 0 <= n_subjects <= _MAX_SUBJECTS[dataset]:
        raise ConfigError(f"n_subjects must be in 0..{_MAX_SUBJECTS[dataset]} for {dataset}, got {n_subjects}")
    if not 0.5 <= spacing <= 8.0:
        raise ConfigError(f"spacing must be between 0.5 and 8 mm, got {spacing}")
    if not isinstance(scanner, ScannerProfile):
        raise ConfigError(f"scanner must be a ScannerProfile, got {type(scanner).__name__}")
    plans = check_synth_output(dataset, n_subjects, out_dir, replace=replace)
    grid = output_grid(dataset, spacing)
    written = [
        _WRITERS[dataset](plans[index], grid, np.random.default_rng([seed, index]), scanner)
        for index in tqdm(range(n_subjects), desc=f"synthesize {dataset}", unit="subject", disable=not progress)
    ]
    logger.info(
        "wrote %d synthetic %s subjects (%g mm, grid %s, scanner %s) under %s",
        n_subjects, dataset, spacing, grid.shape, scanner, out_dir,
    )
    return written
