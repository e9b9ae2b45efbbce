"""The stage graph: which model each stage starts from, in every driver (no NVFlare run; seconds).

The POC runner is checked with the deployment faked: its plan (order, starting model of each stage)
is what a user relies on, e.g. that ATLAS Stage 2 after BraTS Stage 2 starts from Stage 1's model and
that Stage 1 straight to BraTS Stage 3 (the paper's BSF-1 arm) adapts Stage 1's (t1, flair) to BraTS's 4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bsf.config import load_config
from bsf.errors import ConfigError
from bsf.federation import run_folders
from tests.fake_poc import FakePocDeployment
from bsf.fl.client import SitePaths, site_run_config
from bsf.fl.jobs import COMMITTED_JOBS, job_for_stage, job_run_config
from bsf.federation.initial_model import initial_global_weights
from bsf.model import SSLModel
from bsf.federation.stages import STAGES, StageError, ancestors, plan, start_point

EMBED = "swinViT.patch_embed.proj.weight"


@pytest.fixture(scope="module")
def stage1_model(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    """A Stage-1-like global model file: ``{"model": encoder state}``, 2 channels (t1, flair)."""
    torch.manual_seed(3)
    state = {k: v.clone() for k, v in SSLModel("test", 2).state_dict().items() if k.startswith("swinViT.")}
    path = tmp_path_factory.mktemp("stage1") / "stage1_FL_global_model.pt"
    torch.save({"model": state}, path)
    return state, path


# ---------------------------------------------------------------------------- the graph
def test_graph_lines_and_order():
    assert ancestors("stage3_atlas") == ["stage2_atlas", "stage2_all", "stage1"] and ancestors("stage1") == []
    assert ancestors("stage3_brats") == ["stage2_brats", "stage2_all", "stage1"]
    assert ancestors("stage2_all") == ["stage1"] and STAGES["stage2_all"].across_datasets
    assert [(s.name, src) for s, src in plan(["stage3_brats", "stage2_atlas", "stage1", "stage2_brats"])] == [
        ("stage1", None), ("stage2_brats", "stage1"), ("stage2_atlas", "stage1"), ("stage3_brats", "stage2_brats"),
    ]
    assert [(s.name, src) for s, src in plan(["stage1", "stage3_brats"])] == [("stage1", None), ("stage3_brats", "stage1")]
    assert [(s.name, src) for s, src in plan(["stage2_atlas"], available=["stage1"])] == [("stage2_atlas", "stage1")]
    # the heterogeneous pipeline: both Stage 3 tasks start from the Stage 2 across all sites
    assert [(s.name, src) for s, src in plan(["stage3_atlas", "stage3_brats", "stage2_all", "stage1"])] == [
        ("stage1", None), ("stage2_all", "stage1"), ("stage3_brats", "stage2_all"), ("stage3_atlas", "stage2_all"),
    ]
    # a task's own Stage 2 is preferred when both ran
    assert dict((s.name, src) for s, src in plan(["stage1", "stage2_brats", "stage2_all", "stage3_brats"]))[
        "stage3_brats"] == "stage2_brats"
    with pytest.raises(
        StageError, match="stage3_brats starts from the global model of stage2_brats or stage2_all or stage1; list one"
    ):
        plan(["stage3_brats"])
    with pytest.raises(StageError, match="unknown stage 'stage4'"):
        plan(["stage1", "stage4"])
    with pytest.raises(StageError, match="listed twice: stage1"):
        plan(["stage1", "stage1"])


def test_every_stage_matches_its_committed_job():
    """Kind, data set and scope of each graph stage are those of its committed job's run config."""
    for name, stage in STAGES.items():
        config = load_config(job_run_config(COMMITTED_JOBS[name]))
        assert (config.stage, config.federation.scope) == (stage.kind, stage.aggregates), name
        assert config.data.dataset in stage.datasets, name  # a stage across data sets: each site sets its own
        assert config.model.in_channels == len(stage.modalities), name
        if stage.follows:
            assert config.model.pretrained_modalities == list(STAGES[stage.follows[0]].modalities), name


def test_start_point_is_the_nearest_stage_that_ran():
    models = {"stage1": "/m/stage1.pt", "stage2_brats": "/m/stage2_brats.pt"}
    atlas = start_point("stage2_atlas", models)  # after stage2_brats: still stage1's model
    assert (atlas.stage, atlas.model, atlas.modalities) == ("stage1", Path("/m/stage1.pt"), ("t1", "flair"))
    assert start_point("stage3_brats", models).stage == "stage2_brats"
    bsf1 = start_point("stage3_brats", {"stage1": "/m/stage1.pt"})
    assert bsf1.stage == "stage1" and bsf1.modalities == ("t1", "flair")
    assert start_point("stage1", models) is None
    across = start_point("stage3_atlas", {"stage1": "/m/stage1.pt", "stage2_all": "/m/stage2_all.pt"})
    assert (across.stage, across.modalities) == ("stage2_all", ("t1", "t1ce", "t2", "flair"))
    with pytest.raises(
        StageError, match="stage3_atlas starts from the global model of stage2_atlas or stage2_all or stage1, and none"
    ):
        start_point("stage3_atlas", {"stage2_brats": "/m/x.pt"})


