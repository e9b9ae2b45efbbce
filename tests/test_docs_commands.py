"""Every command the guides show is one the program takes: each ``bsf`` line of their shell blocks parses with
``bsf``'s own parser (``torchrun -m bsf.train`` with the trainer's), its run config and ``key=value`` settings load,
and the job folders, scripts and make targets it names exist. Documentation and program cannot drift apart."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from bsf.cli import build_parser
from bsf.config import load_config

ROOT = Path(__file__).resolve().parents[1]
GUIDES = ["README.md", "sites/README.md", "jobs/README.md", "provisioning/README.md", "benchmarks/README.md",
          *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
#: a word that stands for something the reader fills in: <job id>, [--split ...], HOST:...
PLACEHOLDER = re.compile(r"^\[|\]$")
PLACEHOLDER_IN_LINE = re.compile(r"<[^>]+>")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def _shell_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every line in the file's ``bash`` blocks, continuation lines joined."""
    out, in_block, pending, start = [], False, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip().startswith("```"):
            in_block = line.strip() == "```bash"
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for guide in GUIDES:
        for number, line in _shell_lines(ROOT / guide):
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            while words and ENV_ASSIGNMENT.match(words[0]):
                words = words[1:]
            if words and not PLACEHOLDER_IN_LINE.search(line) and not any(PLACEHOLDER.search(w) for w in words):
                found.append((f"{guide}:{number}", words))
    return found


COMMANDS = _commands()
BSF = [(where, words[1:]) for where, words in COMMANDS if words[0] in ("bsf", ".venv/bin/bsf")]


def test_the_guides_show_commands():
    assert len(BSF) > 40 and any(words[:1] == ["train"] for _, words in BSF)


@pytest.mark.parametrize("where, argv", BSF, ids=[where for where, _ in BSF])
def test_each_bsf_command_parses_and_its_settings_load(where, argv):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `bsf {' '.join(argv)}` is not a command bsf takes")
    config, overrides = getattr(args, "config", None), getattr(args, "overrides", None)
    if argv[0] in ("train", "config") and config:
        load_config(config, list(overrides or []))


def test_each_torchrun_command_runs_the_trainer_with_settings_that_load():
    import argparse

    from bsf.console import add_train_arguments

    lines = [(where, words) for where, words in COMMANDS if words[0] == "torchrun"]
    assert lines
    for where, words in lines:
        assert "-m" in words and words[words.index("-m") + 1] == "bsf.train", where
        parser = argparse.ArgumentParser()
        add_train_arguments(parser)
        args = parser.parse_args(words[words.index("-m") + 2:])
        load_config(args.config, args.overrides)


def test_job_folders_scripts_and_targets_named_exist():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    for where, words in COMMANDS:
        if words[:2] == ["nvflare", "simulator"]:
            assert (ROOT / words[2] / "meta.json").is_file(), f"{where}: no job folder {words[2]}"
        elif words[0] in ("python", "python3", ".venv/bin/python") and words[1:2] and words[1].endswith(".py"):
            assert (ROOT / words[1]).is_file(), f"{where}: no script {words[1]}"
        elif words[0] == "make":
            assert set(words[1:]) <= targets, f"{where}: make {' '.join(words[1:])}: no such target"
