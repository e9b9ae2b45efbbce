"""How every ``bsf`` entry point meets the user: one-line errors instead of tracebacks, and the shared train arguments.

``bsf`` (:mod:`bsf.cli`) and ``torchrun -m bsf.train`` both use these, so neither imports the other.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any, Callable

from bsf.errors import BSFError

log = logging.getLogger("bsf")


#: OS errors that mean a path the user gave (an argument, a config value, a folder under it) is wrong, not a bug
USER_PATH_ERRORS = (IsADirectoryError, NotADirectoryError, FileNotFoundError, FileExistsError, PermissionError)


#: the signals that stopped the running command (empty: none came)
_stopped_by: list[int] = []


def _stop(signum: int, frame: Any) -> None:
    """SIGTERM as Ctrl-C: the command unwinds (NVFlare's simulator kills its processes on KeyboardInterrupt)."""
    _stopped_by.append(signum)
    raise KeyboardInterrupt


def run_guarded(action: Callable[[], Any]) -> int:
    """Run ``action``; a user error becomes one line ``error: <message>`` on stderr and exit code 2.

    User errors: a :class:`BSFError`, and an OS error of :data:`USER_PATH_ERRORS` about a named path (an output
    path that is a folder, an unreadable file, a folder where a file should be). Anything else is a bug and keeps
    its traceback. SIGTERM stops the command as Ctrl-C does (a simulation with its server and site processes
    included): one line ``stopped by SIGTERM`` and exit code 143, whatever the unwinding raised on its way out.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _stopped_by.clear()
    main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = signal.signal(signal.SIGTERM, _stop) if main_thread else None
    try:
        code = _run(action)
    except BaseException:
        if not _stopped_by:
            raise
        log.debug("unwinding after SIGTERM", exc_info=True)
        code = None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if _stopped_by:
        print("stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    return code


def _run(action: Callable[[], Any]) -> int:
    try:
        action()
    except BSFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except USER_PATH_ERRORS as exc:
        if exc.filename is None:
            raise
        log.debug("user path error", exc_info=True)  # the traceback, for a logger set to DEBUG
        print(f"error: {path_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _stopped_by:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def path_error_message(exc: OSError) -> str:
    """``<path>: <what is wrong>`` for an OS error about a path (both paths of a failed rename or copy)."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{paths}: {(exc.strerror or type(exc).__name__).lower()}"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file or shipped preset name (see `bsf presets`)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint_last.pt when present")
    parser.add_argument("--force", action="store_true",
                        help="start over in a train.output_dir that holds an earlier run, replacing it (--resume continues it instead)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=200")
