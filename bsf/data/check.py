"""Check a data set's files before training: NIfTI headers first (fast), then the voxels, in parallel.

Header stage, per file: exists, is a regular readable file, is NIfTI, is 3-D, has sane spacing and
affine, and is not truncated (the gzip trailer's size, or the file size, against what the header
describes). Per case: every modality and the label share shape, spacing and affine.
Data stage, per file: the voxels decode, hold no NaN/Inf, an image is not empty (all zero), a label
holds only the data set's values (BraTS 2021 {0,1,2,4}, BraTS 2023+ {0,1,2,3}, ATLAS {0,1}).

Every problem names the case, the file and what is wrong. :func:`check_cases` returns a
:class:`CheckReport`; the CLI prints its table, training refuses to start on its errors (or skips the
broken cases when ``data.skip_broken`` is set).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import nibabel as nib
import numpy as np
from tqdm import tqdm

from bsf.data.index import Case, case_id
from bsf.data.labels import LabelRule, label_problems, label_rule
from bsf.io import atomic_write_json

log = logging.getLogger(__name__)

ERROR, WARNING = "error", "warning"
AFFINE_TOLERANCE_MM = 1e-3
MEMO_FILE = "bsf_checked.json"
#: what an image whose every voxel is 0 is called, here and by ``bsf predict`` / ``bsf evaluate``
EMPTY_IMAGE = "empty: every voxel is 0 (no brain)"


@dataclass(frozen=True)
class Problem:
    case: str
    file: str
    problem: str
    severity: str = ERROR


@dataclass
class CheckReport:
    """What a check found over ``n_cases`` cases; ``broken`` holds the indices of cases with errors."""

    n_cases: int
    data_checked: bool
    problems: list[Problem] = field(default_factory=list)
    broken: set[int] = field(default_factory=set)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        stage = "headers and data" if self.data_checked else "headers only"
        return (
            f"checked {self.n_cases} case(s) ({stage}): {len(self.broken)} broken, "
            f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        )

    def table(self, base: Path | None = None, limit: int | None = None) -> str:
        """The problems as an aligned text table (case, severity, file, problem)."""
        rows = [("case", "severity", "file", "problem")]
        shown = self.problems if limit is None else self.problems[:limit]
        for p in shown:
            rows.append((p.case, p.severity, _short(p.file, base), p.problem))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
        if limit is not None and len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more")
        return "\n".join(lines)

    def one_line(self, limit: int = 10) -> str:
        """Errors joined on one line (for exceptions): ``file: problem; file: problem; ...``."""
        errors = self.errors
        text = "; ".join(f"{p.file or p.case}: {p.problem}" for p in errors[:limit])
        if len(errors) > limit:
            text += f"; ... and {len(errors) - limit} more (run `bsf data check` for the full table)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_cases": self.n_cases,
            "data_checked": self.data_checked,
            "broken": len(self.broken),
            "problems": [asdict(p) for p in self.problems],
        }


def _short(path: str, base: Path | None) -> str:
    if base is None or not path:
        return path
    try:
        return Path(path).relative_to(base).as_posix()
    except ValueError:
        return path


# --------------------------------------------------------------------------------------- one file
@dataclass
class _Header:
    shape: tuple[int, ...]
    zooms: tuple[float, ...]
    affine: np.ndarray


def _open_problem(path: Path) -> str | None:
    if not path.exists():
        return "missing file" if not path.is_symlink() else "broken symbolic link"
    if not path.is_file():
        return "not a regular file (a directory or device has this name)"
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except PermissionError:
        return "unreadable (permission denied)"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return None


def _gzip_problem(path: Path, expected: int) -> str | None:
    """None when the gzip stream of ``path`` decodes to at least ``expected`` bytes.

    The trailer's ISIZE field is compared first (4 bytes read); only on a mismatch is the file decoded.
    """
    try:
        with open(path, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", handle.read(4))[0]
    except OSError:
        isize = -1
    if isize == expected % 2**32:
        return None
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        return f"truncated or corrupt gzip data ({exc}); the header describes {expected} bytes"
    if total < expected:
        return f"truncated: decodes to {total} of the {expected} bytes its header describes"
    return None


def file_header(path: Path) -> tuple[_Header | None, list[tuple[str, str]]]:
    """Read one file's header. Returns the header (None if unusable) and (severity, problem) pairs."""
    problem = _open_problem(path)
    if problem:
        return None, [(ERROR, problem)]
    try:
        image = nib.load(path)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types; all mean "cannot read"
        return None, [(ERROR, f"not a readable NIfTI image ({type(exc).__name__}: {exc})")]
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        return None, [(ERROR, f"not a NIfTI image (read as {type(image).__name__})")]
    problems: list[tuple[str, str]] = []
    shape = tuple(int(n) for n in image.shape)
    if len(shape) < 3:
        return None, [(ERROR, f"{len(shape)}-D image (shape {shape}); expected a 3-D volume")]
    if len(shape) > 3:
        if all(n == 1 for n in shape[3:]):
            problems.append((WARNING, f"{len(shape)}-D image with one volume (shape {shape}); read as 3-D"))
        else:
            return None, [(ERROR, f"{len(shape)}-D image (shape {shape}); expected a 3-D volume")]
    if min(shape[:3]) < 1:
        return None, [(ERROR, f"empty shape {shape}")]
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    affine = np.asarray(image.affine, dtype=float)
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        problems.append((ERROR, f"voxel spacing {zooms} is not positive and finite"))
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        problems.append((ERROR, "affine is singular or not finite"))
    dtype = image.get_data_dtype()
    offset = int(getattr(image.dataobj, "offset", 0) or 0)
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if path.name.endswith(".gz"):
        truncation = _gzip_problem(path, expected)
    else:
        size = path.stat().st_size
        truncation = f"truncated: {size} bytes, the header describes {expected}" if size < expected else None
    if truncation:
        problems.append((ERROR, truncation))
    header = _Header(shape[:3], zooms, affine)
    return (None if any(s == ERROR for s, _ in problems) else header), problems


