"""The stage graph as data: what each federated stage trains, on which data, and whose global model it starts from.

::

    stage1 (ssl, ukb: t1, flair)
      +-- stage2_brats (ssl, brats: flair, t1ce, t1, t2) -- stage3_brats (finetune, brats)
      +-- stage2_atlas (ssl, atlas: t1)                   -- stage3_atlas (finetune, atlas)
      +-- stage2_all (ssl, ukb + brats + atlas: t1, t1ce, t2, flair; each site its own)
            feeds stage3_brats and stage3_atlas too (each prefers its own data set's Stage 2)
            +-- stage3_all (finetune, brats + atlas: shared body, one output head per task)

Every driver (the simulator chain, the POC runner, the one-site federation of the experiments, resume)
orders the stages with :func:`plan` and finds the model a stage starts from with :func:`start_point`:
the global model of the nearest stage up its ``follows`` lines that has one. A stage may follow several
stages, preferred first (``follows`` is a tuple): the nearest ones are tried before their own parents.
So ``stage2_atlas`` after ``stage2_brats`` starts from ``stage1``'s model, and ``stage3_brats`` listed
straight after ``stage1`` (the paper's BSF-1 arm) starts from ``stage1``'s model with ``stage1``'s
modalities, adapted to its own. A stage's ``datasets`` are those of the sites that take part: one for
the per-data-set stages; several for a stage across data sets, where each site trains on its own.
No NVFlare here: the graph is plain data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

from bsf.errors import BSFError
from bsf.federation.modality import MODALITY_ORDER


class StageError(BSFError):
    """A stage name is unknown, or a stage's starting model is missing from the stages run before it."""


@dataclass(frozen=True)
class Stage:
    """One federated stage: its kind, the data sets of its sites, its input modalities, and the stages whose global
    model it may start from (preferred first; empty: a first stage, seeded initialisation)."""

    name: str
    kind: Literal["ssl", "finetune"]
    datasets: tuple[Literal["ukb", "brats", "atlas"], ...]
    modalities: tuple[str, ...]
    follows: tuple[str, ...] = ()

    @property
    def across_datasets(self) -> bool:
        """Whether sites of several data sets take part (each training on its own data set)."""
        return len(self.datasets) > 1

    @property
    def aggregates(self) -> str:
        """The federation scope of the stage: SSL stages share the encoder only, fine-tuning the whole network."""
        return "encoder" if self.kind == "ssl" else "all"


BRATS_MODALITIES = ("flair", "t1ce", "t1", "t2")

#: The graph (parents listed before their children).
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("stage1", "ssl", ("ukb",), ("t1", "flair")),
        Stage("stage2_brats", "ssl", ("brats",), BRATS_MODALITIES, ("stage1",)),
        Stage("stage2_atlas", "ssl", ("atlas",), ("t1",), ("stage1",)),
        Stage("stage2_all", "ssl", ("ukb", "brats", "atlas"), MODALITY_ORDER, ("stage1",)),
        Stage("stage3_brats", "finetune", ("brats",), BRATS_MODALITIES, ("stage2_brats", "stage2_all")),
        Stage("stage3_atlas", "finetune", ("atlas",), ("t1",), ("stage2_atlas", "stage2_all")),
        Stage("stage3_all", "finetune", ("brats", "atlas"), MODALITY_ORDER, ("stage2_all",)),
    )
}


@dataclass(frozen=True)
class StartPoint:
    """The model a stage starts from: the global model of ``stage`` (a file) with that stage's input modalities."""

    stage: str
    model: Path
    modalities: tuple[str, ...]


def get_stage(name: str) -> Stage:
    """The stage called ``name``; a :class:`StageError` lists the stages there are."""
    try:
        return STAGES[name]
    except KeyError:
        raise StageError(f"unknown stage {name!r}; the stages are {', '.join(STAGES)}") from None


def ancestors(name: str) -> list[str]:
    """The stages up ``name``'s ``follows`` lines, nearest first, each once (``stage3_brats``: ``[stage2_brats, stage1]``).

    Breadth first: all the stages ``name`` follows (in their order of preference) before any of their parents.
    """
    line: list[str] = []
    level = list(get_stage(name).follows)
    while level:
        for stage in level:
            if stage not in line:
                line.append(stage)
        level = [parent for stage in level for parent in get_stage(stage).follows]
    return line


def plan(names: Sequence[str], available: Sequence[str] = ()) -> list[tuple[Stage, str | None]]:
    """Order ``names`` parents first; pair each stage with the stage whose model it will start from.

    ``available``: stages whose models exist already (e.g. a given Stage 1 model). A stage that follows
    another starts from the nearest one up its line that is listed before it or available; when none is,
    a :class:`StageError` says which to list. Unknown or repeated names are errors.
    """
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    if repeated:
        raise StageError(f"stage(s) listed twice: {', '.join(repeated)}")
    for name in names:
        get_stage(name)
    ordered = [STAGES[n] for n in STAGES if n in names]  # STAGES lists parents first
    have = set(available)
    steps: list[tuple[Stage, str | None]] = []
    for stage in ordered:
        line = ancestors(stage.name)
        source = next((a for a in line if a in have), None)
        if line and source is None:
            raise StageError(
                f"{stage.name} starts from the global model of {' or '.join(line)}; list one of them before it"
            )
        steps.append((stage, source))
        have.add(stage.name)
    return steps


def start_point(name: str, models: Mapping[str, str | Path]) -> StartPoint | None:
    """The model stage ``name`` starts from, given the global models of stages that ran (``stage -> file``).

    The nearest stage up ``name``'s line with a model in ``models`` (its modalities from the graph);
    ``None`` for a first stage. A stage that follows another with no model up its line: :class:`StageError`.
    """
    line = ancestors(name)
    for source in line:
        if source in models:
            return StartPoint(stage=source, model=Path(models[source]), modalities=STAGES[source].modalities)
    if line:
        raise StageError(f"{name} starts from the global model of {' or '.join(line)}, and none of them has one")
    return None
