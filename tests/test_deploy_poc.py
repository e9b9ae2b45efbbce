"""A real NVFlare deployment on loopback (POC mode): provisioned kits, mTLS, a server and 2 client processes.

One deployment runs a tiny Stage 1 job end to end through :func:`bsf.pipeline.poc_run.run_poc` (the path
``bsf deploy poc`` takes) and is stopped by it; the tests then read what it left: the global model,
the metrics, and each site's privacy audit of what it sent. No process may outlive the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bsf.federation.payload import exchanged
from bsf.fl.deploy.processes import kill_under, processes_under
from bsf.pipeline.poc_run import run_poc

pytestmark = pytest.mark.slow

SITES = ("site-1", "site-2")
TINY = ["data.crops_per_volume=1"]


@pytest.fixture(scope="module")
def poc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("poc")
    try:
        summary = run_poc(out, stages=["stage1"], sites=SITES, num_rounds=2, local_steps=1, overrides=TINY,
                          cross_site_eval=False, env={"OMP_NUM_THREADS": "1"}, timeout=600)
        yield out, summary
    finally:
        kill_under(out)  # a safety net: run_poc stops everything itself (checked below)


def _load(path: Path) -> dict[str, np.ndarray]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {k: v.float().numpy() for k, v in state.get("model", state).items()}


def test_stage1_job_completes_with_global_model_and_metrics(poc_run):
    out, summary = poc_run
    stage = summary["stages"]["stage1"]
    assert stage["status"] == "FINISHED:COMPLETED"
    assert stage["rounds"] == 2 and all(sorted(a) == list(SITES) for a in stage["accepted_sites"])
    assert not any(stage["rejected_sites"])
    glob = _load(Path(stage["global_model"]))
    assert glob and all(k.startswith("swinViT.") for k in glob)
    assert all(np.isfinite(v).all() for v in glob.values())
    assert (out / "models" / "stage1_best_FL_global_model.pt").is_file()
    run_dir = Path(stage["run_dir"])
    metrics = json.loads((run_dir / "bsf_metrics.json").read_text())["sites"]
    for site in SITES:
        assert [p[0] for p in metrics[site]["train/loss"]] == [1, 2]
        assert list((run_dir / "tb_events" / site).glob("events.out.tfevents.*"))
    assert np.isfinite(stage["last_metrics"]["train_loss"])
    assert json.loads((out / "poc_summary.json").read_text())["stages"]["stage1"]["job_id"] == stage["job_id"]


def test_every_process_is_stopped(poc_run):
    out, _ = poc_run
    assert processes_under(out) == []


def test_connections_are_mutual_tls(poc_run):
    out, _ = poc_run
    prod = out / "poc" / "bsfpoc" / "prod_00"
    for site in SITES:
        fed_client = json.loads((prod / site / "startup" / "fed_client.json").read_text())
        assert fed_client["client"]["connection_security"] == "mtls"
        assert {"client.crt", "client.key", "rootCA.pem"} <= {p.name for p in (prod / site / "startup").iterdir()}
    fed_server = json.loads((prod / "server" / "startup" / "fed_server.json").read_text())
    assert fed_server["servers"][0]["connection_security"] == "mtls"


def test_sites_sent_only_aggregated_weights_and_numbers(poc_run):
    """The result guard's audit at each site: what every result that left it held."""
    out, summary = poc_run
    # the global model file keeps the constant relative_position_index buffers; rounds never send them
    glob = exchanged(_load(Path(summary["stages"]["stage1"]["global_model"])))
    prod = out / "poc" / "bsfpoc" / "prod_00"
    for site in SITES:
        audits = list(prod.glob(f"{site}/*/bsf_privacy_audit.jsonl"))
        assert len(audits) == 1, audits
        records = [json.loads(line) for line in audits[0].read_text().splitlines()]
        train = [r for r in records if r["task"] == "train"]
        assert len(train) == 2 and all(r["allowed"] and not r["problems"] for r in records)
        for r in train:
            assert r["kind"] == "WEIGHT_DIFF"
            assert set(r["tensors"]) == set(glob)  # exactly the aggregated keys: no heads, nothing else
            assert all(r["tensors"][k]["shape"] == list(glob[k].shape) for k in glob)
            assert r["bytes"] == sum(v.nbytes for v in glob.values())
            assert r["data_values"] == {}
            for key, value in r["meta"].items():
                values = value.values() if isinstance(value, dict) else [value]
                assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), (key, value)
            text = json.dumps(r)
            assert ".nii" not in text and "/" not in json.dumps(r["meta"])
