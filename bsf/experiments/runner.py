"""Execute an experiment's plan of Stage 3 runs, resumably.

A run lives in ``OUT/runs/<name>/``:

* ``datalist.json``: its training cases and held-out (``validation``) cases, absolute paths;
* ``config.yaml``: the resolved :class:`~bsf.config.RunConfig` (preset + experiment overrides + the run's own);
* ``train/``: what :func:`bsf.train.train` writes (checkpoints, ``summary.json``, TensorBoard); with ``--federated``
  ``fl/`` instead: the one-site NVFlare simulator workspace (:mod:`bsf.pipeline.one_site`);
* ``eval/``: what :func:`bsf.evaluate.evaluate` writes for the held-out cases (``metrics.csv``, ``summary.json``);
* ``metrics.json``: written last and atomically. It marks the run finished: a rerun of the experiment skips
  the run (after checking its config and cases are unchanged); a run folder without it is deleted and redone.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from bsf.config import RunConfig, load_config
from bsf.errors import ConfigError
from bsf.experiments.cases import Case, ExperimentCases, ids
from bsf.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

METRICS, CONFIG, DATALIST = "metrics.json", "config.yaml", "datalist.json"
CHECKPOINTS = {"last": "checkpoint_last.pt", "best": "checkpoint_best.pt"}


@dataclass
class Arm:
    """One initialisation compared by a protocol: ``pretrained`` (an encoder) or ``scratch`` (random)."""

    name: str
    overrides: list[str]


def make_arms(pretrained: str | None, pretrained_modalities: Sequence[str] | None, scratch: bool) -> list[Arm]:
    """``pretrained`` (when an encoder is given) and ``scratch`` (unless turned off), in that order."""
    arms = []
    if pretrained:
        path = Path(pretrained).resolve()
        if not path.is_file():
            raise ConfigError(f"--pretrained {pretrained}: no such file")
        extra = [f"model.pretrained_modalities=[{', '.join(pretrained_modalities)}]"] if pretrained_modalities else []
        arms.append(Arm("pretrained", [f"model.pretrained={path}", *extra]))
    if scratch:
        arms.append(Arm("scratch", ["model.pretrained=null"]))
    if not arms:
        raise ConfigError("nothing to compare: give --pretrained ENCODER, or leave out --no-scratch")
    return arms


@dataclass
class RunSpec:
    """One Stage 3 run of a plan: a name (its folder), labels for the report, its cases and overrides."""

    name: str
    labels: dict[str, Any]
    training: list[Case]
    validation: list[Case]
    overrides: list[str] = field(default_factory=list)


@dataclass
class Experiment:
    """What every run of an experiment shares."""

    protocol: str
    out: Path
    preset: str
    overrides: list[str]
    cases: ExperimentCases
    arms: list[Arm]
    checkpoint: str = "last"  # which model is scored: the final one, or the best by validation Dice
    federated_local_steps: int | None = None  # train each run as a one-site NVFlare federation of rounds of this many steps

    def base_config(self) -> RunConfig:
        return load_config(self.preset, self.overrides)

    def run_config(self, run: RunSpec) -> RunConfig:
        run_dir = self.out / "runs" / run.name
        placed = [f"data.datalist={run_dir / DATALIST}", "data.root=''", "data.fold=null", f"train.output_dir={run_dir / 'train'}"]
        config = load_config(self.preset, [*self.overrides, *run.overrides, *placed])
        if config.stage != "finetune":
            raise ConfigError(f"--preset {self.preset}: stage is {config.stage!r}; experiments fine-tune (a stage3_* preset)")
        return config


@dataclass
class Outcome:
    """Every run's ``metrics.json`` content (plan order), and which runs this invocation trained or skipped."""

    records: list[dict[str, Any]]
    executed: list[str]
    skipped: list[str]


