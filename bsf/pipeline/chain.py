"""Stage 1 -> 2 -> 3 for BraTS and ATLAS in NVFlare's simulator, each stage's global model feeding the next.

::

    bsf chain --out chain_out            # CPU-demo size (python simulator/chain.py is the same command)
    bsf chain --out /tmp/chain --tiny    # 1-2 rounds x 1 step: a smoke test (minutes)
    bsf chain --out chain_out --sites ukb=3,brats=2,atlas=2 --rounds 5 --local-steps 10
    bsf chain --out het --tiny --sites ukb=1,brats=2,atlas=1 --stages stage1 stage2_all stage3_brats stage3_atlas

Simulated sites hold synthetic data of one kind (default 2 UKB-like, 2 BraTS-like, 1 ATLAS-like),
written once under ``<out>/data/<site>/`` and mapped to the sites by ``<out>/sites.yaml``
(``BSF_SITE_CONFIG``; each site's data set and the modalities it holds). The stages are those of the graph
(:mod:`bsf.federation.stages`) whose data sets are targets, or those named by ``--stages`` (any stage of the
graph; a stage across data sets such as ``stage2_all`` runs at the sites of all its data sets, each on its
own data), run as the committed jobs do (``bsf.fl.jobs.COMMITTED_JOBS``), exported with this run's sizes
and the model each starts from (:func:`bsf.federation.stages.start_point`) to ``<out>/jobs/`` and started with
``nvflare simulator`` exactly as a user would:

=============  ==========  ====================  ===============================================
job            sites       starts from           aggregates
=============  ==========  ====================  ===============================================
stage1         UKB-like    seeded init           encoder (SSL heads stay at the sites)
stage2_brats   BraTS-like  stage1 global         encoder; channels (t1, flair) -> BraTS's 4
stage2_atlas   ATLAS-like  stage1 global         encoder; channels (t1, flair) -> (t1)
stage3_brats   BraTS-like  stage2_brats global   whole SwinUNETR; cross-site evaluation (Dice)
stage3_atlas   ATLAS-like  stage2_atlas global   whole SwinUNETR; cross-site evaluation (Dice)
stage2_all     all sites   stage1 global         encoder, channels (t1, flair) -> t1, t1ce, t2, flair;
                                                 each modality's first-layer filters over its sites
=============  ==========  ====================  ===============================================

(``stage2_all`` only with ``--stages``; then ``stage3_brats``/``stage3_atlas`` start from it unless their own
data set's Stage 2 is listed too.)

Results: ``<out>/models/<job>.pt`` (each stage's ``FL_global_model.pt``), ``<out>/ws/<job>/``
(simulator workspaces), ``<out>/logs/<job>.log``, and the report ``<out>/report/`` (``report.md``,
``loss_curves.png``, ``dice_per_round.png``, ``overlay.png``, ``cross_site_<job>.{md,json}``,
``chain_summary.json``). A stage that produces no global model stops the chain with the server's
reason (e.g. a missing or incompatible previous model).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from bsf.errors import BSFError
from bsf.federation import run_folders
from bsf.fl.crosssite import write_cross_site_table
from bsf.fl.jobs import COMMITTED_JOBS, JobSpec, export_job
from bsf.federation.site_config import ENV_SITE_CONFIG, site_seed
from bsf.federation.stages import STAGES, Stage, StartPoint, plan, start_point
from bsf.pipeline.sites import parse_sites, site_datasets, site_entry, stage_sites

log = logging.getLogger(__name__)

FIRST_STAGE = "stage1"


class ChainError(BSFError):
    """A stage of the chain did not produce its global model; the message says why and where the logs are."""


@dataclass
class ChainConfig:
    """Sizes and choices of one chained run (``tiny()`` and ``demo()`` are the two presets)."""

    out: Path
    sites: dict[str, int] = field(default_factory=lambda: {"ukb": 2, "brats": 2, "atlas": 1})
    targets: tuple[str, ...] = ("brats", "atlas")  # Stage 2/3 data sets (when no stage_names are given)
    stage_names: tuple[str, ...] = ()  # the stages to run (any of the graph, parents first); empty: by targets
    subjects: int = 4          # synthetic subjects per site (one of them is the site's validation case)
    spacing: float = 3.0       # mm; 3 mm: UKB 61x73x61, BraTS 80x80x52, ATLAS 66x78x63 voxels
    rounds: int = 3            # Stages 1 and 2
    stage3_rounds: int = 4
    local_steps: int = 4
    crops_per_volume: int = 1  # 64^3 crops per volume and step (the presets use 2)
    threads_per_site: int = 1  # OMP threads per simulated site
    cross_site_ssl: bool = False  # cross-site evaluation for Stages 1 and 2 too (always for Stage 3)
    stage1_model: str | None = None  # skip Stage 1 and start Stage 2 from this model
    timeout_s: int = 3600      # per stage

    @classmethod
    def tiny(cls, out: str | os.PathLike, **changes: Any) -> "ChainConfig":
        """The test size: 3 subjects per site, Stages 1-2 one round of one step, Stage 3 two rounds of one step."""
        base = dict(subjects=3, rounds=1, stage3_rounds=2, local_steps=1, crops_per_volume=1)
        return cls(out=Path(out), **{**base, **changes})

    @classmethod
    def demo(cls, out: str | os.PathLike, **changes: Any) -> "ChainConfig":
        return cls(out=Path(out), **changes)

    def __post_init__(self) -> None:
        self.out = Path(self.out).resolve()
        datasets = site_datasets(self.sites)  # refuses unknown data sets
        for target in () if self.stage_names else self.targets:
            if target not in ("brats", "atlas"):
                raise BSFError(f"--targets: {target!r} is not brats or atlas")
            if self.sites.get(target, 0) < 1:
                raise BSFError(f"--targets {target} needs at least one {target} site (--sites {target}=N)")
        for stage in self.stages():  # every stage has sites
            if stage.name == FIRST_STAGE and self.sites.get("ukb", 0) < 1:
                raise BSFError("Stage 1 needs at least one ukb site (or give --stage1-model)")
            stage_sites(stage, datasets)
        if self.subjects < 2:
            raise BSFError("--subjects must be >= 2 (one validation case per site)")
        if min(self.rounds, self.stage3_rounds, self.local_steps, self.crops_per_volume) < 1:
            raise BSFError("rounds, local steps and crops per volume must be >= 1")

    def site_names(self, stage: Stage) -> list[str]:
        """The sites that take part in ``stage``: those of all its data sets."""
        return stage_sites(stage, site_datasets(self.sites))

    def stages(self) -> list[Stage]:
        """The stages to run, parents first: ``stage_names``, else the graph's per-data-set stages on the target
        data sets (and Stage 1 unless its model is given)."""
        names = list(self.stage_names) or [
            s.name for s in STAGES.values()
            if (not s.across_datasets and s.datasets[0] in self.targets) or (not s.follows and not self.stage1_model)
        ]
        return [stage for stage, _ in plan(names, available=[FIRST_STAGE] if self.stage1_model else [])]


# ----------------------------------------------------------------------------- data and sites
def prepare_data(cfg: ChainConfig) -> dict[str, Path]:
    """Synthesise the data of each site that takes part in a stage once (seeded by the site's name); write the
    site map (each site's data set, modalities and data); return site -> root."""
    from bsf.data.synth import synthesize

    roots: dict[str, Path] = {}
    entries: dict[str, Any] = {}
    datasets = site_datasets(cfg.sites)
    taking_part = {site for stage in cfg.stages() for site in cfg.site_names(stage)}
    for site, dataset in datasets.items():
        if site in taking_part:
            root = cfg.out / "data" / site
            marker = root / ".complete"
            if not marker.is_file():
                if root.exists():
                    shutil.rmtree(root)
                log.info("synthesising %d %s-like subjects for %s at %g mm", cfg.subjects, dataset, site, cfg.spacing)
                synthesize(dataset, cfg.subjects, root, spacing=cfg.spacing, seed=site_seed(site))
                marker.write_text(f"{dataset} {cfg.subjects} {cfg.spacing}\n")
            roots[site] = root
            entries[site] = site_entry(dataset, root=str(root), datalist=None)
    site_map = cfg.out / "sites.yaml"
    site_map.write_text(
        "# Simulated sites of this chained run (written by bsf.pipeline.chain): site -> its data set, the modalities it holds and its synthetic data.\n"
        + yaml.safe_dump({"sites": entries}, sort_keys=False)
    )
    return roots


# ----------------------------------------------------------------------------- one stage
@dataclass
class StageResult:
    job: str
    dataset: str
    sites: list[str]
    rounds: int
    local_steps: int
    scope: str
    previous_stage: str | None
    previous_model: str | None
    seconds: float
    run_dir: str
    global_model: str
    best_model: str | None
    cross_site: dict[str, str] = field(default_factory=dict)


def _stage_spec(cfg: ChainConfig, stage: Stage, n_sites: int, start: StartPoint | None) -> JobSpec:
    """The stage's committed job with this run's sizes, starting from ``start``."""
    base = COMMITTED_JOBS[stage.name]
    finetune = stage.kind == "finetune"
    spec = replace(base, start=start, run_overrides=[*base.run_overrides, f"data.crops_per_volume={cfg.crops_per_volume}"])
    return spec.with_federation(
        rounds=cfg.stage3_rounds if finetune else cfg.rounds,
        local_steps=cfg.local_steps,
        min_clients=n_sites,
        cross_site_eval=finetune or cfg.cross_site_ssl,
    )


def _server_reason(log_text: str) -> str:
    for marker in ("CANNOT START", "Aborting current RUN due to FATAL_SYSTEM_ERROR", "Error", "ERROR"):
        lines = [line for line in log_text.splitlines() if marker in line]
        if lines:
            return lines[0].split(" - ", 2)[-1][:1500]
    return "no error reported; see the log"


def run_stage(cfg: ChainConfig, stage: Stage, start: StartPoint | None) -> StageResult:
    """Export ``stage``'s job (this run's sizes, starting from ``start``), run it with ``nvflare simulator``, check its artifacts."""
    sites = cfg.site_names(stage)
    spec = _stage_spec(cfg, stage, len(sites), start)
    job_dir = export_job(spec, cfg.out / "jobs")
    workspace = cfg.out / "ws" / stage.name
    if workspace.exists():
        shutil.rmtree(workspace)
    log_path = cfg.out / "logs" / f"{stage.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env[ENV_SITE_CONFIG] = str(cfg.out / "sites.yaml")
    env["OMP_NUM_THREADS"] = str(cfg.threads_per_site)
    previous_model = start.model if start else None
    fed = spec.federation
    nvflare = Path(sys.executable).with_name("nvflare")
    command = [
        str(nvflare) if nvflare.exists() else "nvflare", "simulator", str(job_dir),
        "-w", str(workspace), "-c", ",".join(sites), "-t", str(len(sites)),
    ]
    print(
        f"[chain] {stage.name}: {len(sites)} site(s) {', '.join(sites)}, {fed.rounds} round(s) x {fed.local_steps} step(s), "
        f"scope {fed.scope}" + (f", from {start.stage}'s model {previous_model}" if start else ""),
        flush=True,
    )
    started = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=cfg.timeout_s)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output, code = output + f"\n[chain] timed out after {cfg.timeout_s} s", -1
    seconds = time.perf_counter() - started
    log_path.write_text(output)
    run_dir = run_folders.simulator_run(workspace)
    global_model = run_folders.global_model(run_dir)
    if not global_model.is_file():  # the simulator can exit 0 after a configuration error: check the artifact
        raise ChainError(
            f"{stage.name} produced no global model (exit code {code}): {_server_reason(output)}\n"
            f"  log: {log_path}; workspace: {workspace}"
        )
    models = cfg.out / "models"
    models.mkdir(parents=True, exist_ok=True)
    kept = models / f"{stage.name}.pt"
    shutil.copyfile(global_model, kept)
    best = run_folders.best_model(run_dir)
    result = StageResult(
        job=stage.name, dataset="+".join(stage.datasets), sites=sites, rounds=fed.rounds, local_steps=fed.local_steps,
        scope=fed.scope, previous_stage=start.stage if start else None,
        previous_model=str(previous_model) if previous_model else None, seconds=round(seconds, 1),
        run_dir=str(run_dir), global_model=str(kept), best_model=str(best) if best.is_file() else None,
    )
    if fed.cross_site_eval:
        try:
            json_path, md_path = write_cross_site_table(
                run_dir, cfg.out / "report" / f"cross_site_{stage.name}", title=f"Cross-site evaluation: {stage.name}"
            )
            result.cross_site = {"json": str(json_path), "markdown": str(md_path)}
        except FileNotFoundError as exc:
            raise ChainError(f"{stage.name}: {exc}; log: {log_path}") from None
    print(f"[chain] {stage.name}: done in {seconds:.0f} s -> {kept}", flush=True)
    return result


# ----------------------------------------------------------------------------- the chain
def run_chain(cfg: ChainConfig) -> dict[str, Any]:
    """Run every stage in order and write the report; returns the summary (also ``report/chain_summary.json``)."""
    from bsf.pipeline.report import write_report

    started = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    roots = prepare_data(cfg)
    results: dict[str, StageResult] = {}
    models: dict[str, Path] = {}
    if cfg.stage1_model:
        path = Path(cfg.stage1_model).resolve()
        if not path.is_file():
            raise ChainError(f"--stage1-model {path}: no such file")
        models[FIRST_STAGE] = path
    for stage in cfg.stages():
        result = run_stage(cfg, stage, start_point(stage.name, models))
        results[stage.name] = result
        models[stage.name] = Path(result.global_model)
    summary: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "sites": {site: str(root) for site, root in roots.items()},
        "site_datasets": site_datasets(cfg.sites),
        "stages": {job: asdict(r) for job, r in results.items()},
        "models": {job: str(p) for job, p in models.items()},
    }
    report = write_report(cfg, summary)
    summary["report"] = {k: str(v) for k, v in report.items()}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    path = cfg.out / "report" / "chain_summary.json"
    path.write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    print(f"[chain] done in {summary['seconds']:.0f} s; report: {report['markdown']}", flush=True)
    return summary


