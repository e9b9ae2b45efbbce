"""Experiment reports: runs grouped by their labels, mean +- sd tables in markdown, PNG plots.

``sd`` is the sample standard deviation (n - 1) over the runs of a group (seeds, subsets or folds); a single
run has sd 0. Metric names are those of :func:`bsf.evaluate.metric_names`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable, Mapping, Sequence

import numpy as np

from bsf.io import atomic_path
from bsf.report import plt

if TYPE_CHECKING:
    from bsf.experiments.runner import Experiment

Record = Mapping[str, Any]

#: BraTS Dice columns (metric name -> column title), in the paper's order
BRATS_DICE = {"dice_TC": "TC", "dice_WT": "WT", "dice_ET": "ET", "dice_mean": "mean"}
#: ATLAS challenge metrics (metric name -> column title), in the paper's Table 6 order
ATLAS_METRICS = {
    "dice": "Dice",
    "lesionwise_f1": "lesion-wise F1",
    "simple_lesion_count": "simple lesion count",
    "volume_difference_mm3": "volume difference (mm^3)",
}


def main_metric(dataset: str) -> str:
    """The one number a protocol compares: mean Dice of TC, WT, ET (BraTS), lesion Dice (ATLAS)."""
    return "dice_mean" if dataset == "brats" else "dice"


def mean_sd(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample sd (0 for one value) and count of finite ``values``."""
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return math.nan, math.nan, 0
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0, int(a.size)


def cell(vals: Iterable[float]) -> tuple[float, float | None]:
    """(mean, sd) of ``vals`` for a table cell; sd is None for a single value (nothing to spread)."""
    mean, sd, n = mean_sd(vals)
    return mean, sd if n > 1 else None


def fmt(mean: float, sd: float | None = None, digits: int = 4) -> str:
    """``0.8123 ± 0.0100`` (or the mean alone); large values (volumes) with one decimal."""
    if math.isnan(mean):
        return "n/a"
    spec = f".{digits}f" if abs(mean) < 1000 else ".1f"
    return f"{mean:{spec}}" if sd is None else f"{mean:{spec}} ± {sd:{spec}}"


def group(records: Sequence[Record], *keys: str) -> dict[tuple, list[Record]]:
    """Records by the values of their ``labels[key]`` (first-seen order)."""
    out: dict[tuple, list[Record]] = {}
    for record in records:
        out.setdefault(tuple(record["labels"][k] for k in keys), []).append(record)
    return out


def values(records: Sequence[Record], metric: str) -> list[float]:
    return [r["metrics"][metric] for r in records if metric in r["metrics"]]


def ordered(records: Sequence[Record], key: str) -> list[Hashable]:
    """The distinct values of ``labels[key]`` in first-seen order."""
    return list(dict.fromkeys(r["labels"][key] for r in records))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def metric_table(
    records: Sequence[Record], row_key: str, metrics: Mapping[str, str], row_name: Callable[[Any], str] = str, summary_row: str | None = None
) -> str:
    """Rows: the values of ``labels[row_key]``, each the mean ± sd of its runs; columns: ``metrics``.

    With ``summary_row``, a last row gives the mean ± sd over the rows' means (e.g. over folds).
    """
    groups = group(records, row_key)
    rows, means = [], {m: [] for m in metrics}
    for (key,), runs in groups.items():
        cells = []
        for metric in metrics:
            mean, sd = cell(values(runs, metric))
            means[metric].append(mean)
            cells.append(fmt(mean, sd))
        rows.append([row_name(key), *cells])
    if summary_row:
        rows.append([f"**{summary_row}**", *(f"**{fmt(*cell(means[m]))}**" for m in metrics)])
    return markdown_table([row_key, *metrics.values()], rows)


def save_figure(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def plot_bars(categories: Sequence[str], series: Mapping[str, Sequence[tuple[float, float]]], ylabel: str, title: str, path: Path) -> Path:
    """Grouped bars: one group per category, one bar (mean, sd error bar) per series."""
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(categories) * max(1, len(series))), 4))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(categories))
    for i, (name, points) in enumerate(series.items()):
        means = [p[0] for p in points]
        sds = [p[1] or 0.0 for p in points]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=sds, capsize=3, label=name)
    ax.set_xticks(x, categories)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_panels(panels: Mapping[str, Mapping[str, tuple[float, float | None]]], title: str, path: Path) -> Path:
    """One bar panel per metric (title -> series -> (mean, sd)), side by side."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        labels = list(series)
        ax.bar(labels, [series[k][0] for k in labels], yerr=[series[k][1] or 0.0 for k in labels], capsize=4, color=[f"C{i}" for i in range(len(labels))])
        ax.set_title(name, fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_lines(
    x: Sequence[float],
    series: Mapping[str, Sequence[tuple[float, float | None]]],
    xlabel: str,
    ylabel: str,
    title: str,
    path: Path,
    reference: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """One line with sd error bars per series; ``reference`` lines (e.g. the paper's) dashed, on a second axis."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in series.items():
        ax.errorbar(x, [p[0] for p in points], yerr=[p[1] or 0.0 for p in points], marker="o", capsize=4, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xticks(list(x))
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if reference:
        paper_ax = ax.twinx()
        for name, ys in reference.items():
            paper_ax.plot(x, ys, "--", marker="x", alpha=0.6, label=name)
        paper_ax.set_ylabel("the paper (real data)")
        more = paper_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def write_markdown(path: Path, title: str, sections: Sequence[str]) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(f"# {title}\n\n" + "\n\n".join(s.strip() for s in sections) + "\n")
    return path


def overview(experiment: "Experiment") -> str:
    """What was run: preset, overrides, arms, data, which model was scored."""
    lines = [
        f"- protocol: `{experiment.protocol}`; preset `{experiment.preset}`"
        + (f" with `{' '.join(experiment.overrides)}`" if experiment.overrides else ""),
        f"- cases: `{experiment.cases.path}`",
        "- training: "
        + (f"one-site NVFlare federation (simulator), rounds of {experiment.federated_local_steps} steps"
           if experiment.federated_local_steps else "centralized (`bsf.train`)"),
        f"- model scored on the held-out cases: `checkpoint_{experiment.checkpoint}.pt` (by `bsf.evaluate`, each case in its own grid)",
        *(f"- arm `{arm.name}`: `{' '.join(arm.overrides)}`" for arm in experiment.arms),
        "- files: `config.yaml` (resolved base config), `experiment.json`, `results.json` (every run), "
        "`runs/<run>/{config.yaml, datalist.json, metrics.json, eval/metrics.csv, train/}`",
    ]
    return "## Set-up\n\n" + "\n".join(lines)


def runs_table(records: Sequence[Record], metric: str) -> str:
    """One row per run: its labels, cases, steps, ``metric``, seconds."""
    if not records:
        return "## Runs\n\nnone"
    keys = list(records[0]["labels"])
    rows = [
        [
            r["run"],
            *(r["labels"][k] for k in keys),
            r["n_training"],
            r["n_held_out"],
            r["steps"],
            fmt(r["final_train_loss"]) if r.get("final_train_loss") is not None else "n/a",
            fmt(r["metrics"].get(metric, math.nan)),
            f'{r["seconds"]["train"] + r["seconds"]["evaluate"]:.0f}',
        ]
        for r in records
    ]
    header = ["run", *keys, "training cases", "held-out cases", "steps", "final train loss", metric, "seconds"]
    return "## Runs\n\n" + markdown_table(header, rows)
