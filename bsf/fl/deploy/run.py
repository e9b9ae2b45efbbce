"""The POC path end to end: prepare, start, submit the stage jobs in order, wait, collect, stop (also on failure).

``bsf deploy poc --out poc_out`` (or ``provisioning/poc.sh``) calls :func:`run_poc`. Each stage's
job is exported from :data:`bsf.fl.jobs.COMMITTED_JOBS` with the requested rounds and steps; Stages 2
and 3 start from the previous stage's downloaded global model (a server-side path baked into the
job). What it leaves in ``out``::

    models/<stage>_FL_global_model.pt, models/<stage>_best_FL_global_model.pt
    results/<job id>/workspace/     the server's run folder: bsf_rounds.jsonl, bsf_metrics.json, tb_events/, logs
    poc_summary.json                per stage: job id, status, rounds, accepted/rejected sites, last round's metrics
    poc/                            the kits and every participant's workspace and logs (sites' privacy audits)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from bsf.fl.deploy.poc import DeploymentError, PocDeployment

log = logging.getLogger(__name__)

GLOBAL_MODEL = "FL_global_model.pt"
BEST_MODEL = "best_FL_global_model.pt"
COMPLETED = "FINISHED:COMPLETED"


def stage_summary(run_dir: Path) -> dict[str, Any]:
    """Rounds, accepted/rejected sites and the last round's aggregated metrics from a server run folder."""
    rounds_file = run_dir / "bsf_rounds.jsonl"
    rounds = [json.loads(line) for line in rounds_file.read_text().splitlines()] if rounds_file.is_file() else []
    return {
        "rounds": len(rounds),
        "accepted_sites": [r.get("accepted_sites", []) for r in rounds],
        "rejected_sites": [r.get("rejected_sites", []) for r in rounds],
        "last_metrics": rounds[-1].get("metrics", {}) if rounds else {},
    }


def run_poc(
    out: str | os.PathLike, stages: Sequence[str] = ("stage1",), sites: Sequence[str] = ("site-1", "site-2"),
    num_rounds: int | None = None, local_steps: int | None = None, overrides: Sequence[str] = (),
    site_configs: Mapping[str, str] | None = None, cross_site_eval: bool | None = None,
    env: Mapping[str, str] | None = None, timeout: float = 3600,
) -> dict[str, Any]:
    """Run ``stages`` on a fresh local deployment of ``sites``; returns the summary also written to ``poc_summary.json``."""
    from bsf.fl.jobs import COMMITTED_JOBS, export_job

    unknown = [s for s in stages if s not in COMMITTED_JOBS]
    if unknown:
        raise DeploymentError(f"unknown stage job(s) {unknown}; choose from {sorted(COMMITTED_JOBS)}")
    out = Path(out).resolve()
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"sites": list(sites), "stages": {}}
    previous: Path | None = None
    try:
        with PocDeployment(out, sites=sites, site_configs=site_configs, env=env) as poc:
            poc.start()
            for stage in stages:
                spec = COMMITTED_JOBS[stage]
                changes: dict[str, Any] = {"min_clients": min(spec.min_clients, len(sites))}
                if num_rounds is not None:
                    changes["num_rounds"] = num_rounds
                if local_steps is not None:
                    changes["local_steps"] = local_steps
                if overrides:
                    changes["run_overrides"] = [*spec.run_overrides, *overrides]
                if cross_site_eval is not None:
                    changes["cross_site_eval"] = cross_site_eval
                if spec.require_pretrained:
                    if previous is None:
                        raise DeploymentError(f"{stage} needs the previous stage's model: list a Stage 1/2 job before it")
                    changes["pretrained"] = str(previous)
                job = export_job(replace(spec, **changes), out / "jobs")
                job_id = poc.submit(job)
                status = poc.wait(job_id, timeout=timeout)
                run_dir = poc.download(job_id, out / "results")
                entry = {"job_id": job_id, "status": status, "run_dir": str(run_dir), **stage_summary(run_dir)}
                summary["stages"][stage] = entry
                global_model = run_dir / "app_server" / GLOBAL_MODEL
                if status != COMPLETED or not global_model.is_file():
                    raise DeploymentError(f"{stage} (job {job_id}) ended {status} without a global model; see {run_dir}/log.txt")
                for name in (GLOBAL_MODEL, BEST_MODEL):
                    if (run_dir / "app_server" / name).is_file():
                        shutil.copyfile(run_dir / "app_server" / name, models / f"{stage}_{name}")
                entry["global_model"] = str(models / f"{stage}_{GLOBAL_MODEL}")
                previous = models / f"{stage}_{GLOBAL_MODEL}"
                log.info("%s: %s, %d rounds, global model %s", stage, status, entry["rounds"], previous)
    finally:
        (out / "poc_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
