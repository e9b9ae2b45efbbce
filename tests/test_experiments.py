"""The paper's protocols at tiny size (`bsf experiment ...`): report folders, tables, resume, redo of unfinished runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from bsf.cli import main
from bsf.model import SSLModel, save_encoder

#: every run: 1 step of one 64^3 crop, no extra validation
TINY = ["--preset", "stage3_brats_test", "train.steps=1", "data.crops_per_volume=1", "train.progress=false", "train.val_every=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """5 BraTS-like cases (official folds 4, 4, 1, 3, 0), 3 ATLAS-like subjects, and two test-size encoders."""
    from bsf.data.synth import synthesize

    root = tmp_path_factory.mktemp("exp_data")
    synthesize("brats", 5, root / "brats", spacing=3.0, seed=0)
    synthesize("atlas", 3, root / "atlas", spacing=3.0, seed=0)
    torch.manual_seed(0)
    save_encoder(SSLModel("test", 2), root / "enc_t1_flair.pt")
    save_encoder(SSLModel("test", 1), root / "enc_t1.pt")
    return {"brats": root / "brats", "atlas": root / "atlas", "enc2": root / "enc_t1_flair.pt", "enc1": root / "enc_t1.pt"}


def _run(args: list[str], capsys) -> str:
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def _table(markdown: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after ``heading``, without the separator line."""
    lines = markdown.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[start:end] if not line.startswith("|---")]


def _numbers(cells: list[str]) -> list[float]:
    return [float(x) for c in cells for x in re.findall(r"-?\d+\.\d+", c)]


def _check_folder(out: Path, plot: str, n_runs: int) -> list[dict]:
    for name in ("config.yaml", "experiment.json", "results.json", "report.md", plot):
        assert (out / name).is_file(), name
    assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == n_runs
    for run in runs:
        for name in ("config.yaml", "datalist.json", "metrics.json", "eval/metrics.csv"):
            assert (run / name).is_file(), run / name
    records = json.loads((out / "results.json").read_text())["runs"]
    assert len(records) == n_runs and all(all(math.isfinite(v) for v in r["metrics"].values()) for r in records)
    return records


def test_cv_report_resume_and_redo(data, tmp_path, capsys):
    out = tmp_path / "cv"
    args = ["experiment", "cv", "--dataset", "brats", "--root", str(data["brats"]), "--folds", "0-1", "--out", str(out), *TINY]
    assert "2 trained now, 0 finished before" in _run(args, capsys)
    records = _check_folder(out, "dice_per_fold.png", 2)
    assert {r["labels"]["fold"] for r in records} == {0, 1}
    held_out = {r["labels"]["fold"]: r["held_out_cases"] for r in records}
    assert held_out == {0: ["BraTS2021_00004"], 1: ["BraTS2021_00002"]}  # the official split
    report = (out / "report.md").read_text()
    rows = _table(report, "## Dice per fold: `scratch`")
    assert rows[0] == ["fold", "TC", "WT", "ET", "mean"] and [r[0] for r in rows[1:3]] == ["0", "1"]
    assert all(0 <= v <= 1 for v in _numbers([c for r in rows[1:] for c in r[1:]]))
    assert "0.9115" in report  # the paper's 5-fold mean beside ours

    # a rerun trains nothing; a run without metrics.json (interrupted) is redone from a clean folder
    finished = out / "runs" / "fold0_scratch_seed0" / "metrics.json"
    mtime = finished.stat().st_mtime_ns
    assert "0 trained now, 2 finished before" in _run(args, capsys)
    interrupted = out / "runs" / "fold1_scratch_seed0"
    (interrupted / "metrics.json").unlink()
    (interrupted / "half_written.tmp").write_text("x")
    assert "1 trained now, 1 finished before" in _run(args, capsys)
    assert finished.stat().st_mtime_ns == mtime
    assert (interrupted / "metrics.json").is_file() and not (interrupted / "half_written.tmp").exists()

    # a finished run is not reused under a different config
    assert main([*args, "train.steps=2"]) == 2
    assert "train.steps" in capsys.readouterr().err


