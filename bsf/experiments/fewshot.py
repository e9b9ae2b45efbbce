"""Few-shot fine-tuning (paper Figure 5 and Table 9): Stage 3 on 5/10/20/40 % of the training cases.

The held-out cases are BraTS fold ``--fold`` (default 0), or the datalist's validation list for ATLAS; they
never enter a subset. For each percentage and subset ``s`` (``--subsets``, default 5) the training cases are a
permutation seeded with ``s`` cut to the percentage (so a subset's smaller percentages are nested in its larger
ones), and the run's training seed is ``s`` too. Each subset is fine-tuned once per arm (``pretrained`` /
``scratch``). The report gives mean ± sd over subsets per percentage and arm, and the plot their error bars.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from bsf.errors import ConfigError
from bsf.experiments import paper
from bsf.experiments.cases import subset
from bsf.experiments.report import (
    ATLAS_METRICS,
    BRATS_DICE,
    cell,
    fmt,
    group,
    main_metric,
    markdown_table,
    metric_table,
    ordered,
    overview,
    plot_lines,
    runs_table,
    values,
    write_markdown,
)
from bsf.experiments.runner import Experiment, RunSpec

PAPER_PERCENTS = (5, 10, 20, 40)


def plan(experiment: Experiment, percents: Sequence[float], subsets: int, fold: int | None) -> list[RunSpec]:
    """One run per percentage x subset x arm; the held-out cases are fold ``fold`` (BraTS) or the datalist's list."""
    if subsets < 1:
        raise ConfigError("--subsets must be >= 1")
    cases = experiment.cases
    training, validation = cases.fold(fold) if fold is not None else cases.held_out()
    runs = []
    for percent in percents:
        for s in range(subsets):
            chosen = subset(training, percent, seed=s)
            for arm in experiment.arms:
                runs.append(
                    RunSpec(
                        name=f"p{percent:g}_subset{s}_{arm.name}",
                        labels={"percent": percent, "subset": s, "arm": arm.name},
                        training=chosen,
                        validation=validation,
                        overrides=[*arm.overrides, f"seed={s}"],
                    )
                )
    return runs


def report(experiment: Experiment, records: list[dict]) -> dict[str, Path]:
    """``report.md`` (main metric by percentage and arm, per-metric tables per arm, the paper's) and ``fewshot.png``."""
    out = experiment.out
    metric = main_metric(experiment.cases.dataset)
    metrics = BRATS_DICE if experiment.cases.dataset == "brats" else ATLAS_METRICS
    arms = ordered(records, "arm")
    percents = sorted(ordered(records, "percent"))
    by = group(records, "arm", "percent")
    points = {arm: [cell(values(by.get((arm, p), []), metric)) for p in percents] for arm in arms}
    rows = [[f"{p:g} %", len(by.get((arms[0], p), [])), *(fmt(*points[arm][i]) for arm in arms)] for i, p in enumerate(percents)]
    sections = [
        overview(experiment),
        f"## {metric} by share of the training cases (mean ± sd over subsets)\n\n" + markdown_table(["training cases", "subsets", *arms], rows),
    ]
    for arm in arms:
        table = metric_table([r for r in records if r["labels"]["arm"] == arm], "percent", metrics, row_name=lambda p: f"{p:g} %")
        sections.append(f"## `{arm}`: every metric (mean ± sd over subsets)\n\n{table}")
    reference = None
    if experiment.cases.dataset == "brats":
        sections.append(
            "## The paper (real BraTS 2021, mean Dice over 5 random subsets)\n\n"
            + markdown_table(["training cases", "BrainSegFounder", "SwinUNETR from scratch"],
                             [[f"{p} %", f"{b:.4f}", f"{s:.4f}"] for p, (b, s) in paper.FEWSHOT.items()])
        )
        if all(p in paper.FEWSHOT for p in percents):
            reference = {
                "paper: BrainSegFounder": [paper.FEWSHOT[int(p)][0] for p in percents],
                "paper: SwinUNETR": [paper.FEWSHOT[int(p)][1] for p in percents],
            }
    plot = plot_lines(percents, points, "% of training cases", metric, "Few-shot fine-tuning (paper Figure 5)", out / "fewshot.png", reference)
    sections += ["![few-shot Dice](fewshot.png)", runs_table(records, metric)]
    return {"markdown": write_markdown(out / "report.md", "Few-shot fine-tuning (paper Figure 5 and Table 9)", sections), "plot": plot}
