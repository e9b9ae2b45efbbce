"""Names of what a federated job leaves in the server's run folder, in one place (no NVFlare imports).

A server run folder is ``<server workspace>/<job id>/`` in a deployment, ``<workspace>/server/simulate_job``
for ``nvflare simulator`` and ``<workspace>/<job name>/server/simulate_job`` for the Python route (SimEnv)::

    app_server/FL_global_model.pt        the global model after the last completed round ({"model": ..., "bsf_round": r})
    app_server/best_FL_global_model.pt   the validated global model with the best metric
    bsf_rounds.jsonl                     one line per completed round (accepted / rejected sites, metrics)
    bsf_metrics.json                     the sites' streamed scalars
    bsf_model_selection.json             every validated global model's metric, and which one is the best
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

APP_SERVER = "app_server"
GLOBAL_MODEL = "FL_global_model.pt"
BEST_MODEL = "best_FL_global_model.pt"
ROUNDS_FILE = "bsf_rounds.jsonl"
METRICS_FILE = "bsf_metrics.json"
SELECTION_FILE = "bsf_model_selection.json"  # which validated global model is the best, and every candidate
RUN_CONFIG_FILE = "bsf_run.yaml"  # the run config a job carries in its app's config/ folder
#: the key of a persisted global model's round (next to ``model`` in the checkpoint dict)
ROUND_KEY = "bsf_round"
SIMULATOR_RUN = Path("server") / "simulate_job"


def global_model(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/app_server/FL_global_model.pt``."""
    return Path(run_dir) / APP_SERVER / GLOBAL_MODEL


def best_model(run_dir: str | os.PathLike) -> Path:
    """``<run_dir>/app_server/best_FL_global_model.pt``."""
    return Path(run_dir) / APP_SERVER / BEST_MODEL


def run_config_beside(model_path: str | os.PathLike) -> Path:
    """The job's run config that a server keeps beside its global model: ``<app_server>/config/bsf_run.yaml``."""
    return Path(model_path).parent / "config" / RUN_CONFIG_FILE


def simulator_run(workspace: str | os.PathLike, job: str | None = None) -> Path:
    """The server run folder of a simulator workspace (``job``: the Python route's per-job folder)."""
    base = Path(workspace) / job if job else Path(workspace)
    return base / SIMULATOR_RUN


def read_rounds(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-round records of ``bsf_rounds.jsonl`` (empty when the job completed no round)."""
    path = Path(run_dir) / ROUNDS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def persisted_round(model_path: str | os.PathLike) -> int | None:
    """The round a persisted global model is the result of (``None``: a file that does not record it)."""
    import torch

    state = torch.load(model_path, map_location="cpu", weights_only=True)
    value = state.get(ROUND_KEY) if isinstance(state, dict) else None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None
