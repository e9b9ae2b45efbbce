"""The POC path end to end: prepare, start, submit the stage jobs in order, wait, collect, stop (also on failure).

``bsf deploy poc --out poc_out`` (or ``provisioning/poc.sh``) calls :func:`run_poc`. The listed stage
jobs (:data:`bsf.fl.jobs.COMMITTED_JOBS`) run in the order of the stage graph (:mod:`bsf.federation.stages`),
with the requested rounds and steps; each stage that follows another starts from the downloaded
global model :func:`bsf.federation.stages.start_point` finds: the nearest stage up its line that ran (so
``stage2_atlas`` after ``stage2_brats`` starts from ``stage1``, and ``stage3_brats`` straight after
``stage1`` from ``stage1``'s model, channels adapted). The model is a server-side path baked into the
job.

Sites: a list of names (every site runs every stage and synthesises the job's data set), or site -> data set
(``bsf deploy poc --sites ukb=1,brats=2,atlas=1``): then each site gets a site configuration naming its data
set and modalities (synthetic data of that data set, ``site_configs/<site>.yaml`` in its kit) unless one is given,
and each stage runs only at the sites of its data sets (the job's deploy map and ``min_clients``), so a stage
across data sets (``stage2_all``) runs at all of them. What it leaves in ``out``::

    models/<stage>_FL_global_model.pt, models/<stage>_best_FL_global_model.pt
    results/<job id>/workspace/     the server's run folder: bsf_rounds.jsonl, bsf_metrics.json, tb_events/, logs
    poc_summary.json                per stage: job id, status, sites, rounds, accepted/rejected sites, last round's metrics
    site_configs/<site>.yaml        with sites by data set: each site's configuration (data set, modalities, synthetic)
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

import yaml

from bsf.errors import BSFError
from bsf.federation import run_folders
from bsf.fl.deploy.poc import DeploymentError, PocDeployment
from bsf.federation.stages import Stage, plan, start_point
from bsf.pipeline.sites import site_entry, stage_sites

log = logging.getLogger(__name__)

COMPLETED = "FINISHED:COMPLETED"


def stage_summary(run_dir: Path) -> dict[str, Any]:
    """Rounds, accepted/rejected sites and the last round's aggregated metrics from a server run folder."""
    rounds = run_folders.read_rounds(run_dir)
    return {
        "rounds": len(rounds),
        "accepted_sites": [r.get("accepted_sites", []) for r in rounds],
        "rejected_sites": [r.get("rejected_sites", []) for r in rounds],
        "last_metrics": rounds[-1].get("metrics", {}) if rounds else {},
    }


def sites_of(stage: Stage, sites: Sequence[str] | Mapping[str, str]) -> list[str]:
    """The sites that run ``stage``: all of ``sites`` (names), or of ``site -> data set`` those of its data sets."""
    if not isinstance(sites, Mapping):
        return list(sites)
    try:
        return stage_sites(stage, sites)
    except BSFError as exc:
        raise DeploymentError(str(exc)) from None


def plan_jobs(
    jobs: Sequence[str], sites: Sequence[str] | Mapping[str, str], num_rounds: int | None = None,
    local_steps: int | None = None, overrides: Sequence[str] = (), cross_site_eval: bool | None = None,
    encryption: str | None = None, uplink_mbit: float | None = None,
) -> list[tuple[Any, list[str]]]:
    """The listed committed jobs in stage-graph order with this run's sizes, each with the sites that run it
    (:func:`sites_of`; ``min_clients`` at most their number); their starting models come later.

    A stage whose predecessor (nor any stage up its line) is listed, or that no site can run, is an error here,
    before anything starts.
    """
    from bsf.fl.jobs import COMMITTED_JOBS

    unknown = [j for j in jobs if j not in COMMITTED_JOBS]
    if unknown:
        raise DeploymentError(f"unknown stage job(s) {unknown}; choose from {sorted(COMMITTED_JOBS)}")
    by_stage = {COMMITTED_JOBS[j].stage: COMMITTED_JOBS[j] for j in jobs}
    if len(by_stage) < len(jobs):
        raise DeploymentError(f"--stages {' '.join(jobs)}: two jobs of the same stage")
    specs = []
    for stage, _ in plan(list(by_stage)):
        spec = by_stage[stage.name]
        names = sites_of(stage, sites)
        changes = {"min_clients": min(spec.federation.min_clients, len(names))}
        changes.update({k: v for k, v in (("rounds", num_rounds), ("local_steps", local_steps), ("cross_site_eval", cross_site_eval),
                                          ("uplink_mbit", uplink_mbit)) if v is not None})
        if encryption == "he":  # the server holds only the encrypted model: no cross-site evaluation
            changes.update(encryption="he", cross_site_eval=False)
        specs.append((replace(spec, run_overrides=[*spec.run_overrides, *overrides]).with_federation(**changes), names))
    return specs


def _run_job(poc: PocDeployment, spec, out: Path, timeout: float, sites: Sequence[str] | None = None) -> dict[str, Any]:
    """Submit ``spec``'s exported job (deployed to ``sites`` only when given, else to every site), wait, download
    its run folder; return its summary entry."""
    from bsf.fl.deploy.targets import target_sites
    from bsf.fl.jobs import export_job

    job_dir = export_job(spec, out / "jobs")
    if sites is not None:
        target_sites(job_dir, sites)
    job_id = poc.submit(job_dir)
    status = poc.wait(job_id, timeout=timeout)
    run_dir = poc.download(job_id, out / "results")
    entry = {"job_id": job_id, "status": status, "run_dir": str(run_dir), **stage_summary(run_dir)}
    if spec.start is not None:
        entry["started_from"] = {"stage": spec.start.stage, "model": str(spec.start.model)}
    return entry