def run_experiment(experiment: Experiment, plan: list[RunSpec], write_report: Callable[[Experiment, list[dict]], dict[str, Path]]) -> Outcome:
    """Write the experiment's resolved config, execute every unfinished run of ``plan``, then the report."""
    out = experiment.out
    out.mkdir(parents=True, exist_ok=True)
    names = [run.name for run in plan]
    if len(set(names)) != len(names):
        raise ConfigError(f"experiment {experiment.protocol}: run names repeat in the plan")
    _write_yaml(experiment.base_config().to_dict(), out / CONFIG)
    atomic_write_json(
        {
            "protocol": experiment.protocol,
            "command": " ".join(sys.argv),
            "preset": experiment.preset,
            "overrides": experiment.overrides,
            "arms": {arm.name: arm.overrides for arm in experiment.arms},
            "datalist": str(experiment.cases.path),
            "checkpoint_scored": experiment.checkpoint,
            "federated_local_steps": experiment.federated_local_steps,
            "runs": names,
        },
        out / "experiment.json",
    )
    outcome = Outcome([], [], [])
    for i, run in enumerate(plan, 1):
        run_dir = out / "runs" / run.name
        config = experiment.run_config(run)
        datalist = experiment.cases.run_datalist(run.training, run.validation)
        if (run_dir / METRICS).is_file():
            _check_unchanged(run_dir, config, datalist)
            outcome.records.append(_read_json(run_dir / METRICS))
            outcome.skipped.append(run.name)
            log.info("[%d/%d] %s: finished before, skipped", i, len(plan), run.name)
            continue
        log.info("[%d/%d] %s: %d training, %d held-out case(s)", i, len(plan), run.name, len(run.training), len(run.validation))
        outcome.records.append(execute_run(experiment, run, run_dir, config, datalist))
        outcome.executed.append(run.name)
    atomic_write_json({"protocol": experiment.protocol, "runs": outcome.records}, out / "results.json")
    write_report(experiment, outcome.records)
    return outcome


def execute_run(experiment: Experiment, run: RunSpec, run_dir: Path, config: RunConfig, datalist: dict[str, Any]) -> dict[str, Any]:
    """Train and score one run in a fresh ``run_dir`` (a half-finished one is removed first); write ``metrics.json``."""
    from bsf.evaluate import evaluate
    from bsf.predict import load_finetuned
    from bsf.train import train

    if run_dir.exists():
        log.info("%s: removing an unfinished run (no %s)", run_dir, METRICS)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    atomic_write_json(datalist, run_dir / DATALIST)
    _write_yaml(config.to_dict(), run_dir / CONFIG)
    started = time.perf_counter()
    if experiment.federated_local_steps:
        from bsf.pipeline.one_site import train_federated

        models, losses = train_federated(config, run_dir / CONFIG, run_dir, experiment.federated_local_steps), []
    else:
        summary = train(config)
        models = {name: Path(config.train.output_dir) / file for name, file in CHECKPOINTS.items()}
        losses = [step["loss"] for step in summary["train"][-10:]]
    trained = time.perf_counter()
    checkpoint = models[experiment.checkpoint]
    finetuned = load_finetuned(checkpoint, run_dir / CONFIG, device=config.train.device)
    evaluation = evaluate(finetuned, run_dir / DATALIST, split="validation", out_dir=run_dir / "eval", progress=False)
    record = {
        "run": run.name,
        "labels": run.labels,
        "metrics": {name: stats["mean"] for name, stats in evaluation.summary["metrics"].items()},
        "case_statistics": evaluation.summary["metrics"],
        "n_training": len(run.training),
        "n_held_out": len(run.validation),
        "training_cases": ids(run.training),
        "held_out_cases": ids(run.validation),
        "steps": config.train.steps,
        "federated": bool(experiment.federated_local_steps),
        "final_train_loss": sum(losses) / len(losses) if losses else None,
        "model_scored": str(checkpoint),
        "seconds": {"train": round(trained - started, 1), "evaluate": round(time.perf_counter() - trained, 1)},
    }
    atomic_write_json(record, run_dir / METRICS)
    log.info("%s: %s", run.name, ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items()))
    return record


def _check_unchanged(run_dir: Path, config: RunConfig, datalist: dict[str, Any]) -> None:
    """A finished run is reused only if its config and cases are what this invocation would use."""
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(f"finished run {run_dir} has no {CONFIG}; delete that run folder to redo it")
    changed = _differences(yaml.safe_load((run_dir / CONFIG).read_text()) or {}, config.to_dict())
    if _read_json(run_dir / DATALIST) != _read_json_text(datalist):
        changed.append("its cases (datalist.json)")
    if changed:
        raise ConfigError(
            f"finished run {run_dir} was made with a different setup ({', '.join(changed[:8])}); "
            "use a new --out, or delete that run folder to redo it"
        )


def _differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ; keys only one side has (a config field added or removed since) are ignored."""
    out = []
    for key in sorted(set(stored) & set(current)):
        x, y = stored[key], current[key]
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}")
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc}); delete its run folder to redo the run") from None


def _read_json_text(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj))


def _write_yaml(obj: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False))
