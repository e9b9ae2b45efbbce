"""The guides' first hour (docs/data.md, docs/researcher.md, docs/prediction.md) at test size, through the ``bsf``
command as a new user types it: synthetic data in the real layouts, a datalist, its check, Stage 1 -> 2 -> 3
centrally with each stage's exported encoder carried forward without any channel flag, then prediction and
evaluation. Nothing is edited between the steps, and a rerun of any step that would replace a result is refused
rather than silently repeated."""

from __future__ import annotations

import json

import pytest

from bsf.cli import main

SHORT = ["train.steps=2", "optim.warmup_steps=1", "train.val_every=2", "train.checkpoint_every=2", "data.crops_per_volume=1"]


def _bsf(*argv: str) -> None:
    assert main(list(argv)) == 0, f"bsf {' '.join(argv)} failed"


@pytest.mark.slow
def test_the_readme_path_at_test_size(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the presets' default data.root (demo_out/...) is not here: the datalist must win
    for dataset in ("ukb", "brats"):
        _bsf("data", "synth", "--dataset", dataset, "--subjects", "3", "--out", f"data/{dataset}", "--spacing", "5")
    _bsf("data", "index", "--dataset", "brats", "--root", "data/brats", "--out", "brats.json")
    _bsf("data", "check", "--datalist", "brats.json", "--no-progress")

    _bsf("train", "--config", "stage1_test", "data.root=data/ukb", "train.output_dir=runs/s1", *SHORT)
    _bsf("export", "--model", "runs/s1/checkpoint_best.pt", "--out", "stage1_encoder.pt")
    _bsf("train", "--config", "stage2_brats_test", "data.datalist=brats.json", "model.pretrained=stage1_encoder.pt",
         "train.output_dir=runs/stage2_brats", *SHORT)
    _bsf("export", "--model", "runs/stage2_brats/checkpoint_best.pt", "--out", "stage2_encoder.pt")
    # the test-size Stage 3 preset names Stage 1's channels; the Stage 2 encoder says it has BraTS's four
    _bsf("train", "--config", "stage3_brats_test", "data.datalist=brats.json", "model.pretrained=stage2_encoder.pt",
         "train.output_dir=runs/s3", *SHORT)
    case = tmp_path / "data" / "brats" / "BraTS2021_00000"
    _bsf("predict", "--model", "runs/s3/checkpoint_best.pt", "--input", str(case), "--output", "seg.nii.gz", "--no-progress")
    _bsf("evaluate", "--model", "runs/s3/checkpoint_last.pt", "--datalist", "brats.json", "--split", "training",
         "--out", "eval", "--no-progress")
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["n"] == 3

    capsys.readouterr()
    before = (tmp_path / "runs" / "s3" / "checkpoint_best.pt").read_bytes()
    assert main(["train", "--config", "stage3_brats_test", "data.datalist=brats.json", "train.output_dir=runs/s3", *SHORT]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--force" in err and (tmp_path / "runs" / "s3" / "checkpoint_best.pt").read_bytes() == before
    assert main(["evaluate", "--model", "runs/s3/checkpoint_last.pt", "--datalist", "brats.json", "--split", "training",
                 "--out", "eval", "--no-progress"]) == 2