def read_voxels(path: Path) -> np.ndarray:
    """The voxel array of one NIfTI file (scaling applied, the file's dtype otherwise kept)."""
    return np.asanyarray(nib.load(path).dataobj)


def file_data_problems(path: Path, role: str, labels: LabelRule | None) -> list[tuple[str, str]]:
    """Decode one file and check its values. ``role`` is "image" or "label" (its values checked by ``labels``,
    :func:`bsf.data.labels.label_problems`)."""
    try:
        data = read_voxels(path)
    except Exception as exc:  # noqa: BLE001
        return [(ERROR, f"voxel data cannot be decoded ({type(exc).__name__}: {exc})")]
    problems: list[tuple[str, str]] = []
    if data.dtype.kind in "fc" and not np.isfinite(data).all():
        n_nan = int(np.isnan(data).sum())
        n_inf = int(np.isinf(data).sum())
        problems.append((ERROR, f"{n_nan} NaN and {n_inf} Inf voxel(s)"))
        return problems
    if role == "image":
        if not data.any():
            problems.append((ERROR, EMPTY_IMAGE))
        return problems
    if data.dtype.kind in "fc" and not np.array_equal(data, np.round(data)):
        return [(ERROR, "label holds non-integer values")]
    if labels is not None:
        problems += [(ERROR, text) for text in label_problems(_distinct(data), labels)]
    return problems


def _distinct(data: np.ndarray) -> list[int]:
    low, high = int(data.min()), int(data.max())
    if high - low < 1_000_000:
        counts = np.bincount((data.astype(np.int64, copy=False) - low).ravel(), minlength=high - low + 1)
        return [int(v) + low for v in np.flatnonzero(counts)]
    return [int(v) for v in np.unique(data)]


# --------------------------------------------------------------------------------------- one case
def case_files(case: Case) -> list[tuple[str, str]]:
    """(role, path) of every file of ``case``: images in channel order, then the label."""
    images = case["image"] if isinstance(case["image"], list) else [case["image"]]
    out = [("image", str(p)) for p in images]
    if case.get("label"):
        out.append(("label", str(case["label"])))
    return out


