"""Stages 2 and 3 as federated jobs, and the chained Stage 1 -> 2 -> 3 pipeline in the NVFlare simulator.

Unit tests (seconds): where each job's initial global model comes from (the previous stage's model,
adapted by modality name on the server; a clear error when it is missing or does not fit), which
metric selects the best model (and in which direction), the cross-site table, and dataset-aware
site synthesis. Slow tests (about 3 minutes on 2 CPU cores): the chained pipeline at tiny size
(``bsf.pipeline.chain``, 5 simulator runs) and the committed ``jobs/stage3_brats`` refusing to start
without a previous model. They check artifacts, not only exit codes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bsf.engine import build_model, load_config
from bsf.errors import CheckpointError
from bsf.fl.crosssite import cross_site_table, format_markdown, write_cross_site_table
from bsf.fl.jobs import COMMITTED_JOBS, job_run_config, job_selection_metric
from bsf.federation.initial_model import ENV_PRETRAINED, initial_global_weights, load_global_model
from bsf.model import SSLModel

JOBS = Path(__file__).resolve().parents[1] / "jobs"
ENC = "swinViT."
EMBED = "swinViT.patch_embed.proj.weight"
NVFLARE = str(Path(sys.executable).with_name("nvflare"))


def job_config(name: str):
    return load_config(JOBS / name / "app" / "config" / "bsf_run.yaml")


@pytest.fixture(scope="module")
def stage1_model(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    """A Stage-1-like global model file as the FL server writes it: ``{"model": encoder state}``, 2 channels (t1, flair)."""
    torch.manual_seed(11)
    state = {k: v.clone() for k, v in SSLModel("test", 2).state_dict().items() if k.startswith(ENC)}
    path = tmp_path_factory.mktemp("stage1") / "FL_global_model.pt"
    torch.save({"model": state}, path)
    return state, path


# ---------------------------------------------------------------------------- jobs
def test_stage_jobs_scope_previous_model_and_selection_metric():
    """Stage 2 aggregates the encoder, Stage 3 everything; both need a previous model; Dice is higher-is-better."""
    for name in ("stage2_brats", "stage2_atlas", "stage3_brats", "stage3_atlas"):
        spec = COMMITTED_JOBS[name]
        assert spec.needs_previous_model, name
        assert spec.federation.scope == ("all" if name.startswith("stage3") else "encoder"), name
        assert job_config(name).federation.scope == spec.federation.scope
        server = json.loads((JOBS / name / "app" / "config" / "config_fed_server.json").read_text())
        components = {c["id"]: c for c in server["components"]}
        assert components["persistor"]["args"]["require_pretrained"] is True
        selector = next(w for w in server["workflows"] if w["id"] == "fedavg")["args"]  # the controller picks the best
        if name.startswith("stage3"):
            assert job_selection_metric(spec) == ("val_dice_mean", False)
            assert selector["key_metric"] == "val_dice_mean" and not selector.get("lower_is_better", False)
            assert components["json_generator"]["path"] == "bsf.fl.crosssite.CrossSiteResultsWriter"
        else:
            assert job_selection_metric(spec) == ("val_reconstruction_l1", True)
            assert selector["key_metric"] == "val_reconstruction_l1" and selector["lower_is_better"] is True
    assert job_config("stage3_brats").model.pretrained_modalities == ["flair", "t1ce", "t1", "t2"]
    assert job_config("stage2_brats").model.pretrained_modalities == ["t1", "flair"]
    assert job_config("stage3_atlas").model.out_channels == 1
    assert job_run_config(COMMITTED_JOBS["stage3_brats"])["stage"] == "finetune"


def test_missing_previous_model_is_a_clear_error(tmp_path):
    config = job_config("stage2_brats")
    with pytest.raises(CheckpointError, match=r"job stage2_brats starts from the previous stage's model, but none is set.*BSF_PRETRAINED"):
        initial_global_weights(config, "encoder", require_pretrained=True, job="job stage2_brats", environ={})
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=r"nope\.pt \(from \$BSF_PRETRAINED\) not found"):
        initial_global_weights(config, "encoder", require_pretrained=True, environ={ENV_PRETRAINED: str(missing)})
    with pytest.raises(CheckpointError, match=r"nope\.pt \(from the job's persistor setting"):
        initial_global_weights(config, "encoder", pretrained=str(missing), environ={})
    # Stage 1 needs none: the seeded initialisation
    _, origin = initial_global_weights(job_config("stage1"), "encoder", environ={})
    assert origin == "seed 0"


def test_incompatible_previous_model_is_a_clear_error(stage1_model, tmp_path):
    _, path = stage1_model
    # a 2-channel Stage 1 model given to Stage 3 BraTS, which expects the 4-channel Stage 2 BraTS model
    with pytest.raises(CheckpointError, match=r"does not fit this job's model.*flair', 't1ce', 't1', 't2'"):
        initial_global_weights(job_config("stage3_brats"), "all", pretrained=str(path), environ={})
    # a model of another size
    state = {k: v for k, v in SSLModel("tiny", 2).state_dict().items() if k.startswith(ENC)}
    torch.save({"model": state}, tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match=r"does not fit.*size 'test'"):
        initial_global_weights(job_config("stage2_atlas"), "encoder", require_pretrained=True, environ={ENV_PRETRAINED: str(tmp_path / "tiny.pt")})
    # a file that is not a checkpoint
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        initial_global_weights(job_config("stage2_atlas"), "encoder", pretrained=str(tmp_path / "junk.pt"), environ={})


def test_server_initial_model_is_the_adapted_previous_model_and_equals_the_engines(stage1_model):
    """Stage 2 BraTS: pretrained T1/FLAIR filters land in their BraTS channels; identical to what
    ``build_model`` gives with ``model.pretrained`` (so equal to any engine's), and deterministic."""
    source, path = stage1_model
    config = job_config("stage2_brats")
    weights, origin = initial_global_weights(config, "encoder", environ={ENV_PRETRAINED: str(path)}, require_pretrained=True)
    assert "BSF_PRETRAINED" in origin and set(weights) == set(source)
    assert np.array_equal(weights[EMBED][:, 0], source[EMBED][:, 1].numpy())  # FLAIR
    assert np.array_equal(weights[EMBED][:, 2], source[EMBED][:, 0].numpy())  # T1
    assert all(np.array_equal(weights[k], source[k].numpy()) for k in source if k != EMBED)
    reference = build_model(load_config(JOBS / "stage2_brats" / "app" / "config" / "bsf_run.yaml", [f"model.pretrained={path}"]))
    ref = reference.state_dict()
    assert all(np.array_equal(weights[k], ref[k].numpy()) for k in weights)
    again, _ = initial_global_weights(config, "encoder", pretrained=str(path), environ={})
    assert all(np.array_equal(again[k], weights[k]) for k in weights)
    # Stage 3 from that (4-channel) Stage 2 model: scope "all" adds the new decoder; the encoder is taken as is
    stage2 = path.with_name("stage2_FL_global_model.pt")
    torch.save({"model": {k: torch.from_numpy(v) for k, v in weights.items()}}, stage2)
    full, _ = initial_global_weights(job_config("stage3_brats"), "all", pretrained=str(stage2), environ={})
    assert "out.conv.conv.weight" in full and full["out.conv.conv.weight"].shape[0] == 3
    assert all(np.array_equal(full[k], weights[k]) for k in weights)


# ---------------------------------------------------------------------------- cross-site table
def test_cross_site_table_rows_models_columns_sites(tmp_path):
    results = {
        "site-1": {"SRV_FL_global_model.pt": {"val_dice_mean": 0.5, "val_dice_wt": 0.7}, "site-2": {"val_dice_mean": 0.25}, "site-1": {"val_dice_mean": 0.75}},
        "site-2": {"SRV_FL_global_model.pt": {"val_dice_mean": 0.3}, "SRV_best_FL_global_model.pt": {"val_dice_mean": 0.4}},
    }
    table = cross_site_table(results)
    assert table["metric"] == "val_dice_mean" and table["metrics"][0] == "val_dice_mean"
    assert table["models"] == ["SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", "site-1", "site-2"]
    assert table["sites"] == ["site-1", "site-2"]
    assert table["tables"]["val_dice_mean"]["SRV_FL_global_model.pt"] == {"site-1": 0.5, "site-2": 0.3}
    assert table["tables"]["val_dice_mean"]["site-1"] == {"site-1": 0.75, "site-2": None}
    assert table["mean_over_sites"]["val_dice_mean"]["SRV_FL_global_model.pt"] == pytest.approx(0.4)
    md = format_markdown(table)
    assert "| global (last round) | 0.5000 | 0.3000 | 0.4000 |" in md
    assert "| site-1 (local) | 0.7500 | n/a | 0.7500 |" in md
    (tmp_path / "cross_site_val").mkdir()
    (tmp_path / "cross_site_val" / "cross_val_results.json").write_text(json.dumps(results))
    json_path, md_path = write_cross_site_table(tmp_path)
    assert json.loads(json_path.read_text())["sites"] == ["site-1", "site-2"] and md_path.read_text() == format_markdown(table, "Cross-site evaluation")


def test_unconfigured_site_synthesises_the_jobs_data_set(tmp_path):
    """A Stage 2/3 BraTS site without data synthesises BraTS-like cases (with tumour labels), not UKB."""
    from bsf.data.layouts import find_brats_cases
    from bsf.federation.site_config import SiteConfig, SyntheticData, prepare_site_data, resolve_site

    assert resolve_site("site-9", tmp_path, environ={}).synthesises  # nothing configured -> synthesise
    site = prepare_site_data(SiteConfig(site="site-9", synthetic=SyntheticData(subjects=2, spacing=6.0)), "brats", tmp_path)
    root = Path(site.setting("data.root"))
    assert site.setting("data.dataset") == "brats" and "synthetic-brats" in root.name and not site.synthesises
    cases = find_brats_cases(root)
    assert len(cases) == 2 and all("label" in c for c in cases)


# ---------------------------------------------------------------------------- the chained pipeline
@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Stage 1 -> 2 -> 3 (BraTS and ATLAS) at tiny size: 2 UKB-, 2 BraTS-, 1 ATLAS-like site, 3 subjects each
    at 3 mm; Stages 1-2 one round of one step, Stage 3 two rounds of one step (about 2.5 minutes)."""
    from bsf.pipeline.chain import ChainConfig, run_chain

    cfg = ChainConfig.tiny(tmp_path_factory.mktemp("chain"))
    return cfg, run_chain(cfg)  # each stage's job names the model it starts from; BSF_SITE_CONFIG maps the sites


def _lr_bound(job: str, steps: int) -> float:
    """Largest change of one weight in ``steps`` AdamW steps of the job (steps <= 2 here).

    For Adam's first two bias-corrected steps |m_hat| / sqrt(v_hat) <= 1 (Cauchy-Schwarz), so a step
    moves a weight by at most lr (the schedule never exceeds ``optim.lr``), plus the decoupled weight
    decay lr * wd * |w| (~1e-8 here); FedAvg of site differences cannot exceed the largest. 10 % slack.
    A model not started from the previous stage differs by O(0.1), far above this bound."""
    assert steps <= 2
    return 1.1 * steps * job_config(job).optim.lr


@pytest.mark.slow
def test_chain_produces_every_stage_feeding_the_next(chain):
    cfg, summary = chain
    stages = summary["stages"]
    assert list(stages) == ["stage1", "stage2_brats", "stage2_atlas", "stage3_brats", "stage3_atlas"]
    models = {job: load_global_model(summary["models"][job]) for job in stages}
    for job in ("stage1", "stage2_brats", "stage2_atlas"):  # SSL stages: only the encoder is global
        assert models[job] and all(k.startswith(ENC) for k in models[job]), job
    for job in ("stage3_brats", "stage3_atlas"):  # fine-tuning: the whole SwinUNETR, decoder included
        assert any(not k.startswith(ENC) for k in models[job]) and "out.conv.conv.weight" in models[job]
    for job, model in models.items():
        assert all(np.isfinite(v).all() for v in model.values()), job
    assert models["stage2_brats"][EMBED].shape[1] == 4 and models["stage2_atlas"][EMBED].shape[1] == 1
    assert models["stage3_brats"]["out.conv.conv.weight"].shape[0] == 3 and models["stage3_atlas"]["out.conv.conv.weight"].shape[0] == 1

    # each stage started from the previous stage's global model: its encoder is within what its
    # few optimiser steps can move a weight (see _lr_bound) of the previous model, channels mapped by name
    s1, s2b, s2a, s3b, s3a = (models[j] for j in stages)
    def close(a, b, job):
        bound = _lr_bound(job, stages[job]["rounds"] * stages[job]["local_steps"])
        return float(np.abs(a.astype(np.float64) - b).max()) <= bound
    assert close(s2b[EMBED][:, 0], s1[EMBED][:, 1], "stage2_brats") and close(s2b[EMBED][:, 2], s1[EMBED][:, 0], "stage2_brats")
    assert close(s2a[EMBED][:, 0], s1[EMBED][:, 0], "stage2_atlas")
    for key in s1:
        if key != EMBED:
            assert close(s2b[key], s1[key], "stage2_brats") and close(s2a[key], s1[key], "stage2_atlas"), key
    for key in s2b:
        assert close(s3b[key], s2b[key], "stage3_brats") and close(s3a[key], s2a[key], "stage3_atlas"), key
    # ... and every stage trained: Stage 3's global model differs from its initial model
    for job, result in stages.items():
        assert result["change_from_initial"] > 1e-7, job
    assert stages["stage3_brats"]["change_from_initial"] > 1e-5 and stages["stage3_atlas"]["change_from_initial"] > 1e-5


@pytest.mark.slow
def test_chain_stage3_cross_site_table_and_dice(chain):
    """The cross-site table: every model (both globals, each site's) at every site.

    Tiny size is two rounds of one step: BraTS-like mean Dice rises 0.006 -> 0.015 -> 0.05-0.08 (measured),
    so the check is that each round's global model beats the previous one there; ATLAS lesions stay at 0
    after two steps. The Dice floor of a real (if short) fine-tuning run is in tests/test_finetune.py.
    Also checked: "best" follows Dice upwards (higher is better)."""
    cfg, summary = chain
    for job, sites in (("stage3_brats", ["brats-1", "brats-2"]), ("stage3_atlas", ["atlas-1"])):
        result = summary["stages"][job]
        table = json.loads(Path(result["cross_site"]["json"]).read_text())
        assert table["metric"] == "val_dice_mean" and table["sites"] == sites
        assert table["models"] == ["SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", *sites]
        for name, rows in table["tables"].items():
            for model, row in rows.items():
                for site, value in row.items():
                    assert value is not None and math.isfinite(value) and 0.0 <= value <= 1.0, (job, name, model, site)
        markdown = Path(result["cross_site"]["markdown"]).read_text()
        assert "| global (last round) |" in markdown and f"| {sites[0]} (local) |" in markdown
        # the server wrote the same table at the end of the run
        server_table = Path(result["run_dir"]) / "cross_site_val" / "cross_site_table.json"
        assert json.loads(server_table.read_text())["tables"] == table["tables"]

        # Dice per round: round r's site validation is of the global model after r rounds
        per_round = result["dice_by_round"]
        assert set(per_round) == set(sites)
        assert all(v is not None and 0.0 <= v <= 1.0 for values in per_round.values() for v in values)
        # best_FL_global_model is the validated global model with the HIGHEST mean Dice (not the lowest), among every
        # global model the sites validated: model r in round r + 1, the last one after the last round
        selection = json.loads((Path(result["run_dir"]) / "bsf_model_selection.json").read_text())
        assert selection["metric"] == "val_dice_mean" and not selection["lower_is_better"]
        candidates = selection["candidates"]
        assert [c["model_round"] for c in candidates] == list(range(result["rounds"])) and selection["last_model_validated"]
        for c in candidates[:-1]:
            assert all(c["sites"][s] == pytest.approx(per_round[s][c["model_round"] + 1], abs=1e-6) for s in sites), c
        last = table["tables"]["val_dice_mean"]["SRV_FL_global_model.pt"]
        assert all(candidates[-1]["sites"][s] == pytest.approx(last[s], abs=1e-6) for s in sites), (candidates, last)
        assert selection["best"]["value"] == max(c["value"] for c in candidates)
        best = table["tables"]["val_dice_mean"]["SRV_best_FL_global_model.pt"]
        for site in sites:
            assert best[site] == pytest.approx(selection["best"]["sites"][site], abs=1e-6), (job, site, selection)
        [overlay] = result["overlays"]
        assert overlay["dice"] and all(0.0 <= v <= 1.0 for v in overlay["dice"].values())
        if job == "stage3_brats":
            for site in sites:
                assert all(later > earlier for earlier, later in zip(per_round[site], per_round[site][1:])), (site, per_round)


@pytest.mark.slow
def test_chain_report(chain):
    cfg, summary = chain
    report = Path(summary["report"]["markdown"])
    text = report.read_text()
    for job in summary["stages"]:
        assert f"| {job} |" in text
    assert "Cross-site evaluation: stage3_brats" in text and "Cross-site evaluation: stage3_atlas" in text
    for name in ("loss_curves.png", "dice_per_round.png", "overlay.png"):
        png = report.parent / name
        assert f"]({name})" in text and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    assert json.loads((report.parent / "chain_summary.json").read_text())["models"].keys() == summary["models"].keys()


@pytest.mark.slow
def test_committed_stage3_job_without_previous_model_stops_at_start(tmp_path):
    """``nvflare simulator jobs/stage3_brats`` with no $BSF_PRETRAINED: the server refuses to start, says how
    to fix it, and no global model is written (never a silent random initialisation)."""
    env = {k: v for k, v in os.environ.items() if k not in (ENV_PRETRAINED, "BSF_SITE_CONFIG")}
    env["OMP_NUM_THREADS"] = "1"
    ws = tmp_path / "ws"
    proc = subprocess.run(
        [NVFLARE, "simulator", str(JOBS / "stage3_brats"), "-w", str(ws), "-n", "1", "-t", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert "CANNOT START" in log and "job stage3_brats starts from the previous stage's model, but none is set" in log, log[-3000:]
    assert "BSF_PRETRAINED" in log
    assert not (ws / "server" / "simulate_job" / "app_server" / "FL_global_model.pt").exists()
