"""Centralized driver: ``bsf train`` on one process, or ``torchrun --nproc_per_node=N -m bsf.train`` for DDP.

Writes into ``train.output_dir``:
- ``checkpoint_last.pt``: full resumable engine state (atomic),
- ``run_log.json``: the loss and validation records up to ``checkpoint_last.pt``'s step, so a resumed
  run's summary and loss curve hold the whole run, not only the steps after the restart,
- ``checkpoint_best.pt``: ``{"model": state_dict, "step", "metrics", "bsf_model"}`` at the best validation metric
  (``bsf_model``: its input channels by modality, stage kind and data set, :mod:`bsf.model.provenance`),
- ``summary.json``: per-step losses and validation history of the whole run, timings, and the paths above,
- ``tb/``: TensorBoard scalars.

A folder that holds an earlier run (any of these) is never replaced by surprise (:func:`check_run_folder`, before
any work): ``--resume`` continues that run, ``--force`` starts over and replaces it (the earlier run's files are
removed once the new run is set up, so no stale ``checkpoint_best.pt`` or TensorBoard curve survives). A fresh or
empty folder, or one holding only other files, needs neither. The run owns that folder: at start it removes the
temporary files (``.<name>.<random>.tmp``, :mod:`bsf.io`) that killed earlier runs left of the files above, whatever
their age; other temporary files there are left alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from tqdm import tqdm

from bsf.config import RunConfig, load_config
from bsf.console import add_train_arguments, plain_text, run_guarded
from bsf.engine import Engine, resolve_device
from bsf.engine.stage_model import describe_config
from bsf.errors import BSFError, CheckpointError, ConfigError, OutputError
from bsf.io import atomic_torch_save, atomic_write_json, remove_own_temp_files
from bsf.model.provenance import META_KEY
from bsf.outputs import check_output_folder, existing_outputs

log = logging.getLogger(__name__)

LAST, BEST, SUMMARY, RUN_LOG = "checkpoint_last.pt", "checkpoint_best.pt", "summary.json", "run_log.json"
TENSORBOARD = "tb"
#: what a run writes into ``train.output_dir`` (files, then the TensorBoard folder)
RUN_FILES = (LAST, BEST, SUMMARY, RUN_LOG)


class TrainingDiverged(BSFError):
    """The loss became NaN or infinite."""


@dataclass
class DistributedContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistributedContext:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(dist.get_rank(), local_rank, world_size)


def prepare_output_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def earlier_run(path: str | os.PathLike) -> list[Path]:
    """What an earlier run left in ``path``: those of :data:`RUN_FILES` that exist, and ``tb/`` when it holds events."""
    out = Path(path)
    found = existing_outputs(out / name for name in RUN_FILES)
    board = out / TENSORBOARD
    if board.is_dir() and any(board.iterdir()):
        found.append(board)
    return found


def check_run_folder(path: str | os.PathLike, *, resume: bool = False, force: bool = False) -> None:
    """Check ``train.output_dir`` before any work (``force``: the earlier run's files are replaced, :func:`earlier_run`).

    Refused (OutputError naming the folder): a file where the folder should be, a folder where the run writes a
    file, ``resume`` and ``force`` together, and a folder holding an earlier run (:func:`earlier_run`) unless
    ``resume`` (continue it: needs its ``checkpoint_last.pt``) or ``force`` (start over, replacing it).
    """
    out = check_output_folder(path, what="train.output_dir", reuse=True)
    for name in RUN_FILES:
        if (out / name).is_dir():
            raise OutputError(f"train.output_dir {out}: {out / name} is a folder where the run writes a file; move it away")
    board = out / TENSORBOARD
    if (board.exists() or board.is_symlink()) and not board.is_dir():
        raise OutputError(f"train.output_dir {out}: {board} is not a folder, where the run writes its TensorBoard folder; move it away")
    earlier = earlier_run(out)
    names = ", ".join(p.name + ("/" if p.name == TENSORBOARD else "") for p in earlier)
    if resume and force:
        raise OutputError(f"train.output_dir {out}: --resume continues the run there and --force starts over, replacing it; "
                          "give one of them")
    if force or not earlier:
        return
    if not resume:
        raise OutputError(f"train.output_dir {out}: holds an earlier run ({names}); pass --resume to continue that run, "
                          "or --force to start over, replacing it")
    if not (out / LAST).is_file():
        raise OutputError(f"train.output_dir {out}: holds an earlier run ({names}) but no {LAST} for --resume to continue "
                          "from; pass --force to start over, replacing it")


def _remove_earlier_run(out: Path) -> None:
    """Remove what an earlier run left in ``out`` (``--force``: start over), logging each path."""
    for path in earlier_run(out):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        log.warning("start over (--force): removed %s of an earlier run", path)


@dataclass
class RunLog:
    """What a run reports: one record per step and per validation."""

    steps: list[dict[str, float]] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)

    def save(self, path: Path) -> None:
        atomic_write_json({"steps": self.steps, "validations": self.validations}, path)

    @classmethod
    def up_to(cls, path: Path, step: int) -> RunLog:
        """The records of ``path`` (a saved run log) at steps ``<= step``; empty when there is none.

        Records past ``step`` were made after the checkpoint being resumed and are run again."""
        if not path.is_file():
            log.warning("%s: no earlier run log; the summary starts at step %d", path, step)
            return cls()
        try:
            saved = json.loads(path.read_text())
            return cls([r for r in saved["steps"] if r["step"] <= step], [r for r in saved["validations"] if r["step"] <= step])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a run log of this project ({exc}); remove it to resume without the earlier records") from None


def train(config: RunConfig, *, resume: bool = False, start_over: bool = False) -> dict[str, Any]:
    """Run ``config.train.steps`` optimiser steps (continuing a previous run when ``resume``); return the summary.

    ``start_over``: remove an earlier run's files from ``train.output_dir`` (:func:`earlier_run`) once the engine is
    set up, before the first step (``--force``). Nothing here refuses a folder: :func:`check_run_folder` does,
    before, for ``bsf train``.
    """
    ctx = init_distributed(config.train.device)
    try:
        return _train(config, ctx, resume, start_over)
    finally:
        if ctx.world_size > 1:
            dist.destroy_process_group()


def _train(config: RunConfig, ctx: DistributedContext, resume: bool, start_over: bool = False) -> dict[str, Any]:
    out = prepare_output_dir(config.train.output_dir)
    if ctx.is_main:  # the run owns its folder: a killed earlier run's temporary files of these targets are its own
        remove_own_temp_files(out, RUN_FILES)
    device = resolve_device(config.train.device, ctx.local_rank)
    engine = Engine(config, rank=ctx.rank, world_size=ctx.world_size, device=device)
    if start_over and ctx.is_main:
        _remove_earlier_run(out)
    run_log = RunLog()
    if resume and (out / LAST).exists():
        engine.load_checkpoint(out / LAST)
        log.info("resumed from %s at step %d", out / LAST, engine.step)
        run_log = RunLog.up_to(out / RUN_LOG, engine.step)
    first_step = engine.step
    writer = _tensorboard(out) if ctx.is_main else None
    started = time.perf_counter()
    bar = tqdm(total=config.train.steps, initial=engine.step, desc="train", unit="step", disable=not (ctx.is_main and config.train.progress))
    while engine.step < config.train.steps:
        record = engine.train_steps(1)[0]
        if not math.isfinite(record["loss"]):
            raise TrainingDiverged(f"loss became {record['loss']} at step {record['step']}; lower optim.lr or enable optim.grad_clip")
        run_log.steps.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if writer and record["step"] % config.train.log_every == 0:
            for name, value in record.items():
                if name != "step":
                    writer.add_scalar(f"train/{name}", value, record["step"])
        if _due(engine.step, config.train.val_every, config.train.steps):
            _validate(engine, run_log, writer, out, ctx)
        if ctx.is_main and _due(engine.step, config.train.checkpoint_every, config.train.steps):
            run_log.save(out / RUN_LOG)  # first: a crash between the two leaves a log ahead of the checkpoint, never behind
            engine.save_checkpoint(out / LAST)
    bar.close()
    if writer:
        writer.close()
    summary = _summary(config, engine, run_log, out, time.perf_counter() - started, engine.step - first_step)
    if ctx.is_main:
        atomic_write_json(summary, out / SUMMARY)
        log.info("run finished: %d steps, summary in %s", engine.step, out / SUMMARY)
    return summary


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def _validate(engine: Engine, run_log: RunLog, writer, out: Path, ctx: DistributedContext) -> None:
    metrics = engine.validate()
    if not metrics:
        return
    run_log.validations.append({"step": engine.step, **metrics})
    if writer:
        for name, value in metrics.items():
            writer.add_scalar(f"val/{name}", value, engine.step)
    if engine.is_better(metrics) and ctx.is_main:
        described = {META_KEY: describe_config(engine.config).to_dict()}  # its channels, for the next stage
        atomic_torch_save({"model": engine.model.state_dict(), "step": engine.step, "metrics": metrics, **described}, out / BEST)
        log.info("step %d: new best %s = %.5f", engine.step, engine.task.best_metric, metrics[engine.task.best_metric])


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "tb"))


def _summary(config: RunConfig, engine: Engine, run_log: RunLog, out: Path, seconds: float, steps_this_run: int) -> dict[str, Any]:
    return {
        "config": config.to_dict(),
        "steps_done": engine.step,
        "steps_this_run": steps_this_run,
        "seconds": round(seconds, 2),
        "seconds_per_step": round(seconds / max(1, steps_this_run), 4),
        "train": run_log.steps,
        "validation": run_log.validations,
        "best": engine.best,
        "checkpoints": {"last": str(out / LAST), "best": str(out / BEST) if (out / BEST).exists() else None},
        "world_size": engine.world_size,
    }


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``bsf train`` / ``torchrun -m bsf.train``: the config, the run folder checked (every rank, before any work), the run."""
    config = load_config(args.config, args.overrides)
    check_run_folder(config.train.output_dir, resume=args.resume, force=args.force)
    return train(config, resume=args.resume, start_over=args.force)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``torchrun -m bsf.train``; same arguments as ``bsf train``."""
    parser = argparse.ArgumentParser(prog="python -m bsf.train", description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    return run_guarded(lambda: run_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
