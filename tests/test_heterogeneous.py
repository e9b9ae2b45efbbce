"""One federation across data sets (issue 16): Stage 2 across UKB-, BraTS- and ATLAS-like sites (``stage2_all``).

Unit tests (seconds): the SSL loss scores only the channels a site holds and the absent channels stay empty in what
the model sees; ``bsf site check`` counts a case's files against the modalities the site holds; the chain and the
POC runner (deployment faked) run a stage across data sets at the sites of all its data sets, each site with its
own data set's configuration. One slow test: the chain ``stage2_all`` -> ``stage3_all`` in the NVFlare simulator
with 1 UKB-, 2 BraTS- and 1 ATLAS-like site, every site's result through the result guard, the BraTS Dice rising.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from bsf.cli import main
from bsf.config import load_config
from bsf.data.index import index_dataset
from bsf.data.synth import synthesize
from bsf.engine.tasks import SSLTask
from bsf.errors import BSFError
from bsf.federation import run_folders
from tests.fake_poc import FakePocDeployment
from bsf.ssl import SSLLoss, make_ssl_views

UNION = ["t1", "t1ce", "t2", "flair"]
HELD = {"ukb": ["t1", "flair"], "brats": UNION, "atlas": ["t1"]}  # a site's default: its data set's full set
EMBED = "swinViT.patch_embed.proj.weight"


# ---------------------------------------------------------------------------- the SSL loss at a site
def test_reconstruction_l1_is_the_mean_over_the_held_channels_only():
    """Hand computation: channels 0 and 3 held, |error| 1 and 3 there; the absent channels' error (5) never counts."""
    target = torch.zeros(2, 4, 2, 2, 2)
    recon = torch.zeros_like(target)
    recon[:, 0], recon[:, 3] = 1.0, -3.0
    recon[:, 1], recon[:, 2] = 5.0, 5.0
    args = (torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.eye(2, 3), recon, target)
    _, held = SSLLoss(scored_channels=[0, 3])(*args)
    _, every = SSLLoss()(*args)
    assert float(held["reconstruction"]) == pytest.approx((1.0 + 3.0) / 2)
    assert float(every["reconstruction"]) == pytest.approx((1.0 + 3.0 + 5.0 + 5.0) / 4)
    with pytest.raises(ValueError, match="at least one channel"):
        SSLLoss(scored_channels=[])


class _Recorder(torch.nn.Module):
    """Stands in for the SSL model: records its input, reconstructs zeros."""

    def forward(self, x):
        self.seen = x.clone()
        return SimpleNamespace(rotation_logits=torch.zeros(x.shape[0], 4), contrastive=torch.eye(x.shape[0], 3),
                               reconstruction=torch.zeros_like(x))


@pytest.mark.parametrize("dataset", ["ukb", "atlas", "brats"])
def test_a_site_trains_on_what_it_holds(dataset):
    """stage2_all at a site: the noise boxes of the SSL corruption never fill an absent channel, and the
    reconstruction L1 is the mean |target| over the held channels (the recorder reconstructs zeros)."""
    config = load_config("stage2_all_test", [f"data.dataset={dataset}"])
    task = SSLTask(config)
    held = [UNION.index(m) for m in HELD[dataset]]
    assert task.held == (None if dataset == "brats" else held)  # BraTS fills every channel: nothing to leave out
    image = torch.zeros(2, 4, 16, 16, 16)
    image[:, held] = torch.rand(2, len(held), 16, 16, 16, generator=torch.Generator().manual_seed(0)) + 0.5
    model = _Recorder()
    _, parts = task.loss(model, {"image": image}, torch.Generator().manual_seed(7))
    views = make_ssl_views(image, torch.Generator().manual_seed(7), task.corruption)
    absent = [c for c in range(4) if c not in held]
    assert not model.seen[:, absent].any() and model.seen[:, held].abs().sum() > 0
    assert float(parts["reconstruction"]) == pytest.approx(float(views.targets[:, held].abs().mean()), rel=1e-6)


# ---------------------------------------------------------------------------- bsf site check
@pytest.fixture(scope="module")
def atlas_site(tmp_path_factory) -> tuple[Path, Path]:
    """An ATLAS-like site (2 subjects at 4 mm): its folder and datalist."""
    root = tmp_path_factory.mktemp("atlas")
    synthesize("atlas", 2, root, spacing=4.0, seed=3)
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps(index_dataset("atlas", root, val_count=1).datalist))
    return root, datalist


