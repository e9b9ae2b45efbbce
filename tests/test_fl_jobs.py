"""The committed NVFlare job folders: equal to freshly generated ones, and holding nothing but configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bsf.fl.jobs import COMMITTED_JOBS, ENTRY_SCRIPT, check_job_folder, diff_job_folders, export_job

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("name", sorted(COMMITTED_JOBS))
def test_committed_job_equals_generated(name, tmp_path):
    committed = JOBS / name
    assert committed.is_dir(), f"{committed} missing: run `python -m bsf.fl.jobs export`"
    fresh = export_job(COMMITTED_JOBS[name], tmp_path)
    diffs = diff_job_folders(committed, fresh)
    assert not diffs, f"jobs/{name} is stale ({diffs}); regenerate with `python -m bsf.fl.jobs export`"
    check_job_folder(committed)


def test_job_folder_holds_only_configs_and_the_thin_entry_script():
    job = JOBS / "stage1"
    files = sorted(p.relative_to(job).as_posix() for p in job.rglob("*") if p.is_file())
    assert files == [
        "app/config/bsf_run.yaml",
        "app/config/config_fed_client.json",
        "app/config/config_fed_server.json",
        f"app/custom/{ENTRY_SCRIPT}",
        "meta.json",
    ]
    script = (job / "app" / "custom" / ENTRY_SCRIPT).read_text()
    assert "from bsf.fl.client import main" in script and len(script.splitlines()) < 10
    assert sum(p.stat().st_size for p in job.rglob("*") if p.is_file()) < 20_000
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    executor = client["executors"][0]["executor"]
    assert executor["args"]["execution_mode"] == "in_process"
    assert "--transfer diff" in executor["args"]["task_script_args"]
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    paths = {c["path"] for c in server["components"]} | {w["path"] for w in server["workflows"]}
    assert {"bsf.fl.persistor.BSFModelPersistor", "bsf.fl.controller.CheckedFedAvg"} <= paths
    assert "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver" in paths


def test_initial_global_model_equals_engine_initialisation(tmp_path):
    """The server's seeded initial encoder is bit-identical to what an Engine starts with."""
    from bsf.data.synth import synthesize
    from bsf.engine import Engine, load_config
    from bsf.fl.model_init import initial_weights

    synthesize("ukb", 2, tmp_path / "d", spacing=4.0, seed=0)
    cfg = load_config(JOBS / "stage1" / "app" / "config" / "bsf_run.yaml", overrides=[f"data.root={tmp_path / 'd'}"])
    server = initial_weights(cfg, "encoder")
    site = Engine(cfg).get_weights("encoder")
    assert set(server) == set(site) and server
    assert all(np.array_equal(server[k], site[k]) for k in site)
    assert all(k.startswith("swinViT.") for k in server)
    full = initial_weights(cfg, "all")
    assert set(full) > set(server)
