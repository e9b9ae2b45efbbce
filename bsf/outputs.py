"""Output paths that lose no file by surprise (``bsf predict``, ``evaluate``, ``export``, ``bundle export``).

Each command checks its outputs before any work: an output is never one of its inputs (also through a symbolic
link, a relative path or a hard link), an output file is not a folder, its folder can be created, and an existing
file or a non-empty folder is only replaced when the user says so (``--force``). Names derived from data (case
ids) are made safe with :func:`safe_file_name` and checked with :func:`inside` to stay in the output folder.
The writes themselves go through :mod:`bsf.io` (temporary file, fsync, rename); :func:`reported_write` turns an
operating-system failure during one into an :class:`~bsf.errors.OutputError` naming the path.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from bsf.errors import OutputError

__all__ = ["check_output_file", "check_output_folder", "inside", "reported_write", "safe_file_name", "same_file"]

#: characters kept in a name derived from data; every other run of characters becomes one "_"
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9._-]+")
#: longest kept part of a derived name (file systems allow 255 bytes; room is left for the hash and suffixes)
MAX_NAME_LENGTH = 100
_SHOWN_ENTRIES = 3


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name one file: the same inode when both exist, else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def _check_not_an_input(path: Path, inputs: Iterable[str | os.PathLike], what: str) -> None:
    for source in inputs:
        if same_file(path, source):
            raise OutputError(f"{what} {path}: is the input {source}; writing it would destroy that input (choose another path)")


def _check_creatable(folder: Path, what: str) -> None:
    """OutputError unless ``folder`` is, or can be made, a writable folder (nothing is created here)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise OutputError(f"{what}: cannot create the folder {folder}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what}: cannot create the folder {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what}: cannot create or write in the folder {folder}: {existing} is not writable")


def check_output_file(path: str | os.PathLike, *, what: str = "output", inputs: Iterable[str | os.PathLike] = (), force: bool = False) -> Path:
    """``path`` as a file that may be written now; OutputError naming it when it is one of ``inputs`` (even with
    ``force``), a folder, an existing file without ``force``, or in a folder that cannot be created."""
    path = Path(path)
    _check_not_an_input(path, inputs, what)
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a folder; give a file name")
    if (path.exists() or path.is_symlink()) and not force:
        raise OutputError(f"{what} {path}: already exists; pass --force to replace it")
    _check_creatable(path.parent, f"{what} {path}")
    return path


def check_output_folder(
    path: str | os.PathLike, *, what: str = "output folder", inputs: Iterable[str | os.PathLike] = (), force: bool = False, reuse: bool = False
) -> Path:
    """``path`` as a folder to write into; OutputError naming it when it is a file, one of ``inputs``, cannot be
    created, or already holds entries (unless ``force``, or ``reuse`` for a folder the command owns and refills)."""
    path = Path(path)
    _check_not_an_input(path, inputs, what)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path}: exists and is not a folder")
    if path.is_dir() and not (force or reuse):
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            shown = ", ".join(entries[:_SHOWN_ENTRIES]) + (", ..." if len(entries) > _SHOWN_ENTRIES else "")
            raise OutputError(f"{what} {path}: is not empty ({len(entries)} entries: {shown}); pass --force to write into it")
    _check_creatable(path, what)
    return path


def safe_file_name(name: str) -> str:
    """A file name made from ``name`` (e.g. a case id) that names a file right inside a folder.

    Letters, digits, ``.``, ``_`` and ``-`` are kept, every other run of characters (``/``, ``\\``, NUL, spaces,
    non-ASCII) becomes ``_``, leading and trailing dots, dashes and underscores go (no ``..``, no hidden file,
    nothing read as an option), and the result is cut to :data:`MAX_NAME_LENGTH`. A name that had to change gets
    the first 8 hex digits of its SHA-256, so two different names never meet in one file::

        "BraTS2021_00000" -> "BraTS2021_00000"      "../x" -> "x-<hash>"      ".." -> "case-<hash>"
    """
    cleaned = _UNSAFE_RUN.sub("_", name).strip("._-")[:MAX_NAME_LENGTH]
    if cleaned == name:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned or 'case'}-{digest}"


def inside(path: str | os.PathLike, folder: str | os.PathLike, what: str = "output") -> Path:
    """``path``, after checking that it resolves (symbolic links followed) to a place inside ``folder``."""
    path = Path(path)
    resolved, base = path.resolve(), Path(folder).resolve()
    if resolved != base and base not in resolved.parents:
        raise OutputError(f"{what} {path}: resolves to {resolved}, outside the output folder {base}")
    return path


@contextmanager
def reported_write(path: str | os.PathLike, what: str = "output") -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block (disk full, permission, a folder in the way) into an
    :class:`~bsf.errors.OutputError` naming ``path`` and the reason."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        raise OutputError(f"{what} {path}: cannot write it: {reason}{where}") from None