def test_fewshot_subsets_exclude_the_held_out_fold(data, tmp_path, capsys):
    out = tmp_path / "fewshot"
    args = [
        "experiment", "fewshot", "--root", str(data["brats"]), "--fold", "0", "--percents", "25,100", "--subsets", "1",
        "--pretrained", str(data["enc2"]), "--pretrained-modalities", "t1,flair", "--out", str(out), *TINY,
    ]
    _run(args, capsys)
    records = _check_folder(out, "fewshot.png", 4)
    for r in records:
        assert "BraTS2021_00004" not in r["training_cases"] and r["held_out_cases"] == ["BraTS2021_00004"]
        assert r["n_training"] == {25: 1, 100: 4}[r["labels"]["percent"]]
    rows = _table((out / "report.md").read_text(), "## dice_mean by share")
    assert rows[0] == ["training cases", "subsets", "pretrained", "scratch"]
    assert [r[0] for r in rows[1:]] == ["25 %", "100 %"] and len(_numbers([c for r in rows[1:] for c in r[2:]])) == 4
    config = (out / "runs" / "p25_subset0_pretrained" / "config.yaml").read_text()
    assert str(data["enc2"]) in config


def test_single_modality_feeds_t1_to_both_channels(data, tmp_path, capsys):
    out = tmp_path / "t1"
    args = ["experiment", "single-modality", "--root", str(data["brats"]), "--folds", "1", "--pretrained", str(data["enc1"]), "--out", str(out), *TINY]
    _run(args, capsys)
    records = _check_folder(out, "dice_per_fold.png", 2)
    assert {r["labels"]["arm"] for r in records} == {"pretrained", "scratch"}
    import yaml

    config = yaml.safe_load((out / "runs" / "fold1_pretrained_seed0" / "config.yaml").read_text())
    assert config["data"]["modalities"] == ["t1", "t1"] and config["model"]["in_channels"] == 2
    assert config["model"]["pretrained_modalities"] == ["t1"]
    case = json.loads((out / "runs" / "fold1_pretrained_seed0" / "datalist.json").read_text())["validation"][0]
    assert len(case["image"]) == 4  # the datalist keeps every modality; the config picks T1 twice
    assert "0.721" in (out / "report.md").read_text()


def test_atlas_reports_the_four_challenge_metrics(data, tmp_path, capsys):
    out = tmp_path / "atlas"
    tiny = ["--preset", "stage3_atlas_test", *TINY[2:]]
    _run(["experiment", "atlas", "--root", str(data["atlas"]), "--out", str(out), *tiny], capsys)
    _check_folder(out, "atlas_metrics.png", 1)
    rows = _table((out / "report.md").read_text(), "## ATLAS challenge metrics")
    assert rows[0] == ["arm", "Dice", "lesion-wise F1", "simple lesion count", "volume difference (mm^3)"]
    assert rows[1][0] == "scratch" and len(_numbers(rows[1][1:])) == 4


@pytest.mark.slow
def test_federated_runs_go_through_the_nvflare_simulator(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BSF_PRETRAINED", str(tmp_path / "must_not_be_used.pt"))  # the scratch arm ignores it
    out = tmp_path / "atlas_fl"
    tiny = ["--preset", "stage3_atlas_test", "train.steps=2", "data.crops_per_volume=1", "train.progress=false", "train.val_every=0"]
    _run(["experiment", "atlas", "--root", str(data["atlas"]), "--federated", "--local-steps", "1", "--out", str(out), *tiny], capsys)
    (record,) = _check_folder(out, "atlas_metrics.png", 1)
    assert record["federated"] and record["model_scored"].endswith("FL_global_model.pt")
    assert Path(record["model_scored"]).is_file() and "one-site NVFlare federation" in (out / "report.md").read_text()
