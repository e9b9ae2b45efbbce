"""Finding UKB / BraTS / ATLAS cases in their distributed layouts (synthesized, and hand-made BraTS 2023)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from bsf.data.layouts import find_atlas_subjects, find_brats_cases, find_ukb_subjects
from bsf.data.synth import synthesize
from bsf.errors import DataError

N = 3
FINDERS = {"ukb": find_ukb_subjects, "brats": find_brats_cases, "atlas": find_atlas_subjects}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three synthetic subjects per data set at 4 mm."""
    out = {}
    for dataset in FINDERS:
        out[dataset] = tmp_path_factory.mktemp(dataset)
        synthesize(dataset, N, out[dataset], spacing=4.0, seed=1)
    return out


@pytest.fixture
def copy_of(roots: dict[str, Path], tmp_path: Path):
    """A private, modifiable copy of a synthesized root."""

    def make(dataset: str) -> Path:
        return Path(shutil.copytree(roots[dataset], tmp_path / dataset))

    return make


def test_ukb_finds_the_synthesized_subjects(roots: dict[str, Path]) -> None:
    assert find_ukb_subjects(roots["ukb"]) == [
        {
            "id": str(1_000_000 + i),
            "image": [
                f"{1_000_000 + i}_20252_2_0/T1/T1_brain_to_MNI.nii.gz",
                f"{1_000_000 + i}_20253_2_0/T2_FLAIR/T2_FLAIR_brain_to_MNI.nii.gz",
            ],
        }
        for i in range(N)
    ]


def test_brats_finds_the_synthesized_cases_in_fold_file_order(roots: dict[str, Path]) -> None:
    expected = []
    for i in range(N):
        case = f"BraTS2021_{i:05d}"
        files = [f"{case}/{case}_{m}.nii.gz" for m in ("flair", "t1ce", "t1", "t2", "seg")]
        expected.append({"id": case, "image": files[:4], "label": files[4]})
    assert find_brats_cases(roots["brats"]) == expected


def test_atlas_finds_the_synthesized_subjects(roots: dict[str, Path]) -> None:
    expected = []
    for i in range(N):
        sub = f"sub-r001s{i + 1:03d}"
        prefix = f"ATLAS_2/Training/R001/{sub}/ses-1/anat/{sub}_ses-1_space-MNI152NLin2009aSym"
        label = f"{prefix}_label-L_desc-T1lesion_mask.nii.gz"
        expected.append({"id": sub, "image": f"{prefix}_T1w.nii.gz", "label": label})
    assert find_atlas_subjects(roots["atlas"]) == expected


@pytest.mark.parametrize("dataset", list(FINDERS))
def test_paths_are_relative_and_exist(roots: dict[str, Path], dataset: str) -> None:
    for case in FINDERS[dataset](roots[dataset]):
        images = case["image"] if isinstance(case["image"], list) else [case["image"]]
        for rel in images + ([case["label"]] if "label" in case else []):
            assert not Path(rel).is_absolute() and "\\" not in rel
            assert (roots[dataset] / rel).is_file()


def test_atlas_root_may_be_any_folder_above_the_subjects(roots: dict[str, Path]) -> None:
    cases = find_atlas_subjects(roots["atlas"] / "ATLAS_2" / "Training")
    assert [c["id"] for c in cases] == [f"sub-r001s{i + 1:03d}" for i in range(N)]
    assert cases[0]["image"].startswith("R001/sub-r001s001/ses-1/anat/")


def test_brats_2023_naming(tmp_path: Path) -> None:
    case = "BraTS-GLI-00002-000"
    (tmp_path / case).mkdir()
    for suffix in ("t1c", "t1n", "t2f", "t2w", "seg"):
        (tmp_path / case / f"{case}-{suffix}.nii.gz").touch()
    (tmp_path / "not-a-case").mkdir()
    files = [f"{case}/{case}-{s}.nii.gz" for s in ("t2f", "t1c", "t1n", "t2w")]
    assert find_brats_cases(tmp_path) == [{"id": case, "image": files, "label": f"{case}/{case}-seg.nii.gz"}]


@pytest.mark.parametrize(
    ("dataset", "missing", "skipped"),
    [
        ("ukb", "1000001_20253_2_0/T2_FLAIR/T2_FLAIR_brain_to_MNI.nii.gz", "1000001"),
        ("ukb", "1000001_20252_2_0/T1/T1_brain_to_MNI.nii.gz", "1000001"),
        ("brats", "BraTS2021_00001/BraTS2021_00001_t2.nii.gz", "BraTS2021_00001"),
        ("brats", "BraTS2021_00001/BraTS2021_00001_seg.nii.gz", "BraTS2021_00001"),
        (
            "atlas",
            "ATLAS_2/Training/R001/sub-r001s002/ses-1/anat/"
            "sub-r001s002_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz",
            "sub-r001s002",
        ),
    ],
)
def test_missing_partner_is_skipped_and_reported(
    copy_of, caplog: pytest.LogCaptureFixture, dataset: str, missing: str, skipped: str
) -> None:
    root = copy_of(dataset)
    (root / missing).unlink()
    with caplog.at_level(logging.WARNING, logger="bsf.data.layouts"):
        cases = FINDERS[dataset](root)
    assert len(cases) == N - 1 and skipped not in [c["id"] for c in cases]
    assert str(root / missing) in caplog.text


@pytest.mark.parametrize("dataset", list(FINDERS))
def test_missing_or_empty_root_raises_naming_it(tmp_path: Path, dataset: str) -> None:
    missing = tmp_path / "no-such-folder"
    with pytest.raises(DataError, match="no-such-folder.*does not exist"):
        FINDERS[dataset](missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty.*no complete"):
        FINDERS[dataset](tmp_path / "empty")


def test_duplicate_atlas_subject_raises(copy_of) -> None:
    root = copy_of("atlas")
    shutil.copytree(root / "ATLAS_2/Training/R001/sub-r001s001", root / "elsewhere/sub-r001s001")
    with pytest.raises(DataError, match="sub-r001s001 found twice"):
        find_atlas_subjects(root)
