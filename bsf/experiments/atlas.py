"""ATLAS v2.0 (paper Table 6): Stage 3 on the training cases, the four challenge metrics on the held-out cases.

The held-out cases are the datalist's validation list (``bsf data index --dataset atlas``: a seeded 100).
One run per arm and seed; the metrics (:mod:`bsf.metrics.lesions`, from 3D connected components) are per-case
means, reported as mean ± sd over seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from bsf.errors import ConfigError
from bsf.experiments import paper
from bsf.experiments.report import (
    ATLAS_METRICS,
    cell,
    group,
    markdown_table,
    metric_table,
    ordered,
    overview,
    plot_panels,
    runs_table,
    values,
    write_markdown,
)
from bsf.experiments.runner import Experiment, RunSpec


def plan(experiment: Experiment, seeds: Sequence[int]) -> list[RunSpec]:
    if experiment.cases.dataset != "atlas":
        raise ConfigError(f"the atlas protocol needs ATLAS cases, {experiment.cases.path} holds {experiment.cases.dataset}")
    training, validation = experiment.cases.held_out()
    return [
        RunSpec(
            name=f"{arm.name}_seed{seed}",
            labels={"arm": arm.name, "seed": seed},
            training=training,
            validation=validation,
            overrides=[*arm.overrides, f"seed={seed}"],
        )
        for arm in experiment.arms
        for seed in seeds
    ]


def report(experiment: Experiment, records: list[dict]) -> dict[str, Path]:
    """``report.md`` (the four metrics per arm, the paper's row) and ``atlas_metrics.png`` (one panel per metric)."""
    out = experiment.out
    arms = ordered(records, "arm")
    by = group(records, "arm")
    table = metric_table(records, "arm", ATLAS_METRICS)
    paper_row = markdown_table(["model", *ATLAS_METRICS.values()], [["BrainSegFounder (paper)", *(f"{paper.ATLAS[m]:g}" for m in ATLAS_METRICS)]])
    sections = [
        overview(experiment),
        f"## ATLAS challenge metrics (per-case means; mean ± sd over seeds)\n\n{table}",
        f"## The paper (real ATLAS v2.0)\n\n{paper_row}",
        "![ATLAS metrics](atlas_metrics.png)",
        runs_table(records, "dice"),
    ]
    panels = {title: {arm: cell(values(by[(arm,)], metric)) for arm in arms} for metric, title in ATLAS_METRICS.items()}
    plot = plot_panels(panels, "ATLAS challenge metrics (paper Table 6)", out / "atlas_metrics.png")
    return {"markdown": write_markdown(out / "report.md", "ATLAS v2.0 (paper Table 6)", sections), "plot": plot}
