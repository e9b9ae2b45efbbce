"""Continue a federated job whose server stopped mid-job, from its last persisted global model and round.

NVFlare does not restart a job that was running when its server went down (the restarted server marks
it aborted). What survives is in the job's server run folder, ``<server workspace>/<job id>/``:
``app_server/FL_global_model.pt``, written after every completed round together with that round's
number (``bsf_round``, see :class:`bsf.fl.persistor.BSFModelPersistor`). :func:`export_resume_job`
exports the same job again with

* ``initial_ckpt`` = that global model (an absolute path on the server), so round 0 of the new job
  sends exactly the last global model;
* ``federation.start_round`` = the next round; the job's ``federation.rounds`` stays the whole job's,
  so the FedAvg workflow runs only the rounds still to do and the sites' learning-rate schedule
  (``train.steps``) still spans the original job.

Sites restart their optimiser at the global weights (their own optimiser state and SSL heads are in the
stopped job's site folders, which a new job does not read): the resumed job continues the global model
and the round count, not each site's optimiser, so it is not bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from bsf.federation import run_folders
from bsf.fl.deploy.poc import DeploymentError


def last_completed_round(server_run_dir: str | os.PathLike) -> tuple[Path, int]:
    """The persisted global model of a stopped job and the round it is the result of (recorded inside it)."""
    model = run_folders.global_model(server_run_dir)
    if not model.is_file():
        raise DeploymentError(f"{server_run_dir}: no {model.name}; the job completed no round before it stopped, submit it again")
    last = run_folders.persisted_round(model)
    if last is None:
        raise DeploymentError(f"{model} does not record the round it is the result of ({run_folders.ROUND_KEY}); submit the job again")
    return model.resolve(), last


def export_resume_job(spec, server_run_dir: str | os.PathLike, out_root: str | os.PathLike) -> tuple[Path, int]:
    """Export ``spec`` (a :class:`bsf.fl.jobs.JobSpec`) to continue after the last round in ``server_run_dir``.

    Returns the job folder (named ``<name>_resume``) and the first round it runs.
    """
    from bsf.fl.jobs import export_job

    model, last = last_completed_round(server_run_dir)
    start = last + 1
    if start >= spec.federation.rounds:
        raise DeploymentError(f"{server_run_dir}: all {spec.federation.rounds} rounds were completed; nothing to resume")
    resumed = replace(spec, name=f"{spec.name}_resume", initial_ckpt=str(model)).with_federation(start_round=start)
    return export_job(resumed, out_root), start
