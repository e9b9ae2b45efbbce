"""The NVFlare Client API loop every BrainSegFounder-FL site runs (in-process, one Engine per job).

The job's thin entry script (``app/custom/bsf_client.py``) only calls :func:`main`. It runs
inside the NVFlare client job process (``ClientAPIExecutor``, ``in_process``), so the Engine
lives as long as the job: receive the global model -> load the aggregated part -> run
``local_steps`` -> send the part back (difference by default) with ``NUM_STEPS_CURRENT_ROUND``.

Tasks: ``train`` (above), ``validate`` (metrics of a received model on the site's validation
cases; cross-site evaluation), ``submit_model`` (the site's current aggregated part).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bsf.fl.site import prepare_site_data, resolve_site
from bsf.fl.trainer import SCOPES, TRANSFER_DTYPES, TRANSFERS, FLSettings, SiteTrainer

log = logging.getLogger(__name__)

RUN_CONFIG_FILE = "bsf_run.yaml"
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bsf_client", description="BrainSegFounder-FL site (NVFlare Client API)")
    p.add_argument("--run-config", default=RUN_CONFIG_FILE, help="run config YAML (relative to the app's config/ folder) or a preset name")
    p.add_argument("--local-steps", type=int, default=FLSettings.local_steps)
    p.add_argument("--scope", choices=SCOPES, default=FLSettings.scope)
    p.add_argument("--transfer", choices=TRANSFERS, default=FLSettings.transfer)
    p.add_argument("--transfer-dtype", choices=TRANSFER_DTYPES, default=FLSettings.transfer_dtype)
    p.add_argument("--no-validate-global", action="store_true", help="skip validating the received global model each round")
    p.add_argument("--no-resume", action="store_true", help="do not keep a per-round resume checkpoint at the site")
    p.add_argument("--override", action="append", default=[], help="extra run-config override section.key=value (repeatable)")
    return p


def make_engine(run_config: str | Path, overrides: Sequence[str]):
    """Build the site's Engine (isolated so tests can substitute a fake)."""
    from bsf.engine import Engine, load_config

    return Engine(load_config(run_config, overrides=list(overrides)))


def _resolve_run_config(name: str, paths: SitePaths) -> str | Path:
    candidate = paths.app_config / name
    return candidate if candidate.is_file() else name


def main(argv: Sequence[str] | None = None) -> None:
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.client.tracking import SummaryWriter

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    settings = FLSettings(
        local_steps=args.local_steps,
        scope=args.scope,
        transfer=args.transfer,
        transfer_dtype=args.transfer_dtype,
        validate_global=not args.no_validate_global,
        resume=not args.no_resume,
    )
    flare.init()
    site = flare.get_site_name()
    paths = SitePaths.from_script(sys.argv[0])
    run_config = _resolve_run_config(args.run_config, paths)

    from bsf.engine import load_config

    setup = resolve_site(site, paths.workspace)
    base = load_config(run_config, overrides=[*args.override, *setup.overrides])
    log.info("site %s: site configuration from %s", site, setup.source)
    site_overrides = prepare_site_data(setup, base.data.dataset, paths.workspace)
    state_dir = paths.job / SITE_STATE_FOLDER
    # The previous stage's model (Stage 2/3) is loaded and channel-adapted once, on the server, and
    # arrives as the round-0 global model: a site never needs (or reads) that file itself.
    overrides = [*args.override, *site_overrides, f"train.output_dir={state_dir}", "model.pretrained=null"]
    engine = make_engine(run_config, overrides)
    writer = SummaryWriter()
    trainer = SiteTrainer(engine, settings, site=site, state_dir=state_dir, log_scalar=writer.add_scalar)
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
            result = trainer.train(model.params or {}, int(model.current_round or 0))
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
