"""A run's Stage 3 training as a one-site NVFlare federation in the simulator (``bsf experiment ... --federated``).

The run's resolved config (``RUN_DIR/config.yaml``) becomes a Stage 3 job (:class:`bsf.fl.jobs.JobSpec`: whole
network aggregated, ``train.steps / local_steps`` rounds) run by :func:`bsf.fl.jobs.simulate` with one site,
``site-1``, whose site configuration (``RUN_DIR/site.yaml``) points it at the run's datalist. The server starts
from the run's ``model.pretrained`` (channels adapted by name) or, for the scratch arm, from the seeded
initialisation; a ``$BSF_PRETRAINED`` in the caller's environment is ignored so it cannot leak into that arm.
A one-site federation reproduces centralized training (tested in ``tests/test_fl_stages.py``); a multi-site
protocol needs real sites, see ``docs/protocols.md``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping

import yaml

from bsf.config import RunConfig
from bsf.errors import BSFError, ConfigError

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


def train_federated(config: RunConfig, config_path: Path, run_dir: Path, local_steps: int) -> dict[str, Path]:
    """Train ``config`` as a one-site federation of ``train.steps / local_steps`` rounds; return the global models.

    Returns ``{"last": FL_global_model.pt, "best": best_FL_global_model.pt}`` (the server's files).
    """
    from bsf.fl.jobs import JobSpec, simulate
    from bsf.fl.model_init import ENV_PRETRAINED
    from bsf.fl.site import ENV_SITE_CONFIG

    steps = config.train.steps
    if local_steps < 1 or steps % local_steps:
        raise ConfigError(f"--local-steps {local_steps}: must divide train.steps={steps} (rounds = steps / local steps)")
    site_file = run_dir / "site.yaml"
    site_file.write_text(yaml.safe_dump({"data": {"dataset": config.data.dataset, "root": "", "datalist": config.data.datalist}}))
    spec = JobSpec(
        name="stage3",
        num_rounds=steps // local_steps,
        min_clients=1,
        local_steps=local_steps,
        scope="all",
        cross_site_eval=False,
        run_config=str(config_path),
        pretrained=config.model.pretrained,
        require_pretrained=bool(config.model.pretrained),
    )
    with _environment({ENV_SITE_CONFIG: str(site_file), ENV_PRETRAINED: None}):
        server = simulate(spec, run_dir / "fl", clients=[SITE])
    models = {"last": server / "app_server" / "FL_global_model.pt", "best": server / "app_server" / "best_FL_global_model.pt"}
    if not models["last"].is_file():  # the simulator can finish after a configuration error: check the artifact
        raise BSFError(f"the federated run in {run_dir} produced no global model; see the logs under {server.parent}")
    return models
