"""Resuming a job whose server stopped: which round the persisted model is, and the exported resume job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from bsf.cli import main as bsf_main
from bsf.fl.deploy.poc import DeploymentError
from bsf.fl.deploy.resume import export_resume_job, last_completed_round
from bsf.fl.jobs import COMMITTED_JOBS


def _server_run(tmp_path: Path, rounds: list[int], model_newer: bool) -> Path:
    run = tmp_path / "server" / "job-1"
    (run / "app_server").mkdir(parents=True)
    rounds_file = run / "bsf_rounds.jsonl"
    rounds_file.write_text("".join(json.dumps({"round": r}) + "\n" for r in rounds))
    model = run / "app_server" / "FL_global_model.pt"
    model.write_bytes(b"model")
    t = rounds_file.stat().st_mtime
    os.utime(model, (t + 1, t + 1) if model_newer else (t - 1, t - 1))
    return run


def test_the_persisted_model_is_the_last_recorded_round_unless_older(tmp_path):
    assert last_completed_round(_server_run(tmp_path / "a", [0, 1], model_newer=True))[1] == 1
    assert last_completed_round(_server_run(tmp_path / "b", [0, 1], model_newer=False))[1] == 0
    with pytest.raises(DeploymentError, match="no completed round's model"):
        last_completed_round(_server_run(tmp_path / "c", [0], model_newer=False))
    with pytest.raises(DeploymentError, match="submit it again"):
        last_completed_round(tmp_path / "missing")


def test_resume_job_continues_the_rounds_and_the_schedule(tmp_path, capsys):
    run = _server_run(tmp_path, [0], model_newer=True)
    spec = COMMITTED_JOBS["stage1"]  # 3 rounds x 4 steps
    job, start = export_resume_job(spec, run, tmp_path / "jobs")
    assert start == 1 and job.name == "stage1_resume"
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    fedavg = next(w for w in server["workflows"] if w["id"] == "fedavg")["args"]
    assert fedavg["start_round"] == 1 and fedavg["num_rounds"] == 2
    persistor = next(c for c in server["components"] if c["id"] == "persistor")["args"]
    assert persistor["initial_ckpt"] == str((run / "app_server" / "FL_global_model.pt").resolve())
    assert yaml.safe_load((job / "app" / "config" / "bsf_run.yaml").read_text())["train"]["steps"] == 12
    assert bsf_main(["deploy", "resume", "--job", "stage1", "--server-run", str(run), "--out", str(tmp_path / "cli")]) == 0
    assert "rounds 1..2" in capsys.readouterr().out
    done = _server_run(tmp_path / "done", [0, 1, 2], model_newer=True)
    assert bsf_main(["deploy", "resume", "--job", "stage1", "--server-run", str(done), "--out", str(tmp_path / "x")]) == 2
    assert "nothing to resume" in capsys.readouterr().err
