"""An experiment's cases: read a datalist (or index a data folder), split by fold, draw seeded few-shot subsets.

Runs never read the experiment's datalist directly: each gets its own ``RUN_DIR/datalist.json`` with absolute
paths, its training cases under ``training`` and its held-out cases under ``validation``
(:meth:`ExperimentCases.run_datalist`), so training validates on, and :mod:`bsf.evaluate` scores, exactly
the held-out cases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bsf.data.cases import fold_split, list_cases
from bsf.data.index import case_id, index_dataset
from bsf.errors import DataError
from bsf.io import atomic_write_json

log = logging.getLogger(__name__)

Case = dict[str, Any]
HEADER_KEYS = ("dataset", "modalities", "labels")


@dataclass
class ExperimentCases:
    """The cases of one experiment, paths absolute."""

    path: Path  # the datalist they came from
    header: dict[str, Any]  # dataset, modalities, labels (as in the datalist)
    training: list[Case]
    validation: list[Case] | None  # the datalist's held-out list (ATLAS, UKB), None for BraTS (folds)

    @property
    def dataset(self) -> str:
        return self.header["dataset"]

    @property
    def all_cases(self) -> list[Case]:
        return self.training + (self.validation or [])

    def fold(self, fold: int) -> tuple[list[Case], list[Case]]:
        """(training, validation) of BraTS fold ``fold``: validation is the fold, training the other folds."""
        return fold_split(self.all_cases, fold, f"datalist {self.path}")

    def held_out(self) -> tuple[list[Case], list[Case]]:
        """(training, validation) from the datalist's own validation list."""
        if not self.validation:
            raise DataError(f"datalist {self.path}: has no 'validation' list to hold out (BraTS: use --fold K)")
        return self.training, self.validation

    def run_datalist(self, training: list[Case], validation: list[Case]) -> dict[str, Any]:
        """The datalist of one run (``training`` / ``validation``, absolute paths, this experiment's header)."""
        return {**{k: self.header[k] for k in HEADER_KEYS if k in self.header}, "training": training, "validation": validation}


def experiment_cases(dataset: str, *, datalist: str | None, root: str | None, out: Path) -> ExperimentCases:
    """The experiment's cases (:func:`bsf.data.cases.list_cases`): ``datalist`` as given, or ``root`` indexed now
    into ``out/datalist.json``.

    BraTS folders get the official 5-fold split (:mod:`bsf.data.folds`); ATLAS folders a seeded held-out set.
    """
    if bool(datalist) == bool(root):
        raise DataError("give exactly one of --datalist FILE and --root FOLDER")
    if root:
        result = index_dataset(dataset, root)
        for note in result.notes:
            log.info("index %s: %s", root, note)
        datalist = str(out / "datalist.json")
        atomic_write_json(result.datalist, datalist)
    listed = list_cases(dataset, datalist=datalist)
    return ExperimentCases(listed.datalist, listed.header, listed.training, listed.validation)


def subset(cases: list[Case], percent: float, seed: int) -> list[Case]:
    """``percent`` % of ``cases`` (rounded, at least 1), drawn by a permutation seeded with ``seed``.

    The same seed orders the cases the same way for every percentage, so a seed's smaller subsets are
    contained in its larger ones (as in a nested few-shot design). Order within the subset follows ``cases``.
    """
    if not 0 < percent <= 100:
        raise DataError(f"few-shot percentage {percent:g} must be in (0, 100]")
    count = max(1, int(round(len(cases) * percent / 100)))
    order = np.random.default_rng(seed).permutation(len(cases))[:count]
    return [cases[i] for i in sorted(order.tolist())]


def ids(cases: list[Case]) -> list[str]:
    return [case_id(c) for c in cases]