def test_site_check_counts_a_cases_files_against_the_modalities_the_site_holds(atlas_site, tmp_path, capsys):
    root, datalist = atlas_site
    site = tmp_path / "atlas_site.yaml"
    site.write_text(yaml.safe_dump({"data": {"dataset": "atlas", "root": str(root), "datalist": str(datalist),
                                             "cache": "memory", "cache_dir": ""}}))
    assert main(["site", "check", "--config", "stage2_all_test", str(site)]) == 0  # 1 file per case, model of 4
    out = capsys.readouterr().out
    assert "model channels t1, t1ce, t2, flair: this site fills t1; empty: t1ce, t2, flair" in out
    doubled = json.loads(datalist.read_text())  # a datalist naming two images per case at a T1-only site
    for case in doubled["training"] + doubled.get("validation", []):
        case["image"] = [case["image"], case["image"]] if isinstance(case["image"], str) else case["image"] * 2
    (tmp_path / "doubled.json").write_text(json.dumps(doubled))
    assert main(["site", "check", "--config", "stage2_all_test", str(site), f"data.datalist={tmp_path / 'doubled.json'}"]) == 2
    assert "cases have [2] image channel(s) but this site holds 1 modality (t1; data.modalities)" in capsys.readouterr().out


# ---------------------------------------------------------------------------- the chain's plan
HETEROGENEOUS = ("stage1", "stage2_all", "stage3_brats", "stage3_atlas")


def test_the_chain_runs_a_stage_across_data_sets_at_all_their_sites(tmp_path):
    from bsf.pipeline.chain import ChainConfig

    cfg = ChainConfig.tiny(tmp_path, sites={"ukb": 1, "brats": 2, "atlas": 1}, stage_names=HETEROGENEOUS[::-1])
    assert {s.name: cfg.site_names(s) for s in cfg.stages()} == {
        "stage1": ["ukb-1"],
        "stage2_all": ["ukb-1", "brats-1", "brats-2", "atlas-1"],
        "stage3_brats": ["brats-1", "brats-2"],
        "stage3_atlas": ["atlas-1"],
    }
    with pytest.raises(BSFError, match="stage3_atlas runs at atlas sites and there are none: add --sites atlas=N"):
        ChainConfig.tiny(tmp_path, sites={"ukb": 1, "brats": 2}, stage_names=HETEROGENEOUS)
    default = ChainConfig.tiny(tmp_path)  # without --stages: the per-data-set stages, as before
    assert [s.name for s in default.stages()] == ["stage1", "stage2_brats", "stage2_atlas", "stage3_brats", "stage3_atlas"]


# ---------------------------------------------------------------------------- the POC runner, deployment faked

def test_the_poc_runner_deploys_each_stage_to_the_sites_of_its_data_sets(monkeypatch, tmp_path):
    import bsf.pipeline.poc_run as run
    from bsf.pipeline.sites import site_option

    monkeypatch.setattr(run, "PocDeployment", FakePocDeployment)
    sites = site_option("ukb=1,brats=2,atlas=1")
    summary = run.run_poc(tmp_path, stages=list(HETEROGENEOUS), sites=sites, num_rounds=1, local_steps=1)
    assert FakePocDeployment.made["sites"] == ["ukb-1", "brats-1", "brats-2", "atlas-1"]
    for site, dataset in sites.items():  # each site's kit gets a configuration naming its data set and modalities
        config = yaml.safe_load(Path(FakePocDeployment.made["site_configs"][site]).read_text())
        assert config["data"]["dataset"] == dataset and sorted(config["data"]["modalities"]) == sorted(HELD[dataset])
        assert set(config) == {"data"}  # no data location: the site synthesises its data set's kind
    expected = {"stage1": ["ukb-1"], "stage2_all": ["ukb-1", "brats-1", "brats-2", "atlas-1"],
                "stage3_brats": ["brats-1", "brats-2"], "stage3_atlas": ["atlas-1"]}
    for stage, names in expected.items():
        meta = json.loads((tmp_path / "jobs" / stage / "meta.json").read_text())
        assert meta["deploy_map"]["app"] == ["server", *names] and meta["min_clients"] == min(2, len(names)), stage
        assert summary["stages"][stage]["sites"] == names
    assert summary["stages"]["stage3_atlas"]["started_from"]["stage"] == "stage2_all"
    with pytest.raises(BSFError, match="stage2_atlas runs at atlas sites and there are none"):
        run.run_poc(tmp_path / "again", stages=["stage1", "stage2_atlas"], sites=site_option("ukb=1,brats=1"))


# ---------------------------------------------------------------------------- stage2_all in the NVFlare simulator
def _with_result_guard(export_job):
    """``export_job`` that also puts the sites' result guard (``privacy.json``'s last filter) on every result."""
    from bsf.fl.deploy.policies import GUARD_PATH

    def export(spec, out_root):
        job = export_job(spec, out_root)
        client = job / "app" / "config" / "config_fed_client.json"
        config = json.loads(client.read_text())
        tasks = ["train", "validate", "submit_model"]  # a job's filter table is keyed by task name (no wildcard)
        config["task_result_filters"] = [{"tasks": tasks, "filters": [{"path": GUARD_PATH, "args": {}}]}]
        client.write_text(json.dumps(config, indent=4))
        return job

    return export


