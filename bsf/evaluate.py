"""``bsf evaluate``: a fine-tuned model on a datalist's cases; per-case CSV, summary JSON and a printed table.

Each case goes through exactly the ``bsf predict`` route (:func:`bsf.predict.predict_case`): the label map is
made in the input's own grid and scored there against the case's label file, as a challenge scores a
submission. BraTS: Dice and HD95 (mm, from the header's voxel size) of the TC, WT and ET regions derived from
both label maps, and their means. ATLAS: Dice, volume difference (mm^3), simple lesion count and lesion-wise F1
(:mod:`bsf.metrics.lesions`). Empty regions follow the definitions in :mod:`bsf.metrics`.

Every case's headers, label included, are checked before its voxels are read (:func:`bsf.predict.check_headers`);
a case with an empty image (every voxel 0: no brain) is refused, naming the case and the file
(:func:`bsf.predict.check_not_empty`), as ``bsf data check`` reports it; an empty label (no lesion) is scored.
With ``save_predictions`` each label map is written to ``<out>/predictions/<name>.nii.gz``, ``<name>`` derived from
the case id by :func:`bsf.outputs.safe_file_name` (a case id holding ``/``, ``..`` or odd characters is cleaned
and hashed) and checked to stay inside that folder and to be none of the data set's files. Every output is checked
before any work (:func:`check_evaluation_outputs`): ``metrics.csv``, ``summary.json`` and predictions of an earlier
evaluation in the folder are replaced only with ``force`` (``bsf evaluate --force``), and none of them may be an
input (the model, its config file, the datalist, a case's image or label), even with ``force``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from bsf.data.cases import fold_split, list_cases
from bsf.data.check import case_files
from bsf.data.index import case_id
from bsf.data.labels import LabelRule, check_label_values, label_rule
from bsf.errors import DataError, OutputError
from bsf.io import atomic_path, atomic_write_json
from bsf.metrics import BRATS_REGIONS, brats_dice, brats_hd95, brats_regions, lesion_metrics
from bsf.outputs import FileSet, check_output_files, check_output_folder, inside, reported_write, safe_file_name
from bsf.predict import DEFAULT_MAX_VOXELS, CaseInputs, FinetunedModel, check_headers, predict_case, save_label_map

log = logging.getLogger(__name__)

__all__ = ["Evaluation", "check_evaluation_outputs", "evaluate", "metric_names", "format_table", "prediction_paths"]

SPLITS = ("validation", "training", "all")
CSV, SUMMARY, PREDICTIONS = "metrics.csv", "summary.json", "predictions"


def metric_names(dataset: str) -> list[str]:
    """The CSV's metric columns (after ``case``) for a data set."""
    if dataset == "brats":
        return [f"dice_{r}" for r in (*BRATS_REGIONS, "mean")] + [f"hd95_{r}" for r in (*BRATS_REGIONS, "mean")]
    return ["dice", "volume_difference_mm3", "simple_lesion_count", "lesionwise_f1"]


@dataclass
class Evaluation:
    rows: list[dict[str, Any]]  # one per case: {"case": id, metric: value, ...}
    summary: dict[str, Any]  # n, per-metric mean/std/min/max, where things came from
    csv_path: Path
    json_path: Path


def _cases(finetuned: FinetunedModel, datalist: str | os.PathLike, split: str, root: str | None) -> tuple[list[dict], Path]:
    """The ``split`` cases of ``datalist`` (:func:`bsf.data.cases.list_cases`, the model's ``data.modalities``), each
    with a label, and the datalist's path. ``validation``: the datalist's list, else the model's fold ``data.fold``.
    A case in both lists is scored (with a warning): ``--split training`` and ``all`` score training cases too."""
    if split not in SPLITS:
        raise DataError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    data = finetuned.config.data
    listed = list_cases(data.dataset, datalist=datalist, datalist_root=root, modalities=data.modalities, allow_shared=True)
    if split != "all" and listed.validation is None and data.fold is not None:
        listed.training, listed.validation = fold_split(listed.training, data.fold, listed.source)
    if split == "validation" and listed.validation is None:
        raise DataError(f"{listed.source}: has no 'validation' list (BraTS: index with --fold K, or pass data.fold=K); or use --split training")
    cases = {"all": listed.all_cases, "training": listed.training, "validation": listed.validation}[split]
    if not cases:
        raise DataError(f"{listed.source}: no {split} cases")
    for case in cases:
        if not case.get("label"):
            raise DataError(f"{listed.source}: case {case_id(case)} has no 'label' to evaluate against")
    return cases, listed.datalist


def _truth(path: Path) -> np.ndarray:
    """The label map (X, Y, Z) of a label file whose header :func:`bsf.predict.check_headers` passed."""
    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported with the file's name
        raise DataError(f"label file {path}: cannot read ({type(exc).__name__}: {exc})") from None
    data = data.reshape(data.shape[:3])  # a 4-D header with one volume passed the check
    if not np.all(np.equal(np.mod(data, 1), 0)):
        raise DataError(f"label file {path}: holds non-integer values")
    return data.astype(np.int64)


