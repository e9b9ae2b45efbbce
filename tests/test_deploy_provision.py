"""Provisioning: `nvflare provision -p provisioning/project.yml` yields this project's site kits; a site admin's kit step."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bsf.cli import main as bsf_main
from bsf.fl.deploy.policies import BSF_CLASSES, GUARD_PATH, PRIVACY_SCOPE

REPO = Path(__file__).resolve().parents[1]
NVFLARE = str(Path(sys.executable).with_name("nvflare"))
SITES = {"ukb-site": "ukb.yaml", "brats-site-a": "brats.yaml", "brats-site-b": "brats.yaml", "atlas-site": "atlas.yaml"}


@pytest.fixture(scope="module")
def prod(tmp_path_factory) -> Path:
    """The provisioned kits, exactly as the lead's guide's command makes them (docs/lead.md) (run from the repository root)."""
    ws = tmp_path_factory.mktemp("provision")
    proc = subprocess.run([NVFLARE, "provision", "-p", "provisioning/project.yml", "-w", str(ws)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return ws / "brainsegfounder" / "prod_00"


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_every_participant_has_a_kit(prod):
    names = {p.name for p in prod.iterdir()}
    assert set(SITES) | {"server.bsf-consortium.org", "lead@bsf-consortium.org"} <= names


@pytest.mark.parametrize("site", sorted(SITES))
def test_site_kit_policies(prod, site):
    local = prod / site / "local"
    resources = _json(local / "resources.json")
    assert resources["class_list_enforcement_mode"] == "enforce"
    assert set(BSF_CLASSES) <= set(resources["class_allow_list"]) and "*" not in resources["class_allow_list"]
    gpu = next(c for c in resources["components"] if c["id"] == "resource_manager")["args"]
    assert gpu["num_of_gpus"] == 1 and gpu["mem_per_gpu_in_GiB"] == 40
    privacy = _json(local / "privacy.json")
    assert privacy["default_scope"] == PRIVACY_SCOPE
    filters = privacy["scopes"][0]["task_result_filters"]
    assert filters[-1]["path"] == GUARD_PATH  # the guard is last: it sees exactly what leaves
    authz = _json(local / "authorization.json")["permissions"]
    assert authz["lead"]["byoc"] == "any" and authz["org_admin"]["byoc"] == "none"
    assert (local / "bsf_site.yaml").read_text() == (REPO / "sites" / SITES[site]).read_text()
    fed_client = _json(prod / site / "startup" / "fed_client.json")
    assert fed_client["client"]["connection_security"] == "mtls"
    assert {"client.crt", "client.key", "rootCA.pem"} <= {p.name for p in (prod / site / "startup").iterdir()}


def test_server_kit_allows_the_project_classes(prod):
    for name in ("resources.json", "resources.json.default"):
        resources = _json(prod / "server.bsf-consortium.org" / "local" / name)
        assert set(BSF_CLASSES) <= set(resources["class_allow_list"])
        assert resources["servers"][0]["heart_beat_timeout"] == 120


def test_site_kit_command_on_a_received_kit(prod, tmp_path, capsys):
    kit = tmp_path / "atlas-site"
    shutil.copytree(prod / "atlas-site", kit)
    for name in ("resources.json", "privacy.json", "authorization.json", "bsf_site.yaml"):
        (kit / "local" / name).unlink()
    site_yaml = tmp_path / "my_site.yaml"
    site_yaml.write_text(yaml.safe_dump({"data": {"dataset": "ukb", "root": str(tmp_path / "data")}}))
    assert bsf_main(["deploy", "site-kit", str(kit), "--site-config", str(site_yaml), "--gpus", "2", "--gpu-mem", "24",
                     "--privacy", "percentile"]) == 0
    resources = _json(kit / "local" / "resources.json")
    gpu = next(c for c in resources["components"] if c["id"] == "resource_manager")["args"]
    assert gpu == {**gpu, "num_of_gpus": 2, "mem_per_gpu_in_GiB": 24.0}
    filters = _json(kit / "local" / "privacy.json")["scopes"][0]["task_result_filters"]
    assert [f["path"].rsplit(".", 1)[1] for f in filters] == ["PercentilePrivacy", "ResultGuard"]
    assert yaml.safe_load((kit / "local" / "bsf_site.yaml").read_text())["data"]["dataset"] == "ukb"
    assert "bsf_site.yaml" in capsys.readouterr().out


def test_site_kit_command_errors_name_the_problem(prod, tmp_path, capsys):
    assert bsf_main(["deploy", "site-kit", str(tmp_path), "--site-config", "sites/ukb.yaml"]) == 2
    assert "not a client startup kit" in capsys.readouterr().err
    kit = tmp_path / "kit"
    shutil.copytree(prod / "ukb-site", kit)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: ukb\nsecret_key: 1\n")
    assert bsf_main(["deploy", "site-kit", str(kit), "--site-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "secret_key" in err


def test_target_runs_a_job_at_named_sites_only(tmp_path, capsys):
    job = tmp_path / "stage1"
    shutil.copytree(REPO / "jobs" / "stage1", job)
    assert bsf_main(["deploy", "target", str(job), "--sites", "ukb-site", "brats-site-a"]) == 0
    assert _json(job / "meta.json")["deploy_map"] == {"app": ["server", "ukb-site", "brats-site-a"]}
    assert bsf_main(["deploy", "target", str(job), "--sites", "ukb-site"]) == 2  # min_clients 2 > 1 site
    assert "min_clients is 2" in capsys.readouterr().err
