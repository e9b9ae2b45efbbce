"""Output paths that lose no file by surprise: one rule for every file a ``bsf`` command writes.

The rule: a command never replaces a file that the same run did not create unless the user says so (``--force``),
and never one of its inputs, nor a case's own images or label, even with ``--force``.

Each command checks its outputs before any work: an output is never one of its inputs (also through a symbolic
link, a relative path or a hard link), an output file is not a folder, its folder can be created, and an existing
file or a non-empty folder is only replaced when the user says so (``--force``). :func:`check_output_file` checks
one file, :func:`check_output_files` the many files of one command (one error naming those that exist),
:func:`check_output_folder` a folder; :func:`existing_outputs` lists what a run would replace, for commands that
phrase their own refusal (``bsf train``: ``--resume`` or ``--force``). :func:`add_force_argument` is the flag. Names derived from data (case
ids) are made safe with :func:`safe_file_name` and checked with :func:`inside` to stay in the output folder.
The writes themselves go through :mod:`bsf.io` (temporary file, fsync, rename); :func:`reported_write` turns an
operating-system failure during one into an :class:`~bsf.errors.OutputError` naming the path.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from bsf.errors import OutputError

__all__ = [
    "FileSet",
    "add_force_argument",
    "check_output_file",
    "check_output_files",
    "check_output_folder",
    "existing_outputs",
    "inside",
    "reported_write",
    "safe_file_name",
    "same_file",
]

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


class FileSet:
    """Files known by identity: an output path is "in" the set when it names one of them (:func:`same_file`: the
    same inode, so also through a symbolic link or a hard link, else the same resolved path). Built once, so
    checking many outputs against many inputs costs one ``stat`` per path, not one per pair."""

    def __init__(self, paths: Iterable[str | os.PathLike] = ()) -> None:
        self._by_inode: dict[tuple[int, int], str | os.PathLike] = {}
        self._by_path: dict[Path, str | os.PathLike] = {}
        for path in paths:
            identity = _inode(path)
            if identity is not None:
                self._by_inode.setdefault(identity, path)
            self._by_path.setdefault(Path(path).resolve(), path)

    def find(self, path: str | os.PathLike) -> str | os.PathLike | None:
        """The member ``path`` names, or None."""
        if not self._by_path:
            return None
        identity = _inode(path)
        if identity is not None and identity in self._by_inode:
            return self._by_inode[identity]
        return self._by_path.get(Path(path).resolve())

    def __bool__(self) -> bool:
        return bool(self._by_path)


def _inode(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except (OSError, ValueError):  # missing, a broken link, or a name the OS refuses
        return None
    return status.st_dev, status.st_ino


def _as_file_set(files: Iterable[str | os.PathLike] | FileSet) -> FileSet:
    return files if isinstance(files, FileSet) else FileSet(files)


def _check_not_an_input(path: Path, inputs: FileSet, what: str, keep: FileSet | None = None) -> None:
    source = inputs.find(path)
    if source is not None:
        raise OutputError(f"{what} {path}: is the input {source}; writing it would destroy that input (choose another path)")
    kept = keep.find(path) if keep else None
    if kept is not None:
        raise OutputError(f"{what} {path}: is {kept}, one of the case's own files (an image or its label), "
                          "never replaced, even with --force (choose another path)")


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


def check_output_file(
    path: str | os.PathLike,
    *,
    what: str = "output",
    inputs: Iterable[str | os.PathLike] | FileSet = (),
    keep: Iterable[str | os.PathLike] | FileSet = (),
    force: bool = False,
) -> Path:
    """``path`` as a file that may be written now; OutputError naming it when it is one of ``inputs`` or of ``keep``
    (files that are not inputs but are never replaced: a case's own label and images), even with ``force``, a
    folder, an existing file (or symbolic link) without ``force``, or in a folder that cannot be created."""
    return check_output_files([path], what=what, inputs=inputs, keep=keep, force=force)[0]


def existing_outputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Those of ``paths`` that exist now (a file, a folder, or a symbolic link, even a broken one), in order."""
    return [Path(p) for p in paths if Path(p).exists() or Path(p).is_symlink()]


def _shown(paths: Sequence[object]) -> str:
    return ", ".join(str(p) for p in paths[:_SHOWN_ENTRIES]) + (", ..." if len(paths) > _SHOWN_ENTRIES else "")


def check_output_files(
    paths: Iterable[str | os.PathLike],
    *,
    what: str = "output",
    inputs: Iterable[str | os.PathLike] | FileSet = (),
    keep: Iterable[str | os.PathLike] | FileSet = (),
    force: bool = False,
) -> list[Path]:
    """Every path of ``paths`` as a file one command may write now (:func:`check_output_file` for each), with one
    OutputError, naming the first few, for all of them that exist already (without ``force``).

    The checks that ``force`` does not lift come first: one of ``inputs`` or ``keep``, a folder, a folder that
    cannot be created. So a refusal always says the real reason, and nothing is written before all are checked.
    """
    paths = [Path(p) for p in paths]
    inputs, keep = _as_file_set(inputs), _as_file_set(keep)
    creatable: set[Path] = set()
    for path in paths:
        _check_not_an_input(path, inputs, what, keep)
        if path.is_dir():
            raise OutputError(f"{what} {path}: is a folder; give a file name")
        if path.parent not in creatable:
            _check_creatable(path.parent, f"{what} {path}")
            creatable.add(path.parent)
    existing = [] if force else existing_outputs(paths)
    if len(existing) == 1:
        raise OutputError(f"{what} {existing[0]}: already exists; pass --force to replace it")
    if existing:
        raise OutputError(f"{what}: {len(existing)} of the {len(paths)} files to write already exist ({_shown(existing)}); "
                          "pass --force to replace them")
    return paths


def check_output_folder(
    path: str | os.PathLike, *, what: str = "output folder", inputs: Iterable[str | os.PathLike] = (), force: bool = False, reuse: bool = False
) -> Path:
    """``path`` as a folder to write into; OutputError naming it when it is a file, one of ``inputs``, cannot be
    created, or already holds entries (unless ``force``, or ``reuse`` for a folder whose files the command checks
    one by one, e.g. with :func:`check_output_files`)."""
    path = Path(path)
    _check_not_an_input(path, _as_file_set(inputs), what)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path}: exists and is not a folder")
    if path.is_dir() and not (force or reuse):
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            raise OutputError(f"{what} {path}: is not empty ({len(entries)} entries: {_shown(entries)}); pass --force to write into it")
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


def add_force_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """The ``--force`` flag of a command that writes files; ``help`` says what it lets the command replace (inputs,
    and a case's own images and labels, stay refused whatever it says)."""
    parser.add_argument("--force", action="store_true", help=help)
