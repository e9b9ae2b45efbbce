"""Resuming a job whose server stopped: the round recorded inside the persisted model, and the exported resume job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from bsf.cli import main as bsf_main
from bsf.fl.deploy.poc import DeploymentError
from bsf.pipeline.resume import export_resume_job, last_completed_round
from bsf.fl.jobs import COMMITTED_JOBS
from bsf.federation.run_folders import ROUND_KEY, global_model


def _server_run(tmp_path: Path, last_round: int | None) -> Path:
    """A server run folder whose global model records ``last_round`` (None: a file that records no round)."""
    run = tmp_path / "server" / "job-1"
    state = {"model": {"w": torch.zeros(2)}}
    if last_round is not None:
        state[ROUND_KEY] = last_round
    global_model(run).parent.mkdir(parents=True)
    torch.save(state, global_model(run))
    return run


def test_the_persisted_model_names_its_round(tmp_path):
    assert last_completed_round(_server_run(tmp_path / "a", 1))[1] == 1
    assert last_completed_round(_server_run(tmp_path / "b", 0)) == (global_model(tmp_path / "b" / "server" / "job-1").resolve(), 0)
    with pytest.raises(DeploymentError, match=f"does not record the round.*{ROUND_KEY}"):
        last_completed_round(_server_run(tmp_path / "c", None))
    with pytest.raises(DeploymentError, match="completed no round.*submit it again"):
        last_completed_round(tmp_path / "missing")


def test_resume_job_sets_start_round_and_keeps_the_schedule(tmp_path, capsys):
    run = _server_run(tmp_path, 0)
    spec = COMMITTED_JOBS["stage1"]  # 3 rounds x 4 steps
    job, start = export_resume_job(spec, run, tmp_path / "jobs")
    assert start == 1 and job.name == "stage1_resume"
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    fedavg = next(w for w in server["workflows"] if w["id"] == "fedavg")["args"]
    assert fedavg["start_round"] == 1 and fedavg["num_rounds"] == 2  # rounds 1 and 2 still to do
    persistor = next(c for c in server["components"] if c["id"] == "persistor")["args"]
    assert persistor["initial_ckpt"] == str(global_model(run).resolve())
    run_config = yaml.safe_load((job / "app" / "config" / "bsf_run.yaml").read_text())
    assert run_config["federation"]["start_round"] == 1 and run_config["federation"]["rounds"] == 3
    assert run_config["train"]["steps"] == 12  # the whole job's schedule
    assert bsf_main(["deploy", "resume", "--job", "stage1", "--server-run", str(run), "--out", str(tmp_path / "cli")]) == 0
    assert "rounds 1..2" in capsys.readouterr().out
    done = _server_run(tmp_path / "done", 2)
    assert bsf_main(["deploy", "resume", "--job", "stage1", "--server-run", str(done), "--out", str(tmp_path / "x")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