def _keep_models(spec, entry: dict[str, Any], models: Path, client_context: Path | None = None) -> Path:
    """Copy a completed job's global (and best) model into ``models``; return the global one. A failed job: DeploymentError.

    An encrypted job's models are decrypted with ``client_context`` (a site's ``client_context.tenseal``), as a site
    would for the lead: the next stage starts from the plaintext model.
    """
    run_dir = Path(entry["run_dir"])
    if entry["status"] != COMPLETED or not run_folders.global_model(run_dir).is_file():
        raise DeploymentError(f"{spec.name} (job {entry['job_id']}) ended {entry['status']} without a global model; see {run_dir}/log.txt")
    for source in (run_folders.global_model(run_dir), run_folders.best_model(run_dir)):
        if source.is_file() and spec.federation.encryption == "he":
            _decrypt_model(source, models / f"{spec.name}_{source.name}", client_context, run_dir)
        elif source.is_file():
            shutil.copyfile(source, models / f"{spec.name}_{source.name}")
    kept = models / f"{spec.name}_{run_folders.GLOBAL_MODEL}"
    entry["global_model"] = str(kept)
    log.info("%s: %s, %d rounds, global model %s", spec.name, entry["status"], entry["rounds"], kept)
    return kept


def _decrypt_model(source: Path, target: Path, client_context: Path, run_dir: Path) -> None:
    """``source`` (an encrypted global model) decrypted into ``target`` as ``{"model": state_dict}``."""
    import torch

    from bsf.fl.deploy.privacy import model_shapes_from_run_config
    from bsf.fl.he import decrypt_global_model

    shapes = model_shapes_from_run_config(run_dir / "app_server" / "config" / run_folders.RUN_CONFIG_FILE)
    plain = decrypt_global_model(source, client_context, shapes)
    torch.save({"model": {k: torch.from_numpy(v) for k, v in plain.items()}}, target)


def dataset_site_configs(out: Path, sites: Mapping[str, str], given: Mapping[str, str] | None = None) -> dict[str, str]:
    """Each site's configuration file: ``given[site]``, else ``out/site_configs/<site>.yaml`` written here, naming
    the site's data set and modalities (:func:`bsf.pipeline.sites.site_entry`) and no data: the site synthesises
    a small set of its data set in its workspace."""
    folder = out / "site_configs"
    configs: dict[str, str] = {}
    for site, dataset in sites.items():
        if given and given.get(site):
            configs[site] = str(given[site])
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{site}.yaml"
        path.write_text(
            f"# POC site {site} (written by bsf.pipeline.poc_run): it synthesises {dataset}-like data for itself.\n"
            + yaml.safe_dump(site_entry(dataset), sort_keys=False)
        )
        configs[site] = str(path)
    return configs


def run_poc(
    out: str | os.PathLike, stages: Sequence[str] = ("stage1",),
    sites: Sequence[str] | Mapping[str, str] = ("site-1", "site-2"),
    num_rounds: int | None = None, local_steps: int | None = None, overrides: Sequence[str] = (),
    site_configs: Mapping[str, str] | None = None, cross_site_eval: bool | None = None,
    env: Mapping[str, str] | None = None, timeout: float = 3600, encryption: str | None = None,
    uplink_mbit: float | None = None,
) -> dict[str, Any]:
    """Run ``stages`` on a fresh local deployment of ``sites``; returns the summary also written to ``poc_summary.json``.

    ``sites``: names (every site runs every stage), or site -> data set (each stage at the sites of its data
    sets; sites without a ``site_configs`` entry get one naming their data set, :func:`dataset_site_configs`).
    ``encryption="he"``: every stage's updates are encrypted (the kits get TenSEAL contexts; see :mod:`bsf.fl.he`).
    ``uplink_mbit``: the sites' link (Mbit/s): every job's ``federation.uplink_mbit`` (task timeouts) and every kit's
    ``comm_config.json`` (NVFlare's streaming timeouts, :func:`bsf.fl.deploy.kit.write_comm_config`).
    """
    specs = plan_jobs(stages, sites, num_rounds, local_steps, overrides, cross_site_eval, encryption, uplink_mbit)
    he = encryption == "he"
    out = Path(out).resolve()
    (out / "models").mkdir(parents=True, exist_ok=True)
    by_dataset = isinstance(sites, Mapping)
    if by_dataset:
        site_configs = dataset_site_configs(out, sites, site_configs)
    summary: dict[str, Any] = {"sites": dict(sites) if by_dataset else list(sites), "stages": {}}
    models: dict[str, Path] = {}  # stage -> its downloaded global model
    try:
        with PocDeployment(out, sites=list(sites), site_configs=site_configs, env=env, he=he, uplink_mbit=uplink_mbit) as poc:
            poc.start()
            for base, names in specs:
                spec = replace(base, start=start_point(base.stage, models))
                entry = summary["stages"][spec.name] = _run_job(poc, spec, out, timeout, names if by_dataset else None)
                entry["sites"] = names
                context = poc.kit(names[0]) / "startup" / "client_context.tenseal" if he else None
                models[spec.stage] = _keep_models(spec, entry, out / "models", context)
    finally:
        (out / "poc_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
