"""Find cases in the distributed folder layouts of UK Biobank, BraTS (2021 and 2023 naming) and ATLAS v2.0.

Each finder returns MONAI-style datalist entries sorted by id, with paths relative to ``root`` (POSIX
strings). Subjects missing a partner file are skipped with a warning that names the missing file.
A missing root, a root holding no complete case, or one id found twice raises ``DataError``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from bsf.errors import DataError

logger = logging.getLogger(__name__)

UKB_T1 = "{eid}_20252_2_0/T1/T1_brain_to_MNI.nii.gz"
UKB_FLAIR = "{eid}_20253_2_0/T2_FLAIR/T2_FLAIR_brain_to_MNI.nii.gz"

# (case-folder pattern, separator, file suffixes in the datalist's order FLAIR, T1ce, T1, T2, then the label):
# BraTS 2021, and the BraTS 2023+ naming (BraTS-GLI-00000-000, also -MEN, -MET, -PED, -SSA).
BRATS_NAMING: tuple[tuple[re.Pattern[str], str, tuple[str, ...]], ...] = (
    (re.compile(r"BraTS2021_\d{5}"), "_", ("flair", "t1ce", "t1", "t2", "seg")),
    (re.compile(r"BraTS-[A-Z]+-\d{5}-\d{3}"), "-", ("t2f", "t1c", "t1n", "t2w", "seg")),
)

ATLAS_T1W_SUFFIX = "_T1w.nii.gz"
ATLAS_MASK_SUFFIX = "_label-L_desc-T1lesion_mask.nii.gz"


def _check_root(root: str | Path, what: str) -> Path:
    """``root`` as a Path; DataError when it is not an existing folder."""
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"{path}: {what} root folder does not exist")
    return path


def _finish(cases: list[dict], root: Path, what: str) -> list[dict]:
    """Sort ``cases`` by id; DataError when there are none or an id occurs twice."""
    if not cases:
        raise DataError(f"{root}: holds no complete {what} case")
    cases.sort(key=lambda case: case["id"])
    for first, second in zip(cases, cases[1:]):
        if first["id"] == second["id"]:
            raise DataError(f"{root}: {what} id {first['id']} found twice ({first['image']} and {second['image']})")
    return cases


def _present(root: Path, relative: list[str], case_id: str) -> bool:
    """True when every file exists; otherwise log a warning naming the missing ones."""
    missing = [rel for rel in relative if not (root / rel).is_file()]
    if missing:
        logger.warning("skipping %s: missing %s", case_id, ", ".join(str(root / rel) for rel in missing))
    return not missing


def find_ukb_subjects(root: str | Path) -> list[dict]:
    """UK Biobank subjects under ``root`` with both the 20252 T1 and the 20253 T2-FLAIR brain in MNI space.

    Returns ``[{"id": "<eid>", "image": [t1, flair]}, ...]``; subject folders sit directly in ``root``.
    """
    root = _check_root(root, "UK Biobank")
    eids = {p.name.split("_")[0] for p in root.glob("*_2025[23]_2_0") if p.is_dir()}
    cases = []
    for eid in eids:
        image = [UKB_T1.format(eid=eid), UKB_FLAIR.format(eid=eid)]
        if _present(root, image, eid):
            cases.append({"id": eid, "image": image})
    return _finish(cases, root, "UK Biobank")


def _brats_case(root: Path, folder: Path) -> dict | None:
    """The datalist entry of one BraTS case folder, or None when it is not a case or lacks a file."""
    for pattern, sep, suffixes in BRATS_NAMING:
        if pattern.fullmatch(folder.name):
            files = [f"{folder.name}/{folder.name}{sep}{suffix}.nii.gz" for suffix in suffixes]
            if not _present(root, files, folder.name):
                return None
            return {"id": folder.name, "image": files[:4], "label": files[4]}
    return None


def find_brats_cases(root: str | Path) -> list[dict]:
    """BraTS case folders directly in ``root`` (2021 ``BraTS2021_00000`` or 2023+ ``BraTS-GLI-00000-000``).

    Returns ``[{"id", "image": [flair, t1ce, t1, t2], "label": seg}, ...]``. BraTS 2023 files map
    t2f -> FLAIR, t1c -> T1ce, t1n -> T1, t2w -> T2; note their seg marks enhancing tumour with 3, not 4.
    """
    root = _check_root(root, "BraTS")
    cases = [case for folder in root.iterdir() if folder.is_dir() and (case := _brats_case(root, folder))]
    return _finish(cases, root, "BraTS")


def find_atlas_subjects(root: str | Path) -> list[dict]:
    """ATLAS v2.0 (BIDS) subjects anywhere under ``root``: each ``**/anat/*_T1w.nii.gz`` with its
    ``*_label-L_desc-T1lesion_mask.nii.gz`` sibling.

    Returns ``[{"id": "sub-r001s001", "image": t1w, "label": mask}, ...]``.
    """
    root = _check_root(root, "ATLAS")
    cases = []
    for t1w in root.glob(f"**/anat/*{ATLAS_T1W_SUFFIX}"):
        subject = t1w.name.split("_")[0]
        image = t1w.relative_to(root).as_posix()
        label = image[: -len(ATLAS_T1W_SUFFIX)] + ATLAS_MASK_SUFFIX
        if _present(root, [image, label], subject):
            cases.append({"id": subject, "image": image, "label": label})
    return _finish(cases, root, "ATLAS")
