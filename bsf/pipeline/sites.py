"""Sites by data set for the drivers (the simulator chain, the POC runner): ``--sites ukb=1,brats=2,atlas=1``.

A driver's sites are named after the data set they hold (``ukb-1``, ``brats-1``, ``brats-2``, ``atlas-1``); a
stage runs at the sites of its data sets (:attr:`bsf.federation.stages.Stage.datasets`), so a stage across data
sets (``stage2_all``) runs at all of them, each site training on its own data with its own modalities. Each
site's configuration (:func:`site_entry`) names its data set and the modalities it holds (the data set's full
set, :data:`bsf.data.index.MODALITIES`), as a hospital's ``sites/*.yaml`` does.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from bsf.data.index import MODALITIES
from bsf.errors import BSFError
from bsf.federation.stages import Stage

DATASETS = tuple(MODALITIES)  # ukb, brats, atlas


def parse_sites(text: str) -> dict[str, int]:
    """``"ukb=1,brats=2"`` -> ``{"ukb": 1, "brats": 2}`` (an ``argparse`` type: a malformed part is a usage error)."""
    sites: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition("=")
        if not sep or not count.strip().isdigit():
            raise argparse.ArgumentTypeError(f"--sites: {part!r} is not DATASET=N")
        sites[name.strip()] = int(count)
    return sites


def site_option(text: str) -> list[str] | dict[str, str]:
    """``--sites`` of ``bsf deploy poc``: ``N`` (sites site-1 .. site-N, each running every stage) or
    ``DATASET=N,...`` (site -> data set, :func:`site_datasets`). An ``argparse`` type."""
    if text.strip().isdigit():
        return [f"site-{i + 1}" for i in range(int(text))]
    try:
        return site_datasets(parse_sites(text))
    except BSFError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def site_datasets(counts: Mapping[str, int]) -> dict[str, str]:
    """Site name -> its data set, ``counts[dataset]`` sites per data set (``{"brats": 2}`` -> brats-1, brats-2).

    Raises:
        BSFError: a data set that is not ukb, brats or atlas.
    """
    unknown = sorted(set(counts) - set(DATASETS))
    if unknown:
        raise BSFError(f"--sites: unknown data set(s) {unknown}; use {', '.join(DATASETS)}")
    return {f"{dataset}-{i + 1}": dataset for dataset in DATASETS for i in range(counts.get(dataset, 0))}


def stage_sites(stage: Stage, datasets: Mapping[str, str]) -> list[str]:
    """The sites (of ``site -> data set``) that take part in ``stage``: those of its data sets, in their order.

    Raises:
        BSFError: no site holds any of the stage's data sets.
    """
    sites = [site for dataset in stage.datasets for site, held in datasets.items() if held == dataset]
    if not sites:
        needed = " or ".join(f"{d}=N" for d in stage.datasets)
        raise BSFError(f"{stage.name} runs at {' and '.join(stage.datasets)} sites and there are none: add --sites {needed}")
    return sites


def site_entry(dataset: str, **data: Any) -> dict[str, Any]:
    """A site configuration's mapping for a site holding ``dataset``: its data set, its modalities, and ``data``."""
    return {"data": {"dataset": dataset, "modalities": list(MODALITIES[dataset]), **data}}
