"""BraTS cross-validation (paper Tables 4 and 8): Stage 3 on each fold of the official 5-fold split.

For every fold, arm (``pretrained`` / ``scratch``) and seed, a run trains on the other folds and is scored on
the fold. The report gives, per arm, the Dice of TC, WT, ET and their mean for each fold and the mean ± sd over
folds, the arms side by side per fold, and the paper's per-fold numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from bsf.experiments import paper
from bsf.experiments.report import (
    BRATS_DICE,
    cell,
    fmt,
    group,
    markdown_table,
    metric_table,
    ordered,
    overview,
    plot_bars,
    runs_table,
    values,
    write_markdown,
)
from bsf.experiments.runner import Experiment, RunSpec


def plan(experiment: Experiment, folds: Sequence[int], seeds: Sequence[int], extra: Sequence[str] = ()) -> list[RunSpec]:
    """One run per fold x arm x seed; ``extra`` overrides apply to every run (the single-modality protocol's channels)."""
    runs = []
    for fold in folds:
        training, validation = experiment.cases.fold(fold)
        for arm in experiment.arms:
            for seed in seeds:
                runs.append(
                    RunSpec(
                        name=f"fold{fold}_{arm.name}_seed{seed}",
                        labels={"fold": fold, "arm": arm.name, "seed": seed},
                        training=training,
                        validation=validation,
                        overrides=[*extra, *arm.overrides, f"seed={seed}"],
                    )
                )
    return runs


def fold_report(experiment: Experiment, records: list[dict], title: str, reference: str) -> dict[str, Path]:
    """``report.md`` (per-arm fold tables, arms side by side, ``reference`` text) and ``dice_per_fold.png``."""
    out = experiment.out
    arms = ordered(records, "arm")
    folds = ordered(records, "fold")
    by = group(records, "arm", "fold")
    sections = [overview(experiment)]
    for arm in arms:
        table = metric_table([r for r in records if r["labels"]["arm"] == arm], "fold", BRATS_DICE, summary_row="mean ± sd over folds")
        sections.append(f"## Dice per fold: `{arm}`\n\nEach cell: mean over seeds (± sd when several).\n\n{table}")
    per_fold = {arm: {f: cell(values(by[(arm, f)], "dice_mean")) for f in folds if (arm, f) in by} for arm in arms}
    rows = [[fold, *(fmt(*per_fold[arm].get(fold, (float("nan"), None))) for arm in arms)] for fold in folds]
    rows.append(["**mean ± sd over folds**", *(f"**{fmt(*cell(m for m, _ in per_fold[arm].values()))}**" for arm in arms)])
    sections.append("## Mean Dice (TC, WT, ET) per fold, arms side by side\n\n" + markdown_table(["fold", *arms], rows))
    sections.append(reference)
    sections.append("![mean Dice per fold](dice_per_fold.png)")
    sections.append(runs_table(records, "dice_mean"))
    series = {arm: [per_fold[arm].get(f, (float("nan"), None)) for f in folds] for arm in arms}
    plot = plot_bars([f"fold {f}" for f in folds], series, "mean Dice (TC, WT, ET)", title, out / "dice_per_fold.png")
    return {"markdown": write_markdown(out / "report.md", title, sections), "plot": plot}


def paper_reference() -> str:
    """The paper's Table 4/8 numbers, for the report."""
    folds = paper.BRATS_CV_FOLDS["BrainSegFounder-Small"]
    rows = [[f"fold {k}", f"{v:.4f}"] for k, v in enumerate(folds)]
    rows += [[f"5-fold mean, {name}", f"{v:.4f}"] for name, v in paper.BRATS_CV_MEANS.items()]
    return (
        "## The paper (real BraTS 2021, 1,251 cases, SwinUNETR-Small, 50,000 steps)\n\n"
        "Mean Dice of TC, WT, ET; folds are BrainSegFounder-Small's.\n\n" + markdown_table(["", "mean Dice"], rows)
    )


def report(experiment: Experiment, records: list[dict]) -> dict[str, Path]:
    return fold_report(experiment, records, "BraTS cross-validation (paper Tables 4 and 8)", paper_reference())
