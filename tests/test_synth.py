"""Synthetic UKB / BraTS / ATLAS subjects: layout names, grids, values, lesion appearance, seeds."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nilearn.datasets import load_mni152_template
from scipy import ndimage

from bsf.data import synth
from bsf.data.synth import synthesize
from bsf.errors import ConfigError, DataError

SPACING = 4.0
N_SUBJECTS = 2
UKB_AFFINE_1MM = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])


def _shape(shape_1mm: tuple[int, ...], spacing: float = SPACING) -> tuple[int, ...]:
    return tuple(round(n / spacing) for n in shape_1mm)


def _scaled_affine(affine_1mm: np.ndarray, spacing: float = SPACING) -> np.ndarray:
    """Same field of view: voxel 0's outer corner stays put."""
    out = affine_1mm.copy()
    out[:3, :3] *= spacing
    out[:3, 3] += affine_1mm[:3, :3] @ np.full(3, (spacing - 1) / 2)
    return out


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    """Each data set synthesized once: {dataset: (out_dir, returned folders)}."""
    out = {}
    for dataset in ("ukb", "brats", "atlas"):
        root = tmp_path_factory.mktemp(dataset)
        out[dataset] = (root, synthesize(dataset, N_SUBJECTS, root, spacing=SPACING, seed=0))
    return out


def _ukb_files(root: Path, i: int) -> list[Path]:
    eid = 1_000_000 + i
    return [
        root / f"{eid}_20252_2_0" / "T1" / "T1_brain_to_MNI.nii.gz",
        root / f"{eid}_20253_2_0" / "T2_FLAIR" / "T2_FLAIR_brain_to_MNI.nii.gz",
    ]


def _brats_files(root: Path, i: int) -> dict[str, Path]:
    case = f"BraTS2021_{i:05d}"
    return {m: root / case / f"{case}_{m}.nii.gz" for m in ("flair", "t1ce", "t1", "t2", "seg")}


def _atlas_files(root: Path, i: int) -> list[Path]:
    sub = f"sub-r001s{i + 1:03d}"
    anat = root / "ATLAS_2" / "Training" / "R001" / sub / "ses-1" / "anat"
    prefix = f"{sub}_ses-1_space-MNI152NLin2009aSym"
    return [anat / f"{prefix}_T1w.nii.gz", anat / f"{prefix}_label-L_desc-T1lesion_mask.nii.gz"]


def _subject_files(dataset: str, root: Path, i: int) -> list[Path]:
    if dataset == "brats":
        return list(_brats_files(root, i).values())
    return {"ukb": _ukb_files, "atlas": _atlas_files}[dataset](root, i)


def _all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("dataset", ["ukb", "brats", "atlas"])
def test_exactly_the_layout_files_are_written(synthesized, dataset: str) -> None:
    root, _ = synthesized[dataset]
    expected = {f for i in range(N_SUBJECTS) for f in _subject_files(dataset, root, i)}
    assert _all_files(root) == expected  # also: no temporary files left behind


def test_returned_folders(synthesized) -> None:
    ukb, brats, atlas = (synthesized[d] for d in ("ukb", "brats", "atlas"))
    assert ukb[1] == [ukb[0] / f"{1_000_000 + i}_20252_2_0" for i in range(N_SUBJECTS)]
    assert brats[1] == [brats[0] / f"BraTS2021_{i:05d}" for i in range(N_SUBJECTS)]
    assert atlas[1] == [atlas[0] / "ATLAS_2/Training/R001" / f"sub-r001s{i + 1:03d}" for i in range(N_SUBJECTS)]


@pytest.mark.parametrize(
    ("dataset", "shape_1mm"),
    [("ukb", (182, 218, 182)), ("brats", (240, 240, 155)), ("atlas", (197, 233, 189))],
)
def test_grid_shared_by_a_subjects_files(synthesized, dataset: str, shape_1mm: tuple[int, ...]) -> None:
    root, _ = synthesized[dataset]
    for i in range(N_SUBJECTS):
        images = [nib.load(f) for f in _subject_files(dataset, root, i)]
        for image in images:
            assert image.shape == _shape(shape_1mm)
            np.testing.assert_array_equal(image.affine, images[0].affine)
            assert np.allclose(np.abs(np.diag(image.affine)[:3]), SPACING)


def test_ukb_and_atlas_affines_are_the_standard_spaces(synthesized) -> None:
    ukb_t1 = nib.load(_ukb_files(synthesized["ukb"][0], 0)[0])
    np.testing.assert_allclose(ukb_t1.affine, _scaled_affine(UKB_AFFINE_1MM))
    atlas_t1 = nib.load(_atlas_files(synthesized["atlas"][0], 0)[0])
    np.testing.assert_allclose(atlas_t1.affine, _scaled_affine(load_mni152_template(resolution=1).affine))