@pytest.mark.slow
def test_stage2_all_then_stage3_all_in_the_simulator_with_ukb_brats_and_atlas_sites(tmp_path, monkeypatch):
    """One chain in the simulator: ``stage2_all`` at 1 UKB-, 2 BraTS- and 1 ATLAS-like site (one round of one step from
    a Stage-1-like model), then ``stage3_all`` from its model at the BraTS and ATLAS sites (two rounds of one step).

    Stage 2: its global encoder has the union's 4 channels and moved, and each site claimed exactly the modalities it
    holds (its update's meta, the server's round record). Stage 3: the global model holds the shared body and one
    head per task; every round record has each task's Dice; cross-site evaluation scores each site with its own head;
    the BraTS task's global Dice at its sites rises from the model Stage 3 started from (round 0's record) to the final
    global model. Every site's results of both stages passed its result guard.

    The ATLAS task's global Dice is not asserted to rise: at this size it stays 0.0 (the lesions are 0.15 % of a 4 mm
    volume; one ATLAS-like site trained alone predicts none before its 4th step, and in the joint job the shared body
    is averaged with two BraTS sites' updates: after 2 rounds x 3 steps atlas-1's own model scored 0.008, the global
    one 0.0). benchmarks/RESULTS.md "Heterogeneous sites" gives the joint ATLAS Dice after 4 rounds x 2 steps."""
    import bsf.pipeline.chain as chain
    from bsf.federation.initial_model import load_global_model
    from bsf.model import SSLModel

    torch.manual_seed(5)
    stage1 = tmp_path / "stage1.pt"
    torch.save({"model": {k: v for k, v in SSLModel("test", 2).state_dict().items() if k.startswith("swinViT.")}}, stage1)
    monkeypatch.setattr(chain, "export_job", _with_result_guard(chain.export_job))
    cfg = chain.ChainConfig.tiny(tmp_path / "out", sites={"ukb": 1, "brats": 2, "atlas": 1},
                                 stage_names=("stage2_all", "stage3_all"), stage1_model=str(stage1), subjects=2)
    summary = chain.run_chain(cfg)
    result = summary["stages"]["stage2_all"]
    sites = ["ukb-1", "brats-1", "brats-2", "atlas-1"]
    assert result["sites"] == sites and result["previous_stage"] == "stage1"
    model = load_global_model(result["global_model"])
    assert model[EMBED].shape[1] == 4 and all(np.isfinite(v).all() for v in model.values())
    assert result["change_from_initial"] > 1e-7  # it trained: not the adapted Stage 1 model

    record = run_folders.read_rounds(result["run_dir"])[-1]
    assert sorted(record["accepted_sites"]) == sorted(sites) and not record["rejected_sites"]
    held = {site: HELD[site.split("-")[0]] for site in sites}
    assert record["modalities"]["sites"] == held
    report = Path(summary["report"]["markdown"]).read_text()
    assert "atlas-1 t1; brats-1 t1, t1ce, t2, flair; brats-2 t1, t1ce, t2, flair; ukb-1 t1, flair" in report
    audits = _audits(cfg.out / "ws" / "stage2_all")
    assert sorted(audits) == sorted(sites)
    for site, entries in audits.items():
        train = [e for e in entries if e["task"] == "train"]
        assert train and all(sorted(e["meta"]["modalities"]) == sorted(held[site]) for e in train), site  # file order

    result = summary["stages"]["stage3_all"]
    assert result["sites"] == ["brats-1", "brats-2", "atlas-1"] and result["previous_stage"] == "stage2_all"
    model = load_global_model(result["global_model"])
    assert model["task.brats.out.conv.conv.weight"].shape[0] == 3 and model["task.atlas.out.conv.conv.weight"].shape[0] == 1
    assert not any(k.startswith("out.") for k in model) and all(np.isfinite(v).all() for v in model.values())
    rounds = run_folders.read_rounds(result["run_dir"])
    assert len(rounds) == 2 and all(sorted(r["accepted_sites"]) == sorted(result["sites"]) for r in rounds)
    for record in rounds:
        assert {"brats/val_dice_mean", "brats/val_dice_tc", "atlas/val_dice_lesion"} <= set(record["metrics"])
    cross = json.loads(next(Path(result["run_dir"]).rglob("cross_val_results.json")).read_text())
    assert "val_dice_lesion" in cross["atlas-1"]["SRV_FL_global_model.pt"] and "val_dice_tc" in cross["brats-1"]["atlas-1"]
    start = rounds[0]["metrics"]["brats/val_dice_mean"]  # the global model Stage 3 started from, at the BraTS sites
    final = np.mean([cross[site]["SRV_FL_global_model.pt"]["val_dice_mean"] for site in ("brats-1", "brats-2")])
    assert final > start, (start, final)
    assert sorted(_audits(cfg.out / "ws" / "stage3_all")) == sorted(result["sites"])


def _audits(workspace: Path) -> dict[str, list[dict]]:
    """Each site's result-guard audit entries of a simulator workspace, every one of them allowed out."""
    audits: dict[str, list[dict]] = {}
    for path in workspace.rglob("bsf_privacy_audit.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            audits.setdefault(entry["site"], []).append(entry)
    for site, entries in audits.items():
        assert entries and all(e["allowed"] for e in entries), (site, [e.get("problems") for e in entries])
    return audits
