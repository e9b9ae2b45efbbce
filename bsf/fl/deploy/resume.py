"""Continue a federated job whose server stopped mid-job, from its last persisted global model and round.

NVFlare does not restart a job that was running when its server went down (the restarted server marks
it aborted). What survives is in the job's server run folder, ``<server workspace>/<job id>/``:
``app_server/FL_global_model.pt`` (written after every completed round) and ``bsf_rounds.jsonl`` (one
line per completed round). :func:`export_resume_job` exports the same job again with

* ``initial_ckpt`` = that global model (an absolute path on the server), so round 0 of the new job
  sends exactly the last global model;
* the FedAvg workflow's ``start_round`` = the next round, and only the rounds still to do;
* the run config's ``train.steps`` kept at the whole job's length, so the sites' learning-rate
  schedule still spans the original job.

Sites restart their optimiser at the global weights (their own optimiser state and SSL heads are in the
stopped job's site folders, which a new job does not read): the resumed job continues the global model
and the round count, not each site's optimiser, so it is not bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import yaml

from bsf.fl.deploy.poc import DeploymentError

GLOBAL_MODEL = Path("app_server") / "FL_global_model.pt"
ROUNDS_FILE = "bsf_rounds.jsonl"
WORKFLOW_ID = "fedavg"


def last_completed_round(server_run_dir: str | os.PathLike) -> tuple[Path, int]:
    """The persisted global model of a stopped job and the round it is the result of.

    The round record is written just before the model; a model file older than the last record
    (the server stopped in between) is the result of the round before.
    """
    run_dir = Path(server_run_dir)
    model = run_dir / GLOBAL_MODEL
    rounds_file = run_dir / ROUNDS_FILE
    if not model.is_file() or not rounds_file.is_file():
        raise DeploymentError(
            f"{run_dir}: no {GLOBAL_MODEL} or {ROUNDS_FILE}; the job completed no round before it stopped, submit it again"
        )
    rounds = [json.loads(line)["round"] for line in rounds_file.read_text().splitlines() if line.strip()]
    if not rounds:
        raise DeploymentError(f"{rounds_file}: no completed round recorded; submit the job again")
    last = max(rounds)
    if model.stat().st_mtime < rounds_file.stat().st_mtime:
        last -= 1
    if last < 0:
        raise DeploymentError(f"{model} holds no completed round's model; submit the job again")
    return model.resolve(), last


def export_resume_job(spec, server_run_dir: str | os.PathLike, out_root: str | os.PathLike) -> tuple[Path, int]:
    """Export ``spec`` (a :class:`bsf.fl.jobs.JobSpec`) to continue after the last round in ``server_run_dir``.

    Returns the job folder (named ``<name>_resume``) and the first round it runs.
    """
    from bsf.fl.jobs import export_job

    model, last = last_completed_round(server_run_dir)
    start = last + 1
    remaining = spec.num_rounds - start
    if remaining <= 0:
        raise DeploymentError(f"{server_run_dir}: all {spec.num_rounds} rounds were completed; nothing to resume")
    job = export_job(replace(spec, name=f"{spec.name}_resume", num_rounds=remaining, initial_ckpt=str(model)), out_root)
    server_config = job / "app" / "config" / "config_fed_server.json"
    config = json.loads(server_config.read_text())
    workflow = next(w for w in config["workflows"] if w["id"] == WORKFLOW_ID)
    workflow["args"]["start_round"] = start
    server_config.write_text(json.dumps(config, indent=4))
    run_config = job / "app" / "config" / "bsf_run.yaml"
    header = "".join(line for line in run_config.read_text().splitlines(keepends=True) if line.startswith("#"))
    raw = yaml.safe_load(run_config.read_text())
    raw["train"]["steps"] = spec.num_rounds * spec.local_steps
    run_config.write_text(header + f"# Resumed at round {start} from {model}\n" + yaml.safe_dump(raw, sort_keys=False))
    return job, start
