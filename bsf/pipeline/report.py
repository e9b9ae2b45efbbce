"""The chained run's report: markdown plus PNGs (loss curves, Dice per round, prediction vs truth).

Everything comes from files the federation wrote on the server (``bsf_metrics.json``,
``bsf_rounds.jsonl``, ``cross_site_val/``, ``FL_global_model.pt``) plus, for the overlay, one
validation case of a simulated site predicted with the Stage 3 global model through the one inference
path (:mod:`bsf.inference`, via :meth:`bsf.engine.segmentation.SegmentationTask.segment`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from bsf.evaluate import predict_validation_case  # noqa: E402
from bsf.federation.run_folders import METRICS_FILE, RUN_CONFIG_FILE, read_rounds  # noqa: E402
from bsf.io import atomic_path  # noqa: E402
from bsf.federation.stages import get_stage  # noqa: E402

log = logging.getLogger(__name__)

DATASET_NAMES = {"ukb": "UKB", "brats": "BraTS", "atlas": "ATLAS"}
REGION_COLOURS = ListedColormap(["#00000000", "#2ca02c", "#ff7f0e", "#d62728"])  # none, WT only, TC only, ET


def _series(run_dir: str | Path) -> dict[str, dict[str, list[list[float]]]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("sites", {})


def _finetuning(jobs: Any) -> list[str]:
    """The fine-tuning stages among ``jobs`` (stage names of the graph), in order."""
    return [job for job in jobs if get_stage(job).kind == "finetune"]


def _run_config(cfg: Any, job: str) -> Path:
    return cfg.out / "jobs" / job / "app" / "config" / RUN_CONFIG_FILE


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- curves
def plot_losses(stages: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """One panel per stage: each site's training loss per local step (SSL loss, or Dice loss in Stage 3)."""
    ncols = min(3, len(stages))
    nrows = -(-len(stages) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[len(stages):]:
        ax.axis("off")
    for ax, (job, result) in zip(axes.flat, stages.items()):
        for site, tags in sorted(_series(result["run_dir"]).items()):
            points = [p for p in tags.get("train/loss", []) if p[1] is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, label=site)
        ax.set_title(f"{job} ({'Dice' if get_stage(job).kind == 'finetune' else 'SSL'} loss)")
        ax.set_xlabel("local step")
        ax.legend(fontsize=8)
    return _save(fig, path)


def dice_by_round(result: Mapping[str, Any]) -> dict[str, list[float | None]]:
    """Per site, the Dice (``val_dice_mean``) of the global model after each round: index 0 = the initial model.

    Round ``r``'s site validation is of the global model it received (after ``r`` rounds); the model after
    the last round is the cross-site evaluation's ``global (last round)``.
    """
    steps, rounds = int(result["local_steps"]), int(result["rounds"])
    out: dict[str, list[float | None]] = {}
    for site, tags in _series(result["run_dir"]).items():
        values: list[float | None] = [None] * (rounds + 1)
        for step, value in tags.get("val/val_dice_mean", []):
            index = int(step) // steps if step is not None else None
            if index is not None and 0 <= index <= rounds:
                values[index] = value
        out[site] = values
    table = result.get("cross_site", {}).get("json")
    if table and Path(table).is_file():
        cross = json.loads(Path(table).read_text())
        final = cross["tables"].get("val_dice_mean", {}).get("SRV_FL_global_model.pt", {})
        for site, value in final.items():
            out.setdefault(site, [None] * (rounds + 1))[rounds] = value
    return out


def plot_dice(stages: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """One panel per Stage 3 job: each site's Dice of the global model after each round."""
    jobs = _finetuning(stages)
    fig, axes = plt.subplots(1, max(1, len(jobs)), figsize=(4.8 * max(1, len(jobs)), 3.6), squeeze=False)
    for ax, job in zip(axes[0], jobs):
        top = 0.0
        for site, values in sorted(dice_by_round(stages[job]).items()):
            xs = [i for i, v in enumerate(values) if v is not None]
            ax.plot(xs, [values[i] for i in xs], "o-", label=site)
            top = max([top, *(values[i] for i in xs)])
        ax.set_title(f"{job}: mean Dice of the global model")
        ax.set_xlabel("rounds aggregated (0 = initial model)")
        ax.set_xticks(range(int(stages[job]["rounds"]) + 1))
        ax.set_ylim(0, min(1.0, 1.25 * top + 0.01))  # small Dice values stay visible
        ax.legend(fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------------------- overlay
def _label_map(masks: np.ndarray, dataset: str) -> np.ndarray:
    """(K, X, Y) region masks -> one map: BraTS 1 = WT only, 2 = TC without ET, 3 = ET; ATLAS 3 = lesion."""
    if dataset != "brats":
        return masks[0].astype(np.int8) * 3
    tc, wt, et = masks[0], masks[1], masks[2]
    out = np.zeros(wt.shape, dtype=np.int8)
    out[wt] = 1
    out[tc] = 2
    out[et] = 3
    return out


def plot_overlays(cases: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """A row per Stage 3 job: the validation case's axial slice with most truth, truth and prediction overlaid."""
    fig, axes = plt.subplots(len(cases), 2, figsize=(8, 4 * len(cases)), squeeze=False)
    for row, (job, case) in zip(axes, cases.items()):
        truth, prediction = case["truth"], case["prediction"]
        area = truth.any(axis=0).sum(axis=(0, 1))
        z = int(np.argmax(area)) if area.max() > 0 else truth.shape[-1] // 2
        image = case["image"][0, :, :, z]
        dice = ", ".join(f"{k} {v:.2f}" for k, v in case["dice"].items() if k != "mean")
        for ax, masks, name in ((row[0], truth, "truth"), (row[1], prediction, "prediction")):
            ax.imshow(np.rot90(image), cmap="gray")
            ax.imshow(np.rot90(_label_map(masks[..., z], case["dataset"])), cmap=REGION_COLOURS, vmin=0, vmax=3, alpha=0.55, interpolation="nearest")
            ax.set_title(f"{job} {name}" + (f" (Dice {dice})" if name == "prediction" else f" (slice z={z})"), fontsize=9)
            ax.axis("off")
    return _save(fig, path)


# ----------------------------------------------------------------------------- markdown
def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def write_report(cfg: Any, summary: dict[str, Any]) -> dict[str, Path]:
    """Write ``<out>/report/{report.md, loss_curves.png, dice_per_round.png, overlay.png}``; fill ``summary`` with Dice values."""
    from bsf.engine import load_config
    from bsf.federation.initial_model import change_from_initial

    out = cfg.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    stages = summary["stages"]
    paths: dict[str, Path] = {}
    for job, result in stages.items():
        result["change_from_initial"] = change_from_initial(
            load_config(_run_config(cfg, job)), result["scope"], result["global_model"], result["previous_model"]
        )
        if get_stage(job).kind == "finetune":
            result["dice_by_round"] = dice_by_round(result)
    paths["losses"] = plot_losses(stages, out / "loss_curves.png")
    stage3 = _finetuning(stages)
    if stage3:
        paths["dice"] = plot_dice(stages, out / "dice_per_round.png")
        cases = {}
        for job in stage3:  # one validation case per task: a job across tasks predicts each with that task's model
            datasets = get_stage(job).datasets
            stages[job]["overlays"] = []
            for dataset in datasets:
                site = next(s for s in stages[job]["sites"] if summary["site_datasets"][s] == dataset)
                case = predict_validation_case(_run_config(cfg, job), summary["sites"][site], stages[job]["global_model"],
                                               task=dataset if len(datasets) > 1 else None)
                stages[job]["overlays"].append({"site": site, "dice": case["dice"]})
                cases[f"{job} @ {site}"] = case
        paths["overlay"] = plot_overlays(cases, out / "overlay.png")

    lines = [
        "# BrainSegFounder-FL: Stage 1 -> 2 -> 3 in the NVFlare simulator",
        "",
        f"Synthetic sites ({cfg.subjects} subjects each at {cfg.spacing:g} mm, one of them the site's validation case): "
        + ", ".join(f"{site} ({DATASET_NAMES.get(site.split('-')[0], site)}-like)" for site in summary["sites"])
        + ". Every stage is an NVFlare job run with `nvflare simulator`; each starts from the previous stage's "
        "global model (the stage graph of `bsf.federation.stages`), adapted by modality name on the server before round 0.",
        "",
        "| job | sites | rounds x local steps | aggregated | starts from | max abs change of the global model | seconds |",
        "|---|---|---|---|---|---:|---:|",
    ]
    for job, r in stages.items():
        previous = f"{r['previous_stage']} global" if r["previous_stage"] else "seeded init"
        lines.append(
            f"| {job} | {', '.join(r['sites'])} | {r['rounds']} x {r['local_steps']} | {r['scope']} | {previous} "
            f"| {r['change_from_initial']:.3g} | {r['seconds']:.0f} |"
        )
    for job, r in stages.items():  # a modality-aware stage: what each site fed (the server's last round record)
        records = read_rounds(r["run_dir"])
        held = records[-1].get("modalities", {}).get("sites") if records else None
        if held:
            lines += ["", f"{job}: the modalities each site held (each modality's first-layer filters averaged over its "
                      "sites): " + "; ".join(f"{site} {', '.join(names)}" for site, names in sorted(held.items()))]
    lines += ["", "Global models: " + ", ".join(f"`{Path(p).name}`" for p in summary["models"].values()) + f" in `{cfg.out / 'models'}`.", ""]
    lines += ["## Training loss per stage", "", "![loss curves](loss_curves.png)", ""]
    if stage3:
        lines += ["## Stage 3: Dice of the global model per round", ""]
        lines += ["Round 0 is the initial model (the Stage 2 encoder with a new decoder); the last value is the final global model (cross-site evaluation).", ""]
        for job in stage3:
            per_site = stages[job]["dice_by_round"]
            rounds = stages[job]["rounds"]
            lines.append(f"**{job}** (val_dice_mean)")
            lines.append("")
            lines.append("| site | " + " | ".join(f"after {i}" for i in range(rounds + 1)) + " |")
            lines.append("|---|" + "---:|" * (rounds + 1))
            for site, values in sorted(per_site.items()):
                lines.append(f"| {site} | " + " | ".join(_fmt(v) for v in values) + " |")
            lines.append("")
        lines += ["![Dice per round](dice_per_round.png)", ""]
        lines += ["## Prediction vs truth (Stage 3 global model, a validation case)", ""]
        for job in stage3:
            for overlay in stages[job]["overlays"]:
                lines.append(f"- {job} at {overlay['site']}: Dice " + ", ".join(f"{k} {v:.3f}" for k, v in overlay["dice"].items()))
        lines += ["", "BraTS colours: green WT only, orange TC (without ET), red ET; ATLAS: red lesion.", "", "![overlay](overlay.png)", ""]
        for job in stage3:
            md = stages[job].get("cross_site", {}).get("markdown")
            if md and Path(md).is_file():
                lines += [Path(md).read_text(), ""]
    lines += [
        "## Files",
        "",
        f"- jobs as run: `{cfg.out / 'jobs'}`; simulator workspaces: `{cfg.out / 'ws'}`; logs: `{cfg.out / 'logs'}`",
        "- per stage: `ws/<job>/server/simulate_job/` holds `app_server/FL_global_model.pt`, `bsf_metrics.json`, "
        "`bsf_rounds.jsonl`, `tb_events/`, `cross_site_val/`",
        "",
    ]
    paths["markdown"] = out / "report.md"
    with atomic_path(paths["markdown"]) as tmp:
        tmp.write_text("\n".join(lines))
    return paths
