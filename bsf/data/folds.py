"""The official BraTS 2021 5-fold split (SwinUNETR / BrainSegFounder), shipped as a compact table.

The source is MONAI's ``brats21_folds.json`` (1,251 cases, folds of 251/250/250/250/250): a datalist
whose every entry carries ``"fold"``. The package keeps only case number -> fold, in
``bsf/data/brats21_folds.json`` (``{"folds": [[case numbers of fold 0], ...]}``, ids ``BraTS2021_<5 digits>``).
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from bsf.errors import DataError

PACKAGE_TABLE = "brats21_folds.json"
BRATS21_ID = re.compile(r"BraTS2021_(\d{5})")
_CASE_IN_PATH = re.compile(r"(BraTS2021_\d{5}|BraTS-[A-Z]+-\d{5}-\d{3})")


def compact_table(source: Mapping[str, Any], *, origin: str = "fold file") -> dict[str, Any]:
    """The compact package table from a MONAI-style fold datalist (entries with "image" and "fold")."""
    folds = brats_folds_from_datalist(source, origin=origin)
    numbers: dict[int, list[int]] = {}
    for case_id, fold in folds.items():
        match = BRATS21_ID.fullmatch(case_id)
        if not match:
            raise DataError(f"{origin}: case {case_id} is not a BraTS 2021 id; the compact table holds only BraTS2021_<5 digits>")
        numbers.setdefault(fold, []).append(int(match.group(1)))
    return {
        "description": "BraTS 2021 5-fold split used by SwinUNETR and BrainSegFounder: folds[k] lists the case numbers "
        "of fold k (case id BraTS2021_<5-digit number>). Derived from MONAI's brats21_folds.json.",
        "n_cases": len(folds),
        "folds": [numbers.get(k, []) for k in range(max(numbers) + 1 if numbers else 0)],
    }


def brats_folds_from_datalist(source: Mapping[str, Any], *, origin: str = "fold file") -> dict[str, int]:
    """``case id -> fold`` from a MONAI-style datalist whose ``training`` entries carry ``fold``."""
    entries = source.get("training") if isinstance(source, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{origin}: expected a JSON object with a non-empty 'training' list")
    folds: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or "fold" not in entry or "image" not in entry:
            raise DataError(f"{origin}: training entry {i} lacks 'image' or 'fold'")
        first = entry["image"][0] if isinstance(entry["image"], list) else entry["image"]
        match = _CASE_IN_PATH.search(str(first))
        case_id = str(entry.get("id") or (match.group(1) if match else ""))
        if not case_id:
            raise DataError(f"{origin}: training entry {i}: no BraTS case id in {first}")
        if case_id in folds:
            raise DataError(f"{origin}: case {case_id} listed twice")
        folds[case_id] = int(entry["fold"])
    return folds


def load_folds(path: str | Path | None = None) -> dict[str, int]:
    """``case id -> fold``: the shipped BraTS 2021 table, or a fold file (compact table or MONAI datalist)."""
    if path is None:
        raw = json.loads((resources.files("bsf.data") / PACKAGE_TABLE).read_text())
        origin = f"package table {PACKAGE_TABLE}"
    else:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"fold file {path}: no such file")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"fold file {path}: not valid JSON ({exc})") from None
        origin = f"fold file {path}"
    if isinstance(raw, Mapping) and "folds" in raw:
        return {f"BraTS2021_{n:05d}": fold for fold, numbers in enumerate(raw["folds"]) for n in numbers}
    return brats_folds_from_datalist(raw, origin=origin)