def _resolve(path: str, base: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or base is None else base / p


def case_header_problems(case: Case, base: Path | None = None) -> list[Problem]:
    """Header stage for one case, including the agreement of shape/spacing/affine across its files."""
    name = case_id(case)
    problems: list[Problem] = []
    headers: list[tuple[str, _Header]] = []
    for _, rel in case_files(case):
        header, found = file_header(_resolve(rel, base))
        problems += [Problem(name, rel, text, severity) for severity, text in found]
        if header is not None:
            headers.append((rel, header))
    if headers:
        first_rel, first = headers[0]
        for rel, header in headers[1:]:
            ref = Path(first_rel).name
            if header.shape != first.shape:
                problems.append(Problem(name, rel, f"shape {header.shape} differs from {ref} {first.shape}"))
            elif not np.allclose(header.zooms, first.zooms, atol=AFFINE_TOLERANCE_MM):
                problems.append(Problem(name, rel, f"spacing {_fmt(header.zooms)} differs from {ref} {_fmt(first.zooms)}"))
            elif not np.allclose(header.affine, first.affine, atol=AFFINE_TOLERANCE_MM):
                diff = float(np.abs(header.affine - first.affine).max())
                problems.append(Problem(name, rel, f"affine differs from {ref} (by up to {diff:.3g} mm)"))
    return problems


def _tag(role: str, labels: LabelRule | None) -> str:
    return role if role == "image" or labels is None else f"{role}[{labels.tag}]"


def _fmt(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def case_data_problems(
    case: Case, base: Path | None = None, labels: LabelRule | None = None, skip: Callable[[Path, str], bool] | None = None
) -> list[Problem]:
    """Data stage for one case; files for which ``skip(path, tag)`` is true (already verified) are not read."""
    name = case_id(case)
    problems = []
    for role, rel in case_files(case):
        path = _resolve(rel, base)
        if skip is not None and skip(path, _tag(role, labels)):
            continue
        problems += [Problem(name, rel, text, sev) for sev, text in file_data_problems(path, role, labels)]
    return problems


# --------------------------------------------------------------------------------------- many cases
def check_cases(
    cases: Sequence[Case],
    base: Path | None = None,
    *,
    data: bool = True,
    workers: int = 4,
    progress: bool = False,
    dataset: str | None = None,
    labels: Sequence[int] | None = None,
    label_format: str = "auto",
    memo_dir: Path | None = None,
) -> CheckReport:
    """Check ``cases`` (paths relative to ``base`` or absolute): all headers, then the data of cases whose
    headers passed. Runs ``workers`` threads (nibabel's gzip decoding and numpy release the GIL).

    Label values follow :func:`bsf.data.labels.label_rule` (``labels``: the values the command was given or the
    datalist names; ``label_format``: the run config's ``finetune.label_format``).

    ``memo_dir``: a folder where files that passed the data stage are remembered by path, size and
    modification time, so a later check skips reading them again.
    """
    report = CheckReport(n_cases=len(cases), data_checked=data)
    modalities = [len(c["image"]) if isinstance(c["image"], list) else 1 for c in cases]
    if modalities:
        usual = max(set(modalities), key=modalities.count)
        for i, (case, n) in enumerate(zip(cases, modalities)):
            if n != usual:
                report.problems.append(Problem(case_id(case), "", f"has {n} image file(s); the other cases have {usual}"))
                report.broken.add(i)
    header_results = _parallel(lambda c: case_header_problems(c, base), cases, workers, progress, "check headers")
    for i, found in enumerate(header_results):
        report.problems += found
        if any(p.severity == ERROR for p in found):
            report.broken.add(i)
    if data:
        memo = _Memo(memo_dir)
        todo = [i for i in range(len(cases)) if i not in report.broken]

        def run(i: int) -> list[Problem]:
            case = cases[i]
            allowed = label_rule(dataset, case_id(case), label_format=label_format, listed=labels)
            found = case_data_problems(case, base, allowed, skip=memo.passed)
            if not any(p.severity == ERROR for p in found):
                for role, rel in case_files(case):
                    memo.add(_resolve(rel, base), _tag(role, allowed))
            return found

        for i, found in zip(todo, _parallel(run, todo, workers, progress, "check data")):
            report.problems += found
            if any(p.severity == ERROR for p in found):
                report.broken.add(i)
        memo.save()
    order = {id(p): k for k, p in enumerate(report.problems)}
    report.problems.sort(key=lambda p: (p.case, order[id(p)]))
    return report


def _parallel(fn: Callable[[Any], list[Problem]], items: Sequence[Any], workers: int, progress: bool, desc: str) -> list[list[Problem]]:
    bar = tqdm(total=len(items), desc=desc, unit="case", disable=not progress or not items)
    try:
        if workers <= 1 or len(items) <= 1:
            out = []
            for item in items:
                out.append(fn(item))
                bar.update()
            return out
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(fn, item) for item in items]
            results = []
            for future in futures:
                results.append(future.result())
                bar.update()
            return results
    finally:
        bar.close()


class _Memo:
    """Files that passed the data stage: ``"<absolute path>|<role and label set>" -> [size, mtime_ns]``."""

    def __init__(self, folder: Path | None):
        self.path = Path(folder) / MEMO_FILE if folder else None
        self.known: dict[str, list[int]] = {}
        self.new: dict[str, list[int]] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.known = json.loads(self.path.read_text()).get("passed", {})
            except (OSError, ValueError):
                log.warning("ignoring unreadable check memo %s", self.path)

    @staticmethod
    def _stamp(path: Path) -> list[int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns]

    def passed(self, path: Path, tag: str) -> bool:
        return self.path is not None and self.known.get(f"{path.resolve()}|{tag}") == self._stamp(path)

    def add(self, path: Path, tag: str) -> None:
        if self.path is not None and (stamp := self._stamp(path)) is not None:
            self.new[f"{path.resolve()}|{tag}"] = stamp

    def save(self) -> None:
        if self.path is None or not self.new:
            return
        try:
            atomic_write_json({"passed": {**self.known, **self.new}}, self.path)
        except OSError as exc:
            log.warning("cannot write check memo %s (%s)", self.path, exc)
