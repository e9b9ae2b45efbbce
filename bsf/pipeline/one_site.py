"""A run's Stage 3 training as a one-site NVFlare federation in the simulator (``bsf experiment ... --federated``).

The run's resolved config (``RUN_DIR/config.yaml``) becomes the job of its stage of the graph
(``stage3_brats`` or ``stage3_atlas``, :mod:`bsf.federation.stages`): whole network aggregated, ``train.steps / local_steps``
rounds, run by :func:`bsf.fl.jobs.simulate` with one site, ``site-1``, whose site configuration
(``RUN_DIR/site.yaml``) points it at the run's datalist. The server starts from the run's ``model.pretrained``
(registered as the global model of the stage this one follows, with the run's ``model.pretrained_modalities``,
and found by :func:`bsf.federation.stages.start_point` as every driver finds it; channels adapted by name) or, for the
scratch arm, from the seeded initialisation. A one-site federation reproduces centralized training (tested in
``tests/test_one_site_equality.py`` for every stage, in process, and ``tests/test_fl_simulator.py`` through the
simulator); a multi-site protocol needs real sites, see ``docs/protocols.md``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Mapping

import yaml

from bsf.config import FederationConfig, RunConfig
from bsf.errors import BSFError, ConfigError
from bsf.federation.stages import STAGES, StartPoint, get_stage, start_point

SITE = "site-1"


def _set_environment(values: Mapping[str, str | None]) -> None:
    """Set each variable of ``values``; a None value removes it."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def _environment(changes: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, remove) environment variables for the block; restore them after."""
    saved = {name: os.environ.get(name) for name in changes}
    try:
        _set_environment(changes)
        yield
    finally:
        _set_environment(saved)


def federation_for_steps(steps: int, local_steps: int) -> FederationConfig:
    """The one-site federation of ``steps`` local steps in rounds of ``local_steps`` (which must divide it)."""
    if local_steps < 1 or steps % local_steps:
        raise ConfigError(f"--local-steps {local_steps}: must divide train.steps={steps} (rounds = steps / local steps)")
    return FederationConfig(rounds=steps // local_steps, local_steps=local_steps, scope="all", min_clients=1, cross_site_eval=False)


def _start(config: RunConfig, stage: str) -> StartPoint | None:
    """Where the run's job starts: its ``model.pretrained`` as the model of the stage it follows (None: scratch)."""
    if not config.model.pretrained:
        return None
    follows = get_stage(stage).follows[0]
    start = start_point(stage, {follows: config.model.pretrained})
    return replace(start, modalities=tuple(config.model.pretrained_modalities))


def train_federated(config: RunConfig, config_path: Path, run_dir: Path, local_steps: int) -> dict[str, Path]:
    """Train ``config`` as a one-site federation of ``train.steps / local_steps`` rounds; return the global models.

    Returns ``{"last": FL_global_model.pt, "best": best_FL_global_model.pt}`` (the server's files).
    """
    from bsf.federation import run_folders
    from bsf.fl.jobs import JobSpec, simulate
    from bsf.federation.site_config import ENV_SITE_CONFIG

    stage = next(s.name for s in STAGES.values() if (s.kind, s.datasets) == ("finetune", (config.data.dataset,)))
    site_file = run_dir / "site.yaml"
    site_file.write_text(yaml.safe_dump({"data": {"dataset": config.data.dataset, "root": "", "datalist": config.data.datalist}}))
    start = _start(config, stage)
    spec = JobSpec(
        name="stage3",
        stage=stage,
        run_config=str(config_path),
        federation=federation_for_steps(config.train.steps, local_steps),
        start=start,
        require_pretrained=start is not None,
    )
    with _environment({ENV_SITE_CONFIG: str(site_file)}):
        server = simulate(spec, run_dir / "fl", clients=[SITE])
    models = {"last": run_folders.global_model(server), "best": run_folders.best_model(server)}
    if not models["last"].is_file():  # the simulator can finish after a configuration error: check the artifact
        raise BSFError(f"the federated run in {run_dir} produced no global model; see the logs under {server.parent}")
    return models
