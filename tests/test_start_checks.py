"""Federated user errors are refused before round 0 in one line, and a signal stops a simulation with its processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from bsf.cli import main
from bsf.errors import ConfigError
from bsf.federation.start_checks import check_site_configs, check_site_count
from tests.cli_errors import one_line_error




@pytest.mark.parametrize("sites, named", [([], "0 sites take part"), (["site-1"], "1 site (site-1) take part")])
def test_too_few_sites_for_min_clients_is_refused(sites, named):
    with pytest.raises(ConfigError) as err:
        check_site_count("stage1", 2, sites, how="-n 2")
    assert named in str(err.value) and "federation.min_clients=2" in str(err.value) and "give 2 sites (-n 2)" in str(err.value)
    check_site_count("stage1", 2, ["site-1", "site-2"])  # enough


@pytest.mark.parametrize(
    "site_2, named",
    [
        ({"data": {"datset": "ukb"}}, "data.datset"),
        ({"train": {"steps": 3}}, "train.steps cannot be set per site"),
        ({"data": {"num_workers": "four"}}, "data.num_workers"),
        ({"trian": {}}, "trian"),
    ],
)
def test_a_site_configuration_typo_names_the_site_and_key(tmp_path, site_2, named):
    site_map = tmp_path / "sites.yaml"
    site_map.write_text(yaml.safe_dump({"sites": {"site-1": {"data": {"dataset": "ukb"}}, "site-2": site_2}}))
    environ = {"BSF_SITE_CONFIG": str(site_map)}
    check_site_configs("stage1", "stage1_test", ["site-1"], environ=environ)
    with pytest.raises(ConfigError) as err:
        check_site_configs("stage1", "stage1_test", ["site-1", "site-2"], environ=environ)
    assert "job stage1: site site-2 cannot start" in str(err.value) and named in str(err.value)


def test_bsf_jobs_simulate_refuses_before_starting_anything(tmp_path, capsys, monkeypatch):
    workspace = tmp_path / "ws"
    assert main(["jobs", "simulate", "stage1", "-n", "1", "-w", str(workspace)]) == 2
    one_line_error(capsys, "job stage1", "federation.min_clients=2", "-n 2")
    site_map = tmp_path / "sites.yaml"
    site_map.write_text(yaml.safe_dump({"sites": {"*": {"data": {"datset": "ukb"}}}}))
    monkeypatch.setenv("BSF_SITE_CONFIG", str(site_map))
    assert main(["jobs", "simulate", "stage1", "-n", "2", "-w", str(workspace)]) == 2
    one_line_error(capsys, "site site-1 cannot start", "data.datset")
    assert not workspace.exists()  # nothing ran


def _simulations(workspace: Path, besides: int) -> list[psutil.Process]:
    """The processes other than ``besides`` whose command line names ``workspace`` (NVFlare's server and sites)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if proc.pid != besides and any(str(workspace) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.slow
def test_sigterm_stops_a_simulation_and_its_processes(tmp_path):
    workspace = tmp_path / "ws"
    bsf = Path(sys.executable).with_name("bsf")
    command = [str(bsf), "jobs", "simulate", "stage1", "-n", "2", "-w", str(workspace), "--rounds", "50"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not _simulations(workspace, proc.pid) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert _simulations(workspace, proc.pid), "the simulation never started"
        time.sleep(5)  # let it start its server and sites
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, err[-2000:]
    deadline = time.monotonic() + 30
    while _simulations(workspace, proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _simulations(workspace, proc.pid)
    for stray in left:
        stray.kill()
    assert not left, [p.info["cmdline"] for p in left]


def test_the_server_refuses_a_job_with_fewer_sites_than_min_clients(tmp_path):
    """``nvflare simulator jobs/stage1 -n 1`` (min_clients 2): one CANNOT START line before round 0, no round."""
    from nvflare.apis.signal import Signal

    from bsf.fl.aggregation import CheckedFedAvgAggregator
    from bsf.fl.controller import CheckedFedAvg

    controller = CheckedFedAvg(num_rounds=3, persistor_id="persistor", aggregator=CheckedFedAvgAggregator(min_accepted=2))
    controller.abort_signal = Signal()
    controller.load_model = lambda: object()
    controller.sample_clients = lambda num_clients=None: ["site-1"]
    reasons, rounds = [], []
    controller.panic = reasons.append
    controller.broadcast_model = lambda **kwargs: rounds.append(kwargs)
    controller.run()
    assert rounds == [] and len(reasons) == 1
    assert reasons[0].startswith("CANNOT START: federation.min_clients=2 but 1 site(s) take part (site-1)") and "-n 2" in reasons[0]