def add_chain_parser(sub) -> None:
    """Add ``bsf chain`` to the ``bsf`` parser's subparsers ``sub``."""
    p = sub.add_parser(
        "chain",
        help="chain Stage 1 -> 2 -> 3 (BraTS and ATLAS) in the NVFlare simulator on synthetic sites and write a report",
    )
    p.add_argument("--out", required=True, help="output folder (data, jobs, workspaces, models, report)")
    p.add_argument("--tiny", action="store_true", help="test size: 3 subjects/site, 1 round x 1 step (Stage 3: 2 rounds)")
    p.add_argument("--sites", type=parse_sites, help="sites per data set, e.g. ukb=2,brats=2,atlas=1 (the default)")
    p.add_argument("--targets", help="Stage 2/3 data sets, comma-separated (default: brats,atlas)")
    p.add_argument(
        "--stages", nargs="+", choices=list(STAGES),
        help="the stages to run (parents first, any order), e.g. stage1 stage2_all stage3_brats stage3_atlas "
        "(default: stage1 and the per-data-set stages of --targets)",
    )
    p.add_argument("--subjects", type=int, help="synthetic subjects per site")
    p.add_argument("--spacing", type=float, help="synthetic voxel size in mm (default 3)")
    p.add_argument("--rounds", type=int, help="rounds of Stages 1 and 2")
    p.add_argument("--stage3-rounds", type=int, help="rounds of Stage 3")
    p.add_argument("--local-steps", type=int, help="local steps per round (every stage)")
    p.add_argument("--crops-per-volume", type=int, help="64^3 crops per volume and step")
    p.add_argument("--threads-per-site", type=int, help="OMP threads per simulated site (default 1)")
    p.add_argument("--cross-site-ssl", action="store_true", help="cross-site evaluation for Stages 1 and 2 as well")
    p.add_argument("--stage1-model", help="skip Stage 1: start Stage 2 from this model (any layout bsf reads)")
    p.set_defaults(func=cmd_chain)


CHAIN_OPTIONS = ("sites", "subjects", "spacing", "rounds", "stage3_rounds", "local_steps", "crops_per_volume", "threads_per_site", "stage1_model")


def cmd_chain(args: argparse.Namespace) -> None:
    changes: dict[str, Any] = {name: getattr(args, name) for name in CHAIN_OPTIONS if getattr(args, name) is not None}
    if args.targets:
        changes["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if args.stages:
        changes["stage_names"] = tuple(args.stages)
    if args.cross_site_ssl:
        changes["cross_site_ssl"] = True
    run_chain((ChainConfig.tiny if args.tiny else ChainConfig.demo)(args.out, **changes))