def test_stage1_straight_to_stage3_brats_adapts_2_to_4_channels(stage1_model):
    """BSF-1: the job knows its source's modalities from the stage it starts from, not from its own preset."""
    source, path = stage1_model
    spec = job_for_stage("stage3_brats", {"stage1": path})
    raw = job_run_config(spec)
    assert raw["model"]["pretrained_modalities"] == ["t1", "flair"] and raw["model"]["in_channels"] == 4
    weights, origin = initial_global_weights(load_config(raw), "all", pretrained=str(spec.start.model), environ={})
    assert weights[EMBED].shape[1] == 4 and "['t1', 'flair'] -> ['flair', 't1ce', 't1', 't2']" in origin
    assert np.array_equal(weights[EMBED][:, 0], source[EMBED][:, 1].numpy())  # FLAIR
    assert np.array_equal(weights[EMBED][:, 2], source[EMBED][:, 0].numpy())  # T1


# ---------------------------------------------------------------------------- the POC runner, deployment faked

SUBMITTED: list = []  # the job specs the POC runner exported


@pytest.fixture
def fake_poc(monkeypatch, tmp_path):
    import bsf.pipeline.poc_run as run
    import bsf.fl.jobs as jobs

    SUBMITTED.clear()
    FakePocDeployment.started = False

    def export(spec, out_root):
        SUBMITTED.append(spec)
        folder = Path(out_root) / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    monkeypatch.setattr(run, "PocDeployment", FakePocDeployment)
    monkeypatch.setattr(jobs, "export_job", export)
    return run.run_poc, tmp_path


def test_poc_runner_starts_atlas_stage2_from_stage1_after_brats_stage2(fake_poc):
    run_poc, out = fake_poc
    summary = run_poc(out, stages=["stage1", "stage2_brats", "stage2_atlas"], num_rounds=1, local_steps=1)
    starts = {spec.name: spec.start for spec in SUBMITTED}
    assert list(starts) == ["stage1", "stage2_brats", "stage2_atlas"] and starts["stage1"] is None
    stage1_model = out.resolve() / "models" / "stage1_FL_global_model.pt"
    assert (starts["stage2_atlas"].stage, starts["stage2_atlas"].model) == ("stage1", stage1_model)
    assert summary["stages"]["stage2_atlas"]["started_from"] == {"stage": "stage1", "model": str(stage1_model)}
    assert all(s.federation.rounds == 1 and s.federation.local_steps == 1 for s in SUBMITTED)


def test_poc_runner_stage1_straight_to_stage3_brats(fake_poc):
    run_poc, out = fake_poc
    run_poc(out, stages=["stage3_brats", "stage1"])  # listed in any order: the graph orders them
    spec = SUBMITTED[-1]
    assert spec.name == "stage3_brats" and spec.start.stage == "stage1" and spec.start.modalities == ("t1", "flair")
    assert job_run_config(spec)["model"]["pretrained_modalities"] == ["t1", "flair"]


def test_poc_runner_refuses_a_stage_without_its_predecessor_before_starting(fake_poc):
    run_poc, out = fake_poc
    with pytest.raises(StageError, match="stage2_atlas starts from the global model of stage1"):
        run_poc(out, stages=["stage2_atlas"])
    assert not FakePocDeployment.started and not SUBMITTED


# ---------------------------------------------------------------------------- the site reads the federation section
def _deployed_app(tmp_path: Path, raw: dict) -> SitePaths:
    app = tmp_path / "ws" / "job-1" / "app_site-1"
    (app / "config").mkdir(parents=True)
    (app / "custom").mkdir()
    (app / "config" / run_folders.RUN_CONFIG_FILE).write_text(yaml.safe_dump(raw))
    (tmp_path / "ws" / "local").mkdir()
    (tmp_path / "ws" / "local" / "bsf_site.yaml").write_text("data: {root: /data/ukb}\ntrain: {device: cpu}\n")
    return SitePaths.from_script(app / "custom" / "bsf_client.py")


def test_site_reads_its_settings_from_the_run_config(tmp_path):
    spec = COMMITTED_JOBS["stage1"].with_federation(local_steps=3, transfer="full", transfer_dtype="float16")
    paths = _deployed_app(tmp_path, job_run_config(spec))
    config = site_run_config("site-1", paths)
    assert config.federation == spec.federation
    assert config.data.root == "/data/ukb" and config.model.pretrained is None
    assert config.train.output_dir == str(paths.job / "bsf_site")


def test_site_refuses_a_run_config_without_federation_section(tmp_path):
    raw = job_run_config(COMMITTED_JOBS["stage1"])
    del raw["federation"]
    paths = _deployed_app(tmp_path, raw)
    with pytest.raises(ConfigError, match=r"bsf_run.yaml: no federation section"):
        site_run_config("site-1", paths)