@pytest.mark.parametrize("dataset", ["ukb", "brats", "atlas"])
def test_images_are_skull_stripped_finite_float32(synthesized, dataset: str) -> None:
    root, _ = synthesized[dataset]
    for i in range(N_SUBJECTS):
        paths = [p for p in _subject_files(dataset, root, i) if "seg" not in p.name and "mask" not in p.name]
        supports = []
        for path in paths:
            data = _load(path)
            assert data.dtype == np.float32
            assert np.isfinite(data).all() and data.min() >= 0
            supports.append(data > 0)
        brain = supports[0]
        assert 0.1 < brain.mean() < 0.6
        for support in supports[1:]:
            np.testing.assert_array_equal(support, brain)  # one brain mask per subject
        for face in (brain[0], brain[-1], brain[:, 0], brain[:, -1]):  # nothing but brain: no head, no skull
            assert not face.any()


def test_brats_seg_has_all_three_labels_inside_the_brain(synthesized) -> None:
    root, _ = synthesized["brats"]
    for i in range(N_SUBJECTS):
        files = _brats_files(root, i)
        seg = _load(files["seg"])
        assert seg.dtype == np.uint8
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}
        assert (_load(files["t1"])[seg > 0] > 0).all()


def _shell(mask: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Brain voxels just around ``mask``."""
    return ndimage.binary_dilation(mask, iterations=2) & ~mask & brain


def test_tumour_appearance(synthesized) -> None:
    root, _ = synthesized["brats"]
    for i in range(N_SUBJECTS):
        files = _brats_files(root, i)
        seg = _load(files["seg"])
        img = {m: _load(files[m]) for m in ("flair", "t1ce", "t1", "t2")}
        brain = img["t1"] > 0
        tumour, rim, core = seg > 0, seg == 4, seg == 1
        around = _shell(tumour, brain)
        assert img["flair"][tumour].mean() > 1.3 * img["flair"][around].mean()
        assert img["t2"][tumour].mean() > 1.15 * img["t2"][around].mean()
        assert img["t1"][tumour].mean() < 0.85 * img["t1"][around].mean()
        assert img["t1"][core].mean() < 0.6 * img["t1"][around].mean()
        normal = brain & ~tumour
        t1ce_rim = img["t1ce"][rim].mean() / np.median(img["t1ce"][normal])
        t1_rim = img["t1"][rim].mean() / np.median(img["t1"][normal])
        assert t1ce_rim > 1.5 * t1_rim
        assert img["t1ce"][core].mean() < 0.5 * img["t1ce"][rim].mean()


def test_atlas_lesion_is_binary_hypointense_in_one_hemisphere(synthesized) -> None:
    root, _ = synthesized["atlas"]
    for i in range(N_SUBJECTS):
        t1w_path, mask_path = _atlas_files(root, i)
        t1w, mask = _load(t1w_path), _load(mask_path)
        assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 1}
        lesion = mask == 1
        brain = t1w > 0
        assert brain[lesion].all()
        assert t1w[lesion].mean() < 0.7 * t1w[_shell(lesion, brain)].mean()
        x_world = nib.load(mask_path).affine[0, 0] * np.nonzero(lesion)[0] + nib.load(mask_path).affine[0, 3]
        assert (x_world > 0).all() or (x_world < 0).all()


@pytest.mark.parametrize("dataset", ["ukb", "brats", "atlas"])
def test_seed_reproducibility(synthesized, tmp_path: Path, dataset: str) -> None:
    synthesize(dataset, 1, tmp_path / "same", spacing=SPACING, seed=0)
    synthesize(dataset, 1, tmp_path / "other", spacing=SPACING, seed=1)
    first = [_load(p) for p in _subject_files(dataset, synthesized[dataset][0], 0)]
    same = [_load(p) for p in _subject_files(dataset, tmp_path / "same", 0)]
    other = [_load(p) for p in _subject_files(dataset, tmp_path / "other", 0)]
    second = [_load(p) for p in _subject_files(dataset, synthesized[dataset][0], 1)]
    for a, b in zip(first, same):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[0], second[0])


def test_brats_labels_survive_three_mm(tmp_path: Path) -> None:
    (case,) = synthesize("brats", 1, tmp_path, spacing=3.0, seed=5)
    seg = _load(case / f"{case.name}_seg.nii.gz")
    assert seg.shape == _shape((240, 240, 155), 3.0)
    assert set(np.unique(seg).tolist()) == {0, 1, 2, 4}


def test_ukb_at_one_mm(tmp_path: Path) -> None:
    synthesize("ukb", 1, tmp_path, spacing=1.0, seed=0)
    for path in _ukb_files(tmp_path, 0):
        image = nib.load(path)
        assert image.shape == (182, 218, 182)
        np.testing.assert_array_equal(image.affine, UKB_AFFINE_1MM)


def test_unknown_dataset_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="oasis"):
        synthesize("oasis", 1, tmp_path)
    with pytest.raises(ConfigError, match="spacing"):
        synthesize("ukb", 1, tmp_path, spacing=0.0)
    with pytest.raises(ConfigError, match="n_subjects"):
        synthesize("ukb", -1, tmp_path)
    assert synthesize("ukb", 0, tmp_path) == []


def test_a_crash_while_writing_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(image: nib.Nifti1Image) -> bytes:
        raise OSError("disk full")

    monkeypatch.setattr(synth.nib.Nifti1Image, "to_bytes", crash)
    with pytest.raises(OSError, match="disk full"):
        synthesize("ukb", 1, tmp_path, spacing=SPACING)
    assert _all_files(tmp_path) == set()
