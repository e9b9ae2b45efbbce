"""Datalists: index a data set's folder into a MONAI-style datalist JSON, and read one back.

A datalist written here looks like::

    {
      "dataset": "brats",                     # ukb | brats | atlas
      "root": "/data/BraTS2021",              # where the relative paths point (informational default)
      "modalities": ["flair", "t1ce", "t1", "t2"],   # names of the "image" files, in channel order
      "labels": [0, 1, 2, 4],                 # allowed label values (BraTS 2021; 2023+ use 3 for ET)
      "training":   [{"id": ..., "image": [...], "label": ..., "fold": 0}, ...],
      "validation": [...],                    # ATLAS/UKB: seeded held-out set; BraTS: fold K with --fold K
      "index": {...}                          # what the indexer did: rule, counts, skipped cases
    }

MONAI's ``load_decathlon_datalist`` reads it as is (extra keys are ignored). Paths are relative to the root.

Rules (from the paper): UKB keeps subjects with both T1w and FLAIR of at least ``min_slices`` (100)
slices each, read from the NIfTI headers only; BraTS assigns the official 5-fold split
(:mod:`bsf.data.folds`); ATLAS holds out a seeded validation set of 100 subjects.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from bsf.data.folds import load_folds
from bsf.data.labels import ATLAS_LABELS, BRATS21_LABELS, BRATS23_LABELS
from bsf.data.layouts import find_atlas_subjects, find_brats_cases, find_ukb_subjects
from bsf.errors import DataError

log = logging.getLogger(__name__)

Case = dict[str, Any]

FINDERS = {"ukb": find_ukb_subjects, "brats": find_brats_cases, "atlas": find_atlas_subjects}
#: channel names of the "image" files, in the order the layouts list them
MODALITIES = {"ukb": ["t1", "flair"], "brats": ["flair", "t1ce", "t1", "t2"], "atlas": ["t1"]}
UKB_MIN_SLICES = 100
DEFAULT_VAL_COUNT = {"ukb": 100, "atlas": 100}
#: problems named in a datalist's error before "... and N more"
SHOWN_PROBLEMS = 10


@dataclass
class IndexResult:
    datalist: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # human-readable lines about what was left out and why


def case_id(case: Case) -> str:
    """A case's id: its ``id`` key, else the folder of its first image file."""
    if case.get("id"):
        return str(case["id"])
    image = case.get("image")
    first = image[0] if isinstance(image, list) and image else image
    return Path(str(first)).parent.name or str(first)


def _files(case: Case) -> list[str]:
    image = case["image"]
    return list(image) if isinstance(image, list) else [image]


def count_slices(path: Path) -> int:
    """Number of slices along the third voxel axis, from the header alone (0 for a 2-D image)."""
    try:
        shape = nib.load(path).shape
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported with the file's name
        raise DataError(f"{path}: cannot read NIfTI header ({type(exc).__name__}: {exc})") from None
    return int(shape[2]) if len(shape) >= 3 else 0


def _ukb_rule(cases: list[Case], root: Path, min_slices: int, workers: int) -> tuple[list[Case], list[str]]:
    """Keep subjects whose T1w and FLAIR both have >= ``min_slices`` slices; notes for the others."""

    def slices(case: Case) -> list[int | str]:
        out: list[int | str] = []
        for rel in _files(case):
            try:
                out.append(count_slices(root / rel))
            except DataError as exc:
                out.append(str(exc))
        return out

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        counts = list(pool.map(slices, cases))
    kept, notes = [], []
    for case, per_file in zip(cases, counts):
        bad = [f"{rel} ({n if isinstance(n, int) else n})" for rel, n in zip(_files(case), per_file) if not isinstance(n, int) or n < min_slices]
        if bad:
            notes.append(f"{case['id']}: left out, fewer than {min_slices} slices or unreadable: {', '.join(bad)}")
        else:
            kept.append(case)
    return kept, notes