def _label_rule(finetuned: FinetunedModel, case: dict, label_path: Path, truth: np.ndarray) -> LabelRule:
    """The case's label rule (:func:`bsf.data.labels.label_rule`, the model's ``finetune.label_format``), after
    checking ``truth`` against it: values it does not allow raise :class:`DataError` naming the label file."""
    rule = label_rule(finetuned.dataset, case_id(case), label_format=finetuned.config.finetune.label_format)
    check_label_values(np.unique(truth).tolist(), rule, label_path)
    return rule


def _score_case(finetuned: FinetunedModel, case: dict, max_voxels: int) -> tuple[dict[str, float], Any]:
    files = case["image"] if isinstance(case["image"], list) else [case["image"]]
    inputs = CaseInputs([Path(f) for f in files])
    label_path = Path(case["label"])
    reference = check_headers(inputs.files, label_path, max_voxels=max_voxels, case=case_id(case))
    truth = _truth(label_path)
    spacing = tuple(float(z) for z in reference.header.get_zooms()[:3])
    rule = _label_rule(finetuned, case, label_path, truth)
    if finetuned.dataset == "brats":
        et = rule.et_label(np.unique(truth).tolist())
        true_regions = brats_regions(truth, et_label=et)
        prediction = predict_case(finetuned, inputs, et_label=et, max_voxels=max_voxels, case_name=case_id(case))
        pred_regions = brats_regions(prediction.labels, et_label=et)
        dice = brats_dice(pred_regions, true_regions)
        hd = brats_hd95(pred_regions, true_regions, spacing)
        row = {f"dice_{k}": v for k, v in dice.items()} | {f"hd95_{k}": v for k, v in hd.items()}
    else:
        prediction = predict_case(finetuned, inputs, max_voxels=max_voxels, case_name=case_id(case))
        m = lesion_metrics(prediction.labels > 0, truth > 0, spacing)
        row = {
            "dice": m["dice"],
            "volume_difference_mm3": m["volume_difference"],
            "simple_lesion_count": m["simple_lesion_count"],
            "lesionwise_f1": m["lesionwise_f1"],
        }
    return row, prediction


def prediction_paths(cases: Sequence[dict], folder: Path) -> list[Path]:
    """``folder/<safe name>.nii.gz`` per case (:func:`bsf.outputs.safe_file_name` of its id), checked before any work.

    Raises:
        OutputError: two cases would share a file, a path resolves outside ``folder`` (a symbolic link planted
            there), or a path is one of the cases' own files (images or labels).
    """
    sources = FileSet(_case_paths(cases))
    paths, owners = [], {}
    for case in cases:
        name = case_id(case)
        path = inside(folder / f"{safe_file_name(name)}.nii.gz", folder, what=f"case {name!r}: prediction")
        if path.name in owners:
            raise OutputError(f"cases {owners[path.name]!r} and {name!r} would both write the prediction {path}; give them distinct ids")
        owners[path.name] = name
        clash = sources.find(path)
        if clash is not None:
            raise OutputError(f"case {name!r}: its prediction {path} is the data file {clash}; choose another --out")
        paths.append(path)
    return paths


def _case_paths(cases: Sequence[dict]) -> list[Path]:
    return [Path(path) for case in cases for _, path in case_files(case)]


def check_evaluation_outputs(
    out: str | os.PathLike,
    *,
    inputs: Sequence[str | os.PathLike] = (),
    cases: Sequence[dict] = (),
    save_predictions: bool = False,
    force: bool = False,
) -> list[Path]:
    """The files an evaluation writes into ``out``, checked before any work; returns the prediction paths (with
    ``save_predictions``, one per case: :func:`prediction_paths`).

    Raises:
        OutputError: naming the path: ``out`` is a file or cannot be made; an output is one of ``inputs`` (the
            model, its config, the datalist) or of the cases' files, even with ``force``; or, without ``force``,
            ``metrics.csv``, ``summary.json`` or a prediction exists already (an earlier evaluation).
    """
    folder = check_output_folder(out, what="evaluation folder", inputs=inputs, reuse=True)
    predictions = prediction_paths(cases, folder / PREDICTIONS) if save_predictions else []
    check_output_files([folder / CSV, folder / SUMMARY, *predictions], what="evaluation output",
                       inputs=[*inputs, *_case_paths(cases)], force=force)
    return predictions


