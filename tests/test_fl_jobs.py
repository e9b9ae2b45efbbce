"""The committed NVFlare job folders: equal to freshly generated ones, and holding nothing but configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from bsf.cli import main as bsf_main
from bsf.config import load_config
from bsf.errors import ConfigError
from bsf.fl.jobs import COMMITTED_JOBS, ENTRY_SCRIPT, JobSpec, check_job_folder, diff_job_folders, export_job, job_run_config

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("name", sorted(COMMITTED_JOBS))
def test_committed_job_equals_generated(name, tmp_path):
    committed = JOBS / name
    assert committed.is_dir(), f"{committed} missing: run `bsf jobs export`"
    fresh = export_job(COMMITTED_JOBS[name], tmp_path)
    diffs = diff_job_folders(committed, fresh)
    assert not diffs, f"jobs/{name} is stale ({diffs}); regenerate with `bsf jobs export`"
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
    assert not executor["args"].get("task_script_args")  # the site reads its settings from the run config
    federation = yaml.safe_load((job / "app" / "config" / "bsf_run.yaml").read_text())["federation"]
    assert federation["transfer"] == "diff" and federation["scope"] == "encoder"
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    paths = {c["path"] for c in server["components"]} | {w["path"] for w in server["workflows"]}
    assert {"bsf.fl.persistor.BSFModelPersistor", "bsf.fl.controller.CheckedFedAvg"} <= paths
    assert "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver" in paths


def test_initial_global_model_equals_engine_initialisation(tmp_path):
    """The server's seeded initial encoder is bit-identical to what an Engine starts with."""
    from bsf.data.synth import synthesize
    from bsf.engine import Engine, load_config
    from bsf.federation.initial_model import initial_weights

    synthesize("ukb", 2, tmp_path / "d", spacing=4.0, seed=0)
    cfg = load_config(JOBS / "stage1" / "app" / "config" / "bsf_run.yaml", overrides=[f"data.root={tmp_path / 'd'}"])
    server = initial_weights(cfg, "encoder")
    site = Engine(cfg).get_weights("encoder")
    assert set(server) == set(site) and server
    assert all(np.array_equal(server[k], site[k]) for k in site)
    assert all(k.startswith("swinViT.") for k in server)
    full = initial_weights(cfg, "all")
    assert set(full) > set(server)


def test_readme_production_export_writes_its_numbers_into_the_federation_section(tmp_path, capsys):
    """docs/lead.md: ``bsf jobs export --job stage1 --run-config stage1_ukb --rounds 100 --local-steps 200``."""
    argv = ["jobs", "export", "--out", str(tmp_path), "--job", "stage1", "--run-config", "stage1_ukb",
            "--rounds", "100", "--local-steps", "200", "--min-clients", "1"]
    assert bsf_main(argv) == 0
    job = tmp_path / "stage1"
    config = load_config(job / "app" / "config" / "bsf_run.yaml")
    assert (config.federation.rounds, config.federation.local_steps, config.federation.min_clients) == (100, 200, 1)
    assert config.train.steps == 20_000  # the schedule spans the whole federation: rounds x local steps
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    fedavg = next(w for w in server["workflows"] if w["id"] == "fedavg")["args"]
    assert fedavg["num_rounds"] == 100
    assert json.loads((job / "meta.json").read_text())["min_clients"] == 1
    check_job_folder(job)


def test_job_run_config_refuses_a_run_config_of_another_stage():
    with pytest.raises(ConfigError, match=r"stage3_brats_test: stage finetune on brats, but job stage1 is stage stage1"):
        job_run_config(JobSpec(run_config="stage3_brats_test"))
    with pytest.raises(ConfigError, match="train.steps must equal federation.rounds"):
        job_run_config(JobSpec(run_overrides=["train.steps=7"]))
