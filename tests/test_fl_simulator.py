"""End-to-end federation tests with the real NVFlare simulator and the test-size model.

They check artifacts (global models, site state, metric files), not only exit codes: the
simulator can exit 0 after a configuration error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bsf.config import FederationConfig
from bsf.fl.jobs import JobSpec, export_job, simulate

pytestmark = pytest.mark.slow

NVFLARE = str(Path(sys.executable).with_name("nvflare"))
ENC = "swinViT."
FAST = ["data.crops_per_volume=1"]  # half the work per step; the algorithm is the same


# ---------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def site_data(tmp_path_factory) -> dict[str, Path]:
    """Small UKB-like sets (spacing 3 mm) for two sites, made once per module."""
    from bsf.data.synth import synthesize

    root = tmp_path_factory.mktemp("fl_data")
    out = {}
    for i, site in enumerate(("site-1", "site-2")):
        synthesize("ukb", 4, root / site, spacing=3.0, seed=100 + i)
        out[site] = root / site
    return out


def write_site_map(path: Path, entries: dict[str, dict]) -> Path:
    path.write_text(yaml.safe_dump({"sites": entries}))
    return path


def sim_env(site_map: Path | None, threads_per_site: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("BSF_SITE_CONFIG", None)
    if site_map is not None:
        env["BSF_SITE_CONFIG"] = str(site_map)
    env["OMP_NUM_THREADS"] = str(threads_per_site)
    return env


def run_simulator(job: Path, workspace: Path, n: int, env: dict[str, str]) -> str:
    """``nvflare simulator JOB -w WS -n N -t N``, exactly as a user types it; returns the log."""
    proc = subprocess.run(
        [NVFLARE, "simulator", str(job), "-w", str(workspace), "-n", str(n), "-t", str(n)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    log = proc.stdout + proc.stderr
    (workspace.parent / f"{workspace.name}.log").write_text(log)
    assert proc.returncode == 0, log[-3000:]
    return log


def load_model(path: Path) -> dict[str, np.ndarray]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state)
    return {k: v.float().numpy() if torch.is_tensor(v) else np.asarray(v, dtype=np.float32) for k, v in state.items()}


def initial_encoder(job: Path) -> dict[str, np.ndarray]:
    from bsf.engine import load_config
    from bsf.federation.initial_model import initial_weights

    return initial_weights(load_config(job / "app" / "config" / "bsf_run.yaml"), "encoder")


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


# ---------------------------------------------------------------------------- tests
def test_two_site_stage1_job(tmp_path, site_data):
    """2 sites, 2 rounds x 2 steps, cross-site evaluation; site-2 has no data configured."""
    job = export_job(JobSpec(name="t2", federation=FederationConfig(rounds=2, local_steps=2, min_clients=2), run_overrides=FAST), tmp_path / "jobs")
    site_map = write_site_map(tmp_path / "sites.yaml", {"site-1": {"data": {"root": str(site_data["site-1"])}}})
    ws = tmp_path / "ws"
    log = run_simulator(job, ws, 2, sim_env(site_map))

    # site-2 had nothing configured: it synthesised its own data and said so
    assert "site site-2: no data configured" in log and "SYNTHESISING" in log
    assert "site site-1: no data configured" not in log
    assert any((ws / "site-2" / "bsf_data").iterdir())

    server = ws / "server" / "simulate_job"
    glob = load_model(server / "app_server" / "FL_global_model.pt")
    best = load_model(server / "app_server" / "best_FL_global_model.pt")
    init = initial_encoder(job)
    # only encoder keys are global, and training moved them
    assert set(glob) == set(init) and all(k.startswith(ENC) for k in glob)
    assert set(best) == set(init)
    assert max_diff(glob, init) > 1e-4
    assert all(np.isfinite(v).all() for v in glob.values())

    # heads stayed local: they differ between the sites, and the global model has none
    s1 = load_model(ws / "site-1" / "simulate_job" / "bsf_site" / "engine_state.pt")
    s2 = load_model(ws / "site-2" / "simulate_job" / "bsf_site" / "engine_state.pt")
    heads = [k for k in s1 if not k.startswith(ENC)]
    assert heads and not any(k in glob for k in heads)
    assert max(float(np.abs(s1[k] - s2[k]).max()) for k in heads) > 1e-6

    rounds = [json.loads(line) for line in (server / "bsf_rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(sorted(r["accepted_sites"]) == ["site-1", "site-2"] and not r["rejected_sites"] for r in rounds)

    # metrics: TensorBoard per site, JSON summary per site and step, NVFlare's round summary
    for site in ("site-1", "site-2"):
        assert list((server / "tb_events" / site).glob("events.out.tfevents.*"))
    metrics = json.loads((server / "bsf_metrics.json").read_text())["sites"]
    for site in ("site-1", "site-2"):
        assert [p[0] for p in metrics[site]["train/loss"]] == [1, 2, 3, 4]
        assert {"train/rotation", "train/contrastive", "train/reconstruction", "train/lr"} <= set(metrics[site])
        assert len(metrics[site]["val/val_reconstruction_l1"]) == 2
    assert (server / "metrics" / "metrics_summary.json").is_file()

    # cross-site evaluation: every site validated both global models and both site models
    cse = json.loads((server / "cross_site_val" / "cross_val_results.json").read_text())
    for site in ("site-1", "site-2"):
        assert {"SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", "site-1", "site-2"} <= set(cse[site])
        assert np.isfinite(cse[site]["SRV_FL_global_model.pt"]["val_reconstruction_l1"])

    # the global model becomes an encoder checkpoint for the next stage
    from bsf.federation.export import export_global_encoder

    out = export_global_encoder(ws, tmp_path / "encoder.pt")
    enc = torch.load(out, map_location="cpu", weights_only=True)["state_dict"]
    assert set(enc) == set(glob) and max_diff({k: v.numpy() for k, v in enc.items()}, glob) == 0.0


def test_nan_update_is_rejected(tmp_path, site_data, monkeypatch):
    """site-2 diverges (lr 1e37 -> Inf/NaN weights); the server rejects it, names it, and uses site-1."""
    spec = JobSpec(
        name="tnan", run_overrides=FAST,
        federation=FederationConfig(rounds=1, local_steps=2, min_clients=1, cross_site_eval=False, validate_global=False),
    )
    site_map = write_site_map(
        tmp_path / "sites.yaml",
        {
            "site-1": {"data": {"root": str(site_data["site-1"])}},
            "site-2": {"data": {"root": str(site_data["site-2"])}, "overrides": ["optim.lr=1.0e+37", "optim.warmup_steps=0"]},
        },
    )
    ws = tmp_path / "ws"
    monkeypatch.setenv("BSF_SITE_CONFIG", str(site_map))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    server = simulate(spec, ws, n_clients=2)  # the Python route (SimEnv)
    rounds = [json.loads(line) for line in (server / "bsf_rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["accepted_sites"] == ["site-1"] and rounds[0]["rejected_sites"] == ["site-2"]
    server_log = "".join(p.read_text() for p in server.parent.rglob("log*.txt"))
    assert "REJECTED the result of site site-2" in server_log and "NaN/Inf" in server_log
    glob = load_model(server / "app_server" / "FL_global_model.pt")
    assert all(np.isfinite(v).all() for v in glob.values())
    # the global model is exactly site-1's update applied to the initial model
    s1 = load_model(ws / "tnan" / "site-1" / "simulate_job" / "bsf_site" / "engine_state.pt")
    assert max_diff(glob, {k: s1[k] for k in glob}) <= 1e-6


def test_single_site_federation_equals_centralized(tmp_path, site_data):
    """One site, R=2 rounds x k=2 steps == centralized `bsf train` of 4 steps: weights and losses within 1e-5."""
    from bsf.engine import load_config
    from bsf.train import train

    rounds, k = 2, 2
    job = export_job(JobSpec(name="t1", federation=FederationConfig(rounds=rounds, local_steps=k, min_clients=1, cross_site_eval=False), run_overrides=FAST), tmp_path / "jobs")
    data = [f"data.root={site_data['site-1']}", "data.datalist=null"]
    site_map = write_site_map(tmp_path / "sites.yaml", {"site-1": {"data": {"root": str(site_data["site-1"])}}})
    ws = tmp_path / "ws"
    run_simulator(job, ws, 1, sim_env(site_map, threads_per_site=2))

    # centralized `bsf train` of R*k steps with the same config and seed
    summary = train(load_config(job / "app" / "config" / "bsf_run.yaml", overrides=[*data, f"train.output_dir={tmp_path / 'central'}"]))
    central_records = summary["train"]
    central = load_model(Path(summary["checkpoints"]["last"]))

    server = ws / "server" / "simulate_job"
    glob = load_model(server / "app_server" / "FL_global_model.pt")
    site = load_model(ws / "site-1" / "simulate_job" / "bsf_site" / "engine_state.pt")
    enc_err = max_diff(glob, {k_: central[k_] for k_ in glob})
    site_err = max_diff(site, central)
    site_log = [json.loads(x) for x in (ws / "site-1" / "simulate_job" / "bsf_site" / "train_log.jsonl").read_text().splitlines()]
    fl_losses = [s["loss"] for r in site_log for s in r["steps"]]
    streamed = [p[1] for p in json.loads((server / "bsf_metrics.json").read_text())["sites"]["site-1"]["train/loss"]]
    central_losses = [r["loss"] for r in central_records]
    loss_err = max(abs(a - b) for a, b in zip(fl_losses, central_losses))
    print(f"\nsingle-site equivalence: encoder max|diff| {enc_err:.3g}, all weights {site_err:.3g}, losses {loss_err:.3g}")
    assert len(fl_losses) == len(central_losses) == rounds * k
    assert streamed == fl_losses
    assert enc_err <= 1e-5 and site_err <= 1e-5 and loss_err <= 1e-5
