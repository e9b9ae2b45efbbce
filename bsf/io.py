"""Crash-safe file writing: write a temporary file beside the target, fsync it, then rename it into place.

A write interrupted by a crash leaves only a temporary file ``.<name>.<random>.tmp`` beside its target, never a
half-written target. Such leftovers are swept: :func:`atomic_path` removes the stale ones of its own target before
writing, and :func:`sweep_stale_temp_files` clears a whole folder (the persistent data cache does at start).
A temporary file is stale once it has not been modified for :data:`STALE_TEMP_SECONDS`: a writer that is still
running keeps touching its file, so another process's write in progress is left alone. A process that owns a
folder (no one else writes those targets there, e.g. a training run in its checked ``train.output_dir``) removes
the temporary files of its own targets whatever their age (:func:`remove_own_temp_files`): repeated kills of a run
resumed within the hour would otherwise leave one behind per kill.

Importing this module needs no torch (:func:`atomic_torch_save` imports it when called).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

#: a temporary file of an atomic write untouched for this long belongs to an interrupted write
STALE_TEMP_SECONDS = 3600.0
TEMP_SUFFIX = ".tmp"


def temp_pattern(name: str) -> str:
    """The glob pattern of the temporary files that :func:`atomic_path` makes for a target called ``name``."""
    return f".{name}.*{TEMP_SUFFIX}"


def sweep_stale_temp_files(folder: str | Path, pattern: str = f".*{TEMP_SUFFIX}", older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove the files in ``folder`` matching ``pattern`` not modified for ``older_than`` seconds; returns them.

    Each removal is logged as a warning naming the file. Files that vanish or cannot be removed meanwhile
    (another process swept them first, no permission) are skipped.
    """
    return _remove_temp_files(Path(folder), pattern, cutoff=time.time() - older_than)


def remove_own_temp_files(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Remove the temporary files of atomic writes to ``folder/<name>`` for each of ``names``, whatever their age;
    returns them (each logged as a warning).

    Only for a caller that owns these targets in ``folder``, so that no other writer of them can be running: an
    interrupted write of its own (a killed earlier run) is all such a file can be. Other temporary files in the
    folder (other targets) are left to the age-based :func:`sweep_stale_temp_files`.
    """
    return [path for name in names for path in _remove_temp_files(Path(folder), temp_pattern(name), cutoff=math.inf)]


def _remove_temp_files(folder: Path, pattern: str, cutoff: float) -> list[Path]:
    """Remove the files in ``folder`` matching ``pattern`` modified before ``cutoff`` (a time stamp); returns them."""
    removed = []
    for path in folder.glob(pattern):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
                log.warning("removed %s, left by an interrupted write", path)
        except OSError:
            continue
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it is fsynced and replaces ``path``, on error removed.

    Raises :class:`IsADirectoryError` naming ``path`` before anything is written when ``path`` is a folder.
    Stale temporary files of earlier, interrupted writes to ``path`` are removed first.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, expected a file name", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temp_files(target.parent, temp_pattern(target.name))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)


def _fsync_file(path: str | Path) -> None:
    """Flush ``path``'s content to disk (whoever wrote it, with whatever writer)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)
