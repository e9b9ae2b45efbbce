"""The NVFlare Client API loop every BrainSegFounder-FL site runs (in-process, one Engine per job).

The job's thin entry script (``app/custom/bsf_client.py``) only calls :func:`main`. It runs
inside the NVFlare client job process (``ClientAPIExecutor``, ``in_process``), so the Engine
lives as long as the job: receive the global model -> load the aggregated part -> run
``local_steps`` -> send the part back (difference by default) with ``NUM_STEPS_CURRENT_ROUND``.

Everything the site needs comes from the job's run config (``config/bsf_run.yaml``): its
``federation:`` section (local steps, scope, transfer, ...) and the training settings, with the site's
own data location merged in (:mod:`bsf.federation.site_config`). The entry script takes no arguments.

Tasks: ``train`` (above), ``validate`` (metrics of a received model on the site's validation
cases; cross-site evaluation), ``submit_model`` (the site's current aggregated part).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsf.config import RunConfig
from bsf.errors import BSFError, ConfigError
from bsf.federation.preflight import run_preflight
from bsf.federation.run_folders import RUN_CONFIG_FILE
from bsf.federation.site_config import load_with_site, prepare_site_data, resolve_site
from bsf.federation.site_trainer import SiteTrainer
from bsf.federation.task_heads import site_task, task_settings
from bsf.fl.objectives import local_objective

log = logging.getLogger(__name__)

SITE_STATE_FOLDER = "bsf_site"


@dataclass
class SitePaths:
    """Folders of a deployed job on a site, derived from the entry script's location.

    NVFlare deploys an app as ``<workspace>/<job id>/app_<site>/{config,custom}`` (simulator:
    ``<ws>/<site>/simulate_job/app_<site>/...``), so the script in ``custom/`` finds the rest.
    """

    workspace: Path
    job: Path
    app: Path

    @property
    def app_config(self) -> Path:
        return self.app / "config"

    @classmethod
    def from_script(cls, script: str | Path) -> "SitePaths":
        script = Path(script).resolve()
        app = script.parent.parent
        job = app.parent
        workspace = job.parent
        if script.parent.name != "custom" or not (app / "config").is_dir():
            log.warning("entry script %s is not in a deployed app's custom/ folder; using the current folder", script)
            here = Path.cwd()
            return cls(workspace=here, job=here, app=here)
        return cls(workspace=workspace, job=job, app=app)


def site_run_config(site: str, paths: SitePaths) -> RunConfig:
    """The job's run config with this site's configuration merged in before validation; ``federation`` is required.

    The previous stage's model (Stage 2/3) is loaded and channel-adapted once, on the server, and arrives
    as the round-0 global model: a site never needs (or reads) that file itself. Across tasks
    (``federation.tasks``) the site's model is its task's (``model.out_channels`` from its data set).
    """
    run_config = paths.app_config / RUN_CONFIG_FILE
    site_config = resolve_site(site, paths.workspace)
    log.info("site %s: site configuration from %s", site, site_config.source)
    first = load_with_site(run_config, site_config)
    dataset = first.data.dataset
    tasks = first.federation.tasks if first.federation is not None else []
    task = task_settings(site_task(tasks, dataset, f"site {site}")) if tasks else {}
    site_config = prepare_site_data(site_config, dataset, paths.workspace)
    state_dir = paths.job / SITE_STATE_FOLDER
    config = load_with_site(run_config, site_config, {"train.output_dir": str(state_dir), "model.pretrained": None, **task})
    if config.federation is None:
        raise ConfigError(f"{run_config}: no federation section; export the job with `bsf jobs export`")
    return config


def make_engine(config: Any):
    """Build the site's Engine (isolated so tests can substitute a fake)."""
    from bsf.engine import Engine

    return Engine(config)


def main() -> None:
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.client.tracking import SummaryWriter

    flare.init()
    site = flare.get_site_name()
    paths = SitePaths.from_script(sys.argv[0])
    try:  # before the engine loads (and caches) any data: a site configuration error, or a job this machine
        # cannot hold, stops here with one line; the trainer ends and NVFlare fails each task of this site
        # ("in-process trainer is no longer available") without a traceback
        config = site_run_config(site, paths)
        run_preflight(config)
    except BSFError as exc:
        log.error("site %s: CANNOT START: %s", site, exc)
        raise SystemExit(2) from None
    settings = config.federation
    engine = make_engine(config)
    writer = SummaryWriter()
    trainer = SiteTrainer(engine, settings, site=site, state_dir=config.train.output_dir, log_scalar=writer.add_scalar,
                          local_objective=local_objective(engine, settings))
    log.info(
        "site %s: engine ready (%d training cases, %d aggregated tensors, scope %s, %d local steps, transfer %s/%s)",
        site, engine.num_train_cases, len(trainer.scope_keys), settings.scope, settings.local_steps,
        settings.transfer, settings.transfer_dtype,
    )

    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        if flare.is_train():
            result = trainer.train(model.params or {}, int(model.current_round or 0), global_meta=model.meta)
            params_type = ParamsType.DIFF if result.params_type == "DIFF" else ParamsType.FULL
            flare.send(FLModel(params=result.params, params_type=params_type, metrics=result.metrics, meta=result.meta))
        elif flare.is_evaluate():
            metrics = trainer.validate(model.params)
            log.info("site %s: validated a received model: %s", site, metrics)
            flare.send(FLModel(metrics=metrics))
        elif flare.is_submit_model():
            flare.send(FLModel(params=trainer.local_model(), params_type=ParamsType.FULL))
        else:
            log.warning("site %s: unknown task %r; answering with no result", site, flare.get_task_name())
            flare.send(FLModel(metrics={}))
