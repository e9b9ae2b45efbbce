"""How every ``bsf`` entry point meets the user: one-line errors instead of tracebacks, and the shared train arguments.

``bsf`` (:mod:`bsf.cli`) and ``torchrun -m bsf.train`` both use these, so neither imports the other.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import signal
import sys
import threading
from typing import Any, Callable, Sequence

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


# ------------------------------------------------------------------------------------ argparse pieces
def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (a bad value is one usage line naming the option)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive (give 1 or more)")
    return value


def non_negative_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 0."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative (give 0 or more)")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def number_list(
    kind: type = int,
    *,
    ranges: bool = False,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    distinct: bool = False,
    example: str = "0,1,2",
) -> Callable[[str], list]:
    """An ``argparse`` type for a comma-separated list of numbers, e.g. ``--labels 0,1,2,4``; returns the list.

    ``kind``: ``int`` or ``float``; ``ranges``: also ``A-B`` for A, A+1, ..., B (integers, e.g. ``--folds 0-4``);
    ``minimum``/``maximum``: inclusive bounds, ``above``: exclusive lower bound; ``distinct``: no number twice.
    Blank items (``0,1,``) are skipped. A bad item becomes argparse's one usage line naming the option and the item,
    e.g. ``argument --labels: 'x' in '0,1,x' is not an integer``.
    """
    noun = "an integer" if kind is int else "a number"
    if ranges:
        noun += " or a range like 0-4"

    def parse(text: str) -> list:
        numbers: list = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            within = "" if item == text.strip() else f" in {text!r}"
            dash = item.find("-", 1) if ranges and kind is int else -1  # 1: a leading "-" is a sign
            try:
                if dash > 0:
                    low, high = int(item[:dash]), int(item[dash + 1:])
                    if high < low:
                        raise argparse.ArgumentTypeError(f"range {item!r}{within} is empty; give the low end first ({high}-{low})")
                    values = list(range(low, high + 1))
                else:
                    values = [kind(item)]
            except ValueError:
                raise argparse.ArgumentTypeError(f"{item!r}{within} is not {noun}") from None
            for value in values:
                if isinstance(value, float) and not math.isfinite(value):
                    raise argparse.ArgumentTypeError(f"{item!r}{within} is not a finite number")
                low = minimum is not None and value < minimum or above is not None and value <= above
                if low or maximum is not None and value > maximum:
                    raise argparse.ArgumentTypeError(f"{_shown(value)}{within} is out of range: {_bounds(minimum, above, maximum)}")
                if distinct and value in numbers:
                    raise argparse.ArgumentTypeError(f"{_shown(value)} is given twice in {text!r}")
                numbers.append(value)
        if not numbers:
            raise argparse.ArgumentTypeError(f"{text!r} holds no number; give a comma-separated list like {example}")
        return numbers

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _shown(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _bounds(minimum: float | None, above: float | None, maximum: float | None) -> str:
    low = f"> {_shown(above)}" if above is not None else f">= {_shown(minimum)}" if minimum is not None else ""
    high = f"<= {_shown(maximum)}" if maximum is not None else ""
    return "each number must be " + " and ".join(part for part in (low, high) if part)


class IntermixedArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that takes its positionals anywhere among the options (``parse_intermixed_args``), so
    ``bsf site check SITE.yaml --config C data.root=/x`` and ``bsf site check SITE.yaml data.root=/x --config C``
    read alike (plain argparse refuses ``key=value`` items after an option that follows the first positional).

    For the subcommands of a subparsers group (``add_subparsers(parser_class=IntermixedArgumentParser)``): argparse
    hands a subcommand its arguments through ``parse_known_args``, which this class answers intermixed. A parser
    with a subcommand or ``REMAINDER`` positional of its own falls back to plain parsing.
    """

    _parsing_intermixed = False

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        if self._parsing_intermixed or any(a.nargs in (argparse.PARSER, argparse.REMAINDER) for a in self._get_positional_actions()):
            return super().parse_known_args(args, namespace)
        self._parsing_intermixed = True  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing_intermixed = False


_REST_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)\s*(?:<[^`>]*>)?`")


def plain_text(docstring: str | None) -> str:
    """A docstring in reST, as plain text for ``--help``: ````code```` -> ``code``, ``:func:`a.b``` -> ``a.b``
    (``~a.b`` -> ``b``; ``text <target>`` -> ``text``), a literal-block ``::`` -> ``:``; the layout is kept."""
    text = (docstring or "").strip("\n")

    def role(match: re.Match) -> str:
        name = match.group(1)
        return name.rsplit(".", 1)[-1] if match.group(0).split("`", 1)[1].startswith("~") else name

    text = _REST_ROLE.sub(role, text)
    text = re.sub(r"``(.+?)``", r"\1", text)
    text = re.sub(r"(?m)^[ \t]*::[ \t]*(?:\n[ \t]*(?=\n)|$)\n?", "", text)  # a "::" line, and a blank one after it
    text = re.sub(r"(?m)(\S)::$", r"\1:", text)
    return text