def _statistics(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def _write_csv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    with reported_write(path), atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def evaluate(
    finetuned: FinetunedModel,
    datalist: str | os.PathLike,
    *,
    split: str = "validation",
    root: str | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    save_predictions: bool = False,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    force: bool = False,
) -> Evaluation:
    """Score ``finetuned`` on the ``split`` cases of ``datalist``; write ``metrics.csv`` and ``summary.json``.

    Args:
        datalist: a MONAI-style datalist (``bsf data index``); cases need a ``label``.
        split: ``validation`` (the datalist's list, else its fold ``data.fold``), ``training`` or ``all``.
        root: folder the datalist's relative paths resolve against (default: its ``root``, else its folder).
        out_dir: where the files go (default: ``<model folder>/evaluate_<split>``).
        save_predictions: also write each case's label map to ``out_dir/predictions/<name>.nii.gz`` (see the module
            docstring for how ``<name>`` is derived from the case id).
        max_voxels: the most voxels an input or label file may have (checked on its header before it is read).
        force: replace the files of an earlier evaluation in ``out_dir`` (:func:`check_evaluation_outputs`).

    The summary JSON holds ``n``, and per metric ``mean``, ``std`` (population, ddof 0), ``min``, ``max``.
    """
    started = time.perf_counter()
    cases, datalist_path = _cases(finetuned, datalist, split, root)
    out = Path(out_dir) if out_dir is not None else finetuned.path.parent / f"evaluate_{split}"
    config_file = [Path(finetuned.config_source)] if Path(finetuned.config_source).is_file() else []
    predictions = check_evaluation_outputs(out, inputs=[finetuned.path, *config_file, datalist_path], cases=cases,
                                           save_predictions=save_predictions, force=force)
    csv_path, json_path = out / CSV, out / SUMMARY
    outputs = predictions or [None] * len(cases)
    columns = ["case", *metric_names(finetuned.dataset)]
    rows = []
    for case, output in zip(tqdm(cases, desc=f"evaluate {split}", unit="case", disable=not progress), outputs):
        name = case_id(case)
        scores, prediction = _score_case(finetuned, case, max_voxels)
        rows.append({"case": name, **scores})
        if output is not None:
            save_label_map(prediction.labels, prediction.reference, output)
        log.info("%s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    metrics = {name: _statistics([row[name] for row in rows]) for name in columns[1:]}
    summary = {
        "model": str(finetuned.path),
        "config_source": finetuned.config_source,
        "dataset": finetuned.dataset,
        "datalist": str(datalist_path),
        "split": split,
        "n": len(rows),
        "threshold": finetuned.config.finetune.threshold,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - started, 2),
    }
    _write_csv(rows, columns, csv_path)
    summary["csv"] = str(csv_path)
    with reported_write(json_path):
        atomic_write_json(summary, json_path)
    return Evaluation(rows, summary, csv_path, json_path)


def format_table(evaluation: Evaluation) -> str:
    """A fixed-width table: one line per case, then mean and std over cases."""
    columns = ["case", *evaluation.summary["metrics"]]
    width = max([len("case"), len("mean"), *(len(str(r["case"])) for r in evaluation.rows)])
    widths = [width] + [max(9, len(c)) for c in columns[1:]]

    def line(cells: Sequence[Any]) -> str:
        out = []
        for i, (cell, w) in enumerate(zip(cells, widths)):
            if isinstance(cell, float):
                cell = "nan" if math.isnan(cell) else f"{cell:.4f}" if abs(cell) < 1000 else f"{cell:.1f}"
            out.append(str(cell).ljust(w) if i == 0 else str(cell).rjust(w))
        return "  ".join(out)

    lines = [line(columns), line(["-" * w for w in widths])]
    lines += [line([r["case"], *(float(r[c]) for c in columns[1:])]) for r in evaluation.rows]
    lines.append(line(["-" * w for w in widths]))
    for stat in ("mean", "std"):
        lines.append(line([stat, *(evaluation.summary["metrics"][c][stat] for c in columns[1:])]))
    return "\n".join(lines)


def predict_validation_case(run_config: str | Path, data_root: str | Path, global_model: str | Path,
                            task: str | None = None) -> dict[str, Any]:
    """The first validation case of the site at ``data_root``, predicted with ``global_model`` (a Stage 3 model).

    ``task``: for a model across tasks (``federation.tasks``), the task whose model to use: the shared tensors plus
    that task's head (:func:`bsf.federation.export.task_weights`), the run config's ``for_task`` copy.

    Returns ``image`` (C, X, Y, Z), ``truth`` and ``prediction`` (K, X, Y, Z) booleans, ``dice`` per region,
    ``regions`` names and the ``dataset``.
    """
    from bsf.data.pipeline import training_split
    from bsf.engine import load_config
    from bsf.engine.tasks import build_task
    from bsf.federation.export import task_weights
    from bsf.federation.task_heads import for_task
    from bsf.inference import build_network
    from bsf.model import import_weights

    config = load_config(run_config, overrides=[f"data.root={data_root}", "data.datalist=null", "model.pretrained=null", "train.device=cpu"])
    weights: Any = str(global_model)
    if task is not None:
        config, weights = for_task(config, task), task_weights(global_model, task)
    model = build_network(config)
    report = import_weights(model, weights, scope="all", strict=True)
    log.info("overlay model: %s", report.summary().splitlines()[0])
    model.eval()
    segmentation = build_task(config)
    split = training_split(config.data, config.seed, config.finetune.label_format)
    if not split.val:
        raise ValueError(f"{data_root}: no validation case")
    item = segmentation.validation_items(split.val[:1])[0]
    with torch.no_grad():
        prediction, truth = segmentation.segment(model, item, torch.device("cpu"))
    return {
        "image": item["image"].numpy(),
        "truth": truth,
        "prediction": prediction,
        "dice": segmentation.dice(prediction, truth),
        "regions": segmentation.region_names,
        "dataset": config.data.dataset,
    }
