"""The one case lister: a datalist or a data folder -> absolute paths -> chosen modalities -> fold split.

Training (:func:`bsf.data.pipeline.training_split`), ``bsf site check``, ``bsf evaluate`` and the experiments
(:func:`bsf.experiments.cases.experiment_cases`) all list their cases through :func:`list_cases`, so a datalist
means the same cases, in the same channel order, to each of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from bsf.data.index import FINDERS, MODALITIES, absolute, read_datalist, select_modalities
from bsf.errors import DataError

Case = dict[str, Any]


@dataclass
class CaseList:
    """The cases of one source, paths absolute, image files in the order of ``modalities``."""

    source: str  # "datalist FILE" or "data.root FOLDER": how errors name where the cases came from
    base: Path  # the folder relative paths were resolved against
    dataset: str
    modalities: list[str]  # channel names of each case's image files
    labels: list[int] | None  # the datalist's allowed label values, None when it names none
    training: list[Case]
    validation: list[Case] | None  # None: the source holds no validation list and no fold was chosen
    datalist: Path | None = None  # the datalist file, None for a data folder

    @property
    def all_cases(self) -> list[Case]:
        return self.training + (self.validation or [])

    @property
    def header(self) -> dict[str, Any]:
        """``dataset``, ``modalities`` and (when known) ``labels``, as a datalist's top-level keys."""
        out: dict[str, Any] = {"dataset": self.dataset, "modalities": self.modalities}
        if self.labels is not None:
            out["labels"] = self.labels
        return out


def list_cases(
    dataset: str,
    *,
    datalist: str | Path | None = None,
    root: str | Path | None = None,
    modalities: Sequence[str] = (),
    fold: int | None = None,
    allow_shared: bool = False,
    datalist_root: str | Path | None = None,
) -> CaseList:
    """The cases of ``dataset`` from ``datalist``, else from the folder layout under ``root`` (``data.root``).

    A datalist's relative paths resolve against ``datalist_root`` when given (a command's ``--root``), else against
    its own ``"root"``, its folder or ``root``, whichever holds its files (:func:`bsf.data.index.read_datalist`).
    ``modalities``: keep and order the image files by these channel names (default: all, as listed).
    ``fold``: training becomes every other fold, validation this fold (:func:`fold_split`; datalists only).
    ``allow_shared``: a case in both of a datalist's lists is only warned about, not an error.
    Raises :class:`DataError` naming the datalist or folder: a datalist of another data set or with a case listed
    twice, a missing folder, an unknown modality, a fold the cases do not carry.
    """
    if datalist:
        cases = _from_datalist(dataset, datalist, datalist_root, root, allow_shared)
    else:
        cases = _from_folder(dataset, root)
        if fold is not None:
            raise DataError("data.fold needs a datalist with folds (write one with `bsf data index --dataset brats`)")
    if fold is not None:
        cases.training, cases.validation = fold_split(cases.all_cases, fold, cases.source)
    if modalities:
        cases.training = [select_modalities(c, modalities, cases.modalities, cases.source) for c in cases.training]
        if cases.validation is not None:
            cases.validation = [select_modalities(c, modalities, cases.modalities, cases.source) for c in cases.validation]
        cases.modalities = list(modalities)
    return cases


def _from_datalist(
    dataset: str, path: str | Path, root: str | Path | None, default_root: str | Path | None, allow_shared: bool
) -> CaseList:
    listing = read_datalist(path, root or None, default_root=default_root or None, allow_shared=allow_shared)
    source = f"datalist {listing.path}"
    if listing.dataset and listing.dataset != dataset:
        raise DataError(f"{source}: holds {listing.dataset} cases, {dataset} cases are needed here")
    validation = None if listing.validation is None else [absolute(c, listing.base) for c in listing.validation]
    return CaseList(
        source=source,
        base=listing.base,
        dataset=dataset,
        modalities=list(listing.content.get("modalities") or MODALITIES[dataset]),
        labels=listing.content.get("labels"),
        training=[absolute(c, listing.base) for c in listing.training],
        validation=validation,
        datalist=listing.path,
    )


def _from_folder(dataset: str, root: str | Path | None) -> CaseList:
    folder = Path(root) if root else None
    if folder is None or not folder.is_dir():
        raise DataError(f"data.root {root or '(empty)'}: no such data folder")
    found = [absolute(case, folder) for case in FINDERS[dataset](folder)]
    return CaseList(f"data.root {folder}", folder, dataset, list(MODALITIES[dataset]), None, found, None)


def fold_split(cases: list[Case], fold: int, where: str) -> tuple[list[Case], list[Case]]:
    """(training, validation) of ``cases`` by their ``fold`` key: validation is fold ``fold``, training the rest.

    ``where`` names the source in the :class:`DataError` for cases without folds or a fold none of them has.
    """
    if any("fold" not in c for c in cases):
        raise DataError(f"{where}: data.fold={fold} but its cases carry no 'fold' (index it with `bsf data index --dataset brats`)")
    folds = sorted({int(c["fold"]) for c in cases})
    if fold not in folds:
        raise DataError(f"{where}: data.fold={fold} not among its folds {folds}")
    return [c for c in cases if c["fold"] != fold], [c for c in cases if c["fold"] == fold]