def held_out(cases: list[Case], count: int, seed: int) -> tuple[list[Case], list[Case], int]:
    """Seeded split into (training, validation); validation has ``count`` cases, or at most half of them."""
    n_val = min(count, len(cases) // 2)
    order = np.random.default_rng(seed).permutation(len(cases))
    val_idx = set(order[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in val_idx], [c for i, c in enumerate(cases) if i in val_idx], n_val


def _fold_of_unlisted(case: str, n_folds: int) -> int:
    """A stable fold for a case the split does not list (crc32 of its id)."""
    return zlib.crc32(case.encode()) % n_folds


def _brats_labels(cases: list[Case]) -> list[int]:
    return BRATS23_LABELS if cases and cases[0]["id"].startswith("BraTS-") else BRATS21_LABELS


def index_dataset(
    dataset: str,
    root: str | Path,
    *,
    min_slices: int = UKB_MIN_SLICES,
    val_count: int | None = None,
    seed: int = 0,
    fold: int | None = None,
    folds_file: str | Path | None = None,
    workers: int = 4,
) -> IndexResult:
    """Find ``dataset``'s cases under ``root`` and build its datalist (see the module docstring).

    ``val_count``: size of the seeded held-out validation set (UKB, ATLAS; default 100, reduced to half the
    cases when there are fewer). BraTS: every case gets ``fold``; with ``fold=K`` training is the other folds
    and validation fold K. Cases on disk but not in the split get a stable fold from their id and are noted.
    """
    if dataset not in FINDERS:
        raise DataError(f"unknown data set {dataset!r}: choose one of {', '.join(FINDERS)}")
    root = Path(root)
    cases = FINDERS[dataset](root)
    notes: list[str] = []
    info: dict[str, Any] = {"found": len(cases)}
    datalist: dict[str, Any] = {"dataset": dataset, "root": str(root.resolve()), "modalities": MODALITIES[dataset]}
    if dataset == "ukb":
        cases, rule_notes = _ukb_rule(cases, root, min_slices, workers)
        notes += rule_notes
        info.update(rule=f"T1w and FLAIR present, >= {min_slices} slices each (third axis, from headers)", left_out=len(rule_notes))
        if not cases:
            raise DataError(f"{root}: no UK Biobank subject has T1w and FLAIR with >= {min_slices} slices")
    if dataset in ("ukb", "atlas"):
        if dataset == "atlas":
            datalist["labels"] = ATLAS_LABELS
        wanted = DEFAULT_VAL_COUNT[dataset] if val_count is None else val_count
        training, validation, n_val = held_out(cases, wanted, seed)
        if n_val < wanted:
            notes.append(f"validation: {n_val} case(s) held out instead of {wanted} (only {len(cases)} cases)")
        info.update(validation=f"seeded held-out set of {n_val} (seed {seed})")
        datalist.update(training=training, validation=validation)
    else:
        datalist["labels"] = _brats_labels(cases)
        training, validation, fold_info, fold_notes = _brats_folds(cases, fold, folds_file)
        notes += fold_notes
        datalist["folds"] = fold_info
        datalist["training"] = training
        if validation is not None:
            datalist["validation"] = validation
    info.update(training=len(datalist["training"]), validation=len(datalist.get("validation", [])))
    datalist["index"] = info
    return IndexResult(datalist, notes)


def _brats_folds(
    cases: list[Case], fold: int | None, folds_file: str | Path | None
) -> tuple[list[Case], list[Case] | None, dict[str, Any], list[str]]:
    table = load_folds(folds_file)
    n_folds = max(table.values()) + 1
    if fold is not None and not 0 <= fold < n_folds:
        raise DataError(f"--fold {fold}: the split has folds 0..{n_folds - 1}")
    on_disk = {c["id"] for c in cases}
    unlisted = sorted(on_disk - set(table))
    absent = sorted(set(table) - on_disk)
    out = []
    for case in cases:
        out.append({**case, "fold": table.get(case["id"], _fold_of_unlisted(case["id"], n_folds))})
    notes = []
    if unlisted:
        notes.append(
            f"{len(unlisted)} case(s) on disk are not in the split and got a fold from their id: "
            + ", ".join(unlisted[:10]) + (" ..." if len(unlisted) > 10 else "")
        )
    if absent:
        notes.append(
            f"{len(absent)} case(s) of the split are not on disk: " + ", ".join(absent[:10]) + (" ..." if len(absent) > 10 else "")
        )
    info = {
        "source": str(folds_file) if folds_file else "BraTS 2021 5-fold split (SwinUNETR / BrainSegFounder), shipped table",
        "n_folds": n_folds,
        "fold": fold,
        "per_fold": [sum(c["fold"] == k for c in out) for k in range(n_folds)],
        "not_in_split": unlisted,
        "missing_from_disk": len(absent),
    }
    if fold is None:
        return out, None, info, notes
    return [c for c in out if c["fold"] != fold], [c for c in out if c["fold"] == fold], info, notes


# ------------------------------------------------------------------------------------------- reading
@dataclass
class Datalist:
    """A datalist file read back: its content, the folder its relative paths resolve against, and its cases."""

    path: Path
    base: Path
    content: dict[str, Any]
    training: list[Case]
    validation: list[Case] | None

    @property
    def dataset(self) -> str | None:
        return self.content.get("dataset")

    @property
    def all_cases(self) -> list[Case]:
        return self.training + (self.validation or [])


def read_datalist(
    path: str | Path, root: str | Path | None = None, *, default_root: str | Path | None = None, allow_shared: bool = False
) -> Datalist:
    """Read a datalist JSON and find the folder its relative paths resolve against.

    ``root`` (a ``--root`` the user gave for this command) is the only folder tried. Otherwise the folders tried, in
    order, are the file's ``"root"``, the file's own folder, then ``default_root`` (a run config's ``data.root``): the
    first that holds the files of the first listed cases wins, so a datalist means what it says whatever a preset's
    default root is. A datalist whose paths are all absolute needs no folder.

    Raises :class:`DataError` naming the file for a missing/unreadable/invalid file, an empty ``training``
    list, an entry without ``image`` or with a path that is not a string, a case listed twice (same ``id`` or same
    image file, :func:`duplicate_cases`), a case in both ``training`` and ``validation`` (:func:`shared_cases`; with
    ``allow_shared`` only logged as a warning: scoring a model on cases it may have trained on is the caller's
    choice), and in one line for relative paths found under none of the folders tried (naming each of them).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"datalist {path}: no such file")
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"datalist {path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"datalist {path}: not valid JSON ({exc})") from None
    if not isinstance(content, dict):
        raise DataError(f"datalist {path}: top level must be a JSON object with a 'training' list")
    lists: dict[str, list[Case]] = {}
    for key in ("training", "validation"):
        entries = content.get(key, [])
        if not isinstance(entries, list):
            raise DataError(f"datalist {path}: '{key}' must be a list")
        for i, entry in enumerate(entries):
            _check_entry(entry, f"datalist {path}: {key} entry {i}")
        lists[key] = entries
    if not lists["training"]:
        raise DataError(f"datalist {path}: no cases under 'training' (empty datalist)")
    validation = lists["validation"] if "validation" in content else None
    # duplicates are the same under any folder: checked before the files are looked for
    _check_splits(Datalist(path, path.parent, content, lists["training"], validation), allow_shared)
    base = _find_base(path, content, lists["training"] + (validation or []), root, default_root)
    return Datalist(path, base, content, lists["training"], validation)


def _check_entry(entry: Any, where: str) -> None:
    """DataError naming ``where`` unless ``entry`` is a case: an ``image`` path or non-empty list of paths, and at
    most one ``label`` path, each a string."""
    if not isinstance(entry, dict) or not entry.get("image"):
        raise DataError(f"{where} has no 'image'")
    for key in ("image", "label"):
        value = entry.get(key)
        if value is None and key == "label":
            continue
        paths = value if isinstance(value, list) and key == "image" else [value]
        bad = [p for p in paths if not isinstance(p, str) or not p]
        if bad:
            raise DataError(f"{where}: '{key}' must be {'a path or a list of paths' if key == 'image' else 'a path'} (strings), got {bad[0]!r}")


#: cases whose files decide which candidate folder a datalist's relative paths resolve against
PROBED_CASES = 5


def _find_base(path: Path, content: dict[str, Any], cases: list[Case], root: str | Path | None, default_root: str | Path | None) -> Path:
    """The folder ``cases``' relative paths resolve against (see :func:`read_datalist`)."""
    if root:
        candidates = [(Path(root), "--root")]
    else:
        stated = [(Path(str(content["root"])), "its 'root'")] if content.get("root") else []
        fallback = [(Path(default_root), "data.root")] if default_root else []
        candidates = [*stated, (path.parent, "its folder"), *fallback]
    relative = [f for case in cases[:PROBED_CASES] for f in _case_files(case) if not Path(f).is_absolute()]
    if not relative:
        return candidates[0][0]
    hits = [sum((base / f).exists() for f in relative) for base, _ in candidates]
    best = max(range(len(candidates)), key=lambda i: (hits[i], -i))
    if hits[best] == 0:
        tried = ", ".join(f"{base} ({why})" for base, why in candidates)
        raise DataError(
            f"datalist {path}: its relative paths (e.g. {relative[0]}) are under none of: {tried}; "
            + ("set data.root to the folder that holds them" if default_root and not root else "give the folder that holds them with --root")
        )
    return candidates[best][0]


def _case_files(case: Case) -> list[str]:
    """Every file a case names: its image files and its label."""
    return _files(case) + ([case["label"]] if case.get("label") else [])


def _check_splits(listing: Datalist, allow_shared: bool) -> None:
    """DataError for cases listed twice, and for cases in both lists unless ``allow_shared`` (then a warning)."""
    training = [absolute(c, listing.base) for c in listing.training]
    validation = [absolute(c, listing.base) for c in listing.validation or []]
    problems = [f"{key}: {text}" for key, cases in (("training", training), ("validation", validation)) for text in duplicate_cases(cases)]
    shared = shared_cases(training, validation)
    if shared and not allow_shared:
        problems.append(shared)
    if problems:
        more = f"; ... and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise DataError(f"datalist {listing.path}: " + "; ".join(problems[:SHOWN_PROBLEMS]) + more)
    if shared:
        log.warning("datalist %s: %s", listing.path, shared)


def _identity(case: Case) -> list[str]:
    """What makes two entries the same case: its explicit ``id`` (when given) and each of its image files."""
    keys = [f"id {case['id']}"] if case.get("id") else []
    return keys + [f"image {os.path.normpath(f)}" for f in _files(case)]


def duplicate_cases(cases: Sequence[Case]) -> list[str]:
    """One line per pair of entries of ``cases`` that are the same case (same id, or a shared image file), naming both."""
    first: dict[str, int] = {}
    out = []
    for j, case in enumerate(cases):
        clashes: dict[int, str] = {}
        for key in _identity(case):
            i = first.setdefault(key, j)
            if i != j:
                clashes.setdefault(i, key)
        out += [f"entries {i} and {j} are the same case ({case_id(cases[i])} and {case_id(case)}: same {key})" for i, key in clashes.items()]
    return out


def shared_cases(training: Sequence[Case], validation: Sequence[Case]) -> str | None:
    """A line naming the ``validation`` cases that are also training cases (same id or a shared image file), or None."""
    seen = {key for case in training for key in _identity(case)}
    names = [case_id(c) for c in validation if seen.intersection(_identity(c))]
    if not names:
        return None
    more = f" ... and {len(names) - SHOWN_PROBLEMS} more" if len(names) > SHOWN_PROBLEMS else ""
    return f"{len(names)} case(s) in both 'training' and 'validation' (same id or image file): {', '.join(names[:SHOWN_PROBLEMS])}{more}"


def absolute(case: Case, base: Path) -> Case:
    """A copy of ``case`` with relative ``image``/``label`` paths joined to ``base``."""

    def resolve(p: str) -> str:
        return str(p if Path(p).is_absolute() else base / p)

    out = dict(case)
    for key in ("image", "label"):
        if key in out:
            out[key] = [resolve(p) for p in out[key]] if isinstance(out[key], list) else resolve(out[key])
    return out


def select_modalities(case: Case, names: Sequence[str], available: Sequence[str], where: str) -> Case:
    """``case`` with its image files reduced/reordered to ``names`` (channel mapping by modality name)."""
    missing = [n for n in names if n not in available]
    if missing:
        raise DataError(f"{where}: modalities {missing} not among the data set's {list(available)}")
    files = _files(case)
    if len(files) != len(available):
        raise DataError(f"{where}: case {case_id(case)} has {len(files)} image files, expected {len(available)} ({list(available)})")
    return {**case, "image": [files[available.index(n)] for n in names]}


def without(content: dict[str, Any], broken: set[str], reason: str) -> dict[str, Any]:
    """A copy of datalist ``content`` without the cases whose id is in ``broken``, noting what was removed."""
    out = dict(content)
    for key in ("training", "validation"):
        if key in content:
            out[key] = [c for c in content[key] if case_id(c) not in broken]
    out["removed"] = {"reason": reason, "cases": sorted(broken)}
    return out
