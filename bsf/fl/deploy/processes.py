"""Find and end the processes of one local NVFlare deployment, and only those.

NVFlare's start scripts run a watchdog shell (``sub_start.sh``) that restarts the site process,
and each job runs in processes of its own session (``setsid``), so a process group alone does not
hold everything a deployment started. Every one of those processes, however, names its workspace
folder on its command line (``-m <workspace>/<participant>``): :func:`processes_under` finds them
by that (unique, temporary) folder, and :func:`kill_processes` ends exactly those process ids.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

log = logging.getLogger(__name__)


def processes_under(folder: str | os.PathLike) -> list[int]:
    """Ids of live processes whose command line names ``folder`` (or a path inside it)."""
    marker = str(Path(folder).resolve())
    own = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.decode(errors="replace").startswith(marker) for arg in args if arg):
            found.append(int(entry.name))
    return sorted(found)


def is_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def kill_processes(pids: list[int], grace_s: float = 3.0) -> list[int]:
    """SIGTERM ``pids``, then SIGKILL those still alive after ``grace_s``; returns the ids that were signalled."""
    signalled = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in pids if is_alive(p)]
        if not live:
            break
        for pid in live:
            try:
                os.kill(pid, sig)
                signalled.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(is_alive(p) for p in live):
            time.sleep(0.1)
    return sorted(set(signalled))


def kill_under(folder: str | os.PathLike, rounds: int = 3) -> list[int]:
    """End every process that names ``folder``; repeats, since a watchdog may start one meanwhile."""
    ended: set[int] = set()
    for _ in range(rounds):
        pids = processes_under(folder)
        if not pids:
            break
        log.info("ending %d process(es) of %s: %s", len(pids), folder, pids)
        ended.update(kill_processes(pids))
    return sorted(ended)
