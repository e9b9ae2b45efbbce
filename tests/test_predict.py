"""Prediction, evaluation and MONAI bundles of fine-tuned models (random test-size weights, synthetic cases at 3 mm)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bsf.cli import main
from bsf.config import load_config
from bsf.engine import build_model
from bsf.errors import CheckpointError, ConfigError, DataError
from bsf.predict import load_finetuned, predict_case, regions_to_labels, resolve_inputs

MODALITIES = ["flair", "t1ce", "t1", "t2"]


def _reoriented(src: Path, dst: Path, axcodes: tuple[str, str, str]) -> None:
    """A copy of ``src`` stored in another voxel order (as real BraTS files are stored LPS, not RAS)."""
    image = nib.load(src)
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(image.affine), nib.orientations.axcodes2ornt(axcodes))
    nib.save(image.as_reoriented(transform), dst)


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    """Two synthetic BraTS cases, a random Stage-3 BraTS model saved as checkpoint_last / checkpoint_best /
    NVFlare global model, and case 0 re-stored in P-S-L voxel order."""
    from bsf.data.synth import synthesize

    base = tmp_path_factory.mktemp("bsfpredict")
    root = base / "brats"
    synthesize("brats", 2, root, spacing=3.0, seed=0)
    config = load_config("stage3_brats_test", [f"data.root={root}", f"train.output_dir={base / 'run'}"])
    model = build_model(config)
    state = model.state_dict()
    run = base / "run"
    run.mkdir()
    torch.save({"version": 1, "step": 0, "model": state, "config": config.to_dict()}, run / "checkpoint_last.pt")
    torch.save({"model": state, "step": 0, "metrics": {}}, run / "checkpoint_best.pt")
    fl = base / "app_server"
    fl.mkdir()
    torch.save({"model": state}, fl / "FL_global_model.pt")
    psl = base / "psl_case"
    psl.mkdir()
    for m in MODALITIES:
        _reoriented(root / "BraTS2021_00000" / f"BraTS2021_00000_{m}.nii.gz", psl / f"case_{m}.nii.gz", ("P", "S", "L"))
    return {"base": base, "root": root, "config": config, "state": state, "run": run, "fl": fl, "psl": [psl / f"case_{m}.nii.gz" for m in MODALITIES]}


@pytest.fixture(scope="module")
def psl_prediction(brats):
    """``bsf predict`` of the P-S-L case from checkpoint_best.pt (config found beside it)."""
    out = brats["base"] / "pred" / "psl_seg.nii.gz"
    code = main(["predict", "--model", str(brats["run"] / "checkpoint_best.pt"), "--device", "cpu", "--no-progress",
                 "--input", *map(str, brats["psl"]), "--output", str(out)])
    assert code == 0
    return out


def test_regions_to_labels_on_hand_made_regions():
    tc = np.array([1, 1, 0, 0, 0, 1], bool)
    wt = np.array([1, 1, 1, 0, 0, 0], bool)
    et = np.array([1, 0, 0, 0, 1, 0], bool)
    regions = np.stack([tc, wt, et]).reshape(3, 6, 1, 1)
    # ET -> 4 (even outside TC/WT); TC minus ET -> 1 (even outside WT); WT minus TC -> 2; nothing -> 0
    assert regions_to_labels(regions).ravel().tolist() == [4, 1, 2, 0, 4, 1]
    assert regions_to_labels(regions, et_label=3).ravel().tolist() == [3, 1, 2, 0, 3, 1]
    assert regions_to_labels(torch.from_numpy(et.reshape(1, 6, 1, 1))).ravel().tolist() == [1, 0, 0, 0, 1, 0]
    assert regions_to_labels(regions).dtype == np.uint8
    with pytest.raises(ValueError, match="shape"):
        regions_to_labels(np.zeros((2, 3, 3, 3)))


def test_load_finetuned_from_each_checkpoint_layout(brats):
    last = load_finetuned(brats["run"] / "checkpoint_last.pt")
    best = load_finetuned(brats["run"] / "checkpoint_best.pt")  # config from checkpoint_last.pt beside it
    assert last.config_source.endswith("checkpoint_last.pt") and best.config_source.endswith("checkpoint_last.pt")
    fl_model = brats["fl"] / "FL_global_model.pt"
    with pytest.raises(CheckpointError, match="--config"):
        load_finetuned(fl_model)
    fl = load_finetuned(fl_model, "stage3_brats_test", ["finetune.threshold=0.4"])
    assert fl.config.finetune.threshold == 0.4
    for loaded in (last, best, fl):
        assert all(torch.equal(v, brats["state"][k]) for k, v in loaded.model.state_dict().items())
    with pytest.raises(CheckpointError, match="patch_embed"):  # a config that builds another network: strict
        load_finetuned(fl_model, "stage3_brats_test", ["model.in_channels=2", "data.modalities=[flair,t1]"])
    with pytest.raises(ConfigError, match="finetune"):
        load_finetuned(fl_model, "stage1_test")


def test_predict_keeps_the_input_grid_and_writes_only_brats_labels(brats, psl_prediction):
    reference = nib.load(brats["psl"][0])
    written = nib.load(psl_prediction)
    assert written.shape == reference.shape
    assert np.array_equal(written.affine, reference.affine)
    assert nib.aff2axcodes(written.affine) == ("P", "S", "L")
    assert written.get_data_dtype() == np.uint8
    labels = np.asanyarray(written.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}


class _FlairIsEverything(torch.nn.Module):
    """A pointwise 'network': every region's logit is the normalised FLAIR intensity of the same voxel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].repeat(1, 3, 1, 1, 1) * 10


def test_prediction_maps_back_voxel_for_voxel(brats):
    """With a pointwise model the label of each input voxel is known from that voxel alone: any error in undoing
    the reorientation, crop or pad moves labels and shows up here."""
    finetuned = load_finetuned(brats["run"] / "checkpoint_last.pt")
    prediction = predict_case(finetuned, brats["psl"], model=_FlairIsEverything())
    flair = np.asanyarray(nib.load(brats["psl"][0]).dataobj).astype(np.float64)
    brain = flair != 0
    expected = np.where(brain & (flair > flair[brain].mean()), 4, 0)
    assert prediction.labels.shape == flair.shape
    assert np.count_nonzero(prediction.labels != expected) <= 2  # float32 vs float64 z-score at the mean itself
    assert np.count_nonzero(expected) > 1000


def test_case_folders_are_read_by_suffix_in_the_model_order(brats, tmp_path):
    config = brats["config"]
    case = resolve_inputs([brats["root"] / "BraTS2021_00001"], config)
    assert [p.name for p in case.files] == [f"BraTS2021_00001_{m}.nii.gz" for m in MODALITIES]
    assert not case.brats2023_names
    folder = tmp_path / "BraTS-GLI-00001-000"
    folder.mkdir()
    for old, new in zip(MODALITIES, ["t2f", "t1c", "t1n", "t2w"]):
        shutil.copy(brats["root"] / "BraTS2021_00001" / f"BraTS2021_00001_{old}.nii.gz", folder / f"BraTS-GLI-00001-000-{new}.nii.gz")
    case = resolve_inputs([folder], config)
    assert [p.name.split("-")[-1] for p in case.files] == ["t2f.nii.gz", "t1c.nii.gz", "t1n.nii.gz", "t2w.nii.gz"]
    assert case.brats2023_names
    (folder / "BraTS-GLI-00001-000-t2w.nii.gz").unlink()
    with pytest.raises(DataError, match="no t2 image"):
        resolve_inputs([folder], config)
    with pytest.raises(DataError, match="takes 4 image"):
        resolve_inputs(brats["psl"][:2], config)


def test_missing_input_file_is_a_one_line_error_naming_it(brats, tmp_path, capsys):
    missing = tmp_path / "case_t1ce.nii.gz"
    code = main(["predict", "--model", str(brats["run"] / "checkpoint_last.pt"), "--input", str(brats["psl"][0]), str(missing),
                 *map(str, brats["psl"][2:]), "--output", str(tmp_path / "out.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.nii.gz").exists()


def test_evaluate_writes_one_csv_row_per_case_and_a_summary(brats, tmp_path, capsys):
    root = brats["root"]
    cases = [{"id": f"BraTS2021_0000{i}", "image": [f"BraTS2021_0000{i}/BraTS2021_0000{i}_{m}.nii.gz" for m in MODALITIES],
              "label": f"BraTS2021_0000{i}/BraTS2021_0000{i}_seg.nii.gz"} for i in range(2)]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"dataset": "brats", "root": str(root), "training": cases[:1], "validation": cases}))
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(brats["run"] / "checkpoint_last.pt"), "--device", "cpu", "--no-progress",
                 "--datalist", str(datalist), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "BraTS2021_00001" in printed and "mean" in printed
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["case"] for r in rows] == ["BraTS2021_00000", "BraTS2021_00001"]
    assert {"dice_TC", "dice_WT", "dice_ET", "dice_mean", "hd95_TC", "hd95_WT", "hd95_ET", "hd95_mean"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and summary["split"] == "validation"
    for name, stats in summary["metrics"].items():
        values = [float(r[name]) for r in rows]
        assert stats["mean"] == pytest.approx(np.mean(values), abs=1e-5) and stats["std"] == pytest.approx(np.std(values), abs=1e-5)
        assert stats["n"] == 2
    assert all(0.0 <= float(r["dice_mean"]) <= 1.0 for r in rows)


def test_bundle_runs_with_monai_and_writes_the_same_label_map(brats, psl_prediction, tmp_path):
    from monai.bundle import run

    bundle = tmp_path / "bundle"
    assert main(["bundle", "export", "--model", str(brats["run"] / "checkpoint_best.pt"), "--out", str(bundle)]) == 0
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["network_def"]["_target_"] == "monai.networks.nets.SwinUNETR"
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]["num_channels"] == 4
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert set(state) == set(brats["state"])

    out = tmp_path / "bundle_out"
    run(config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle), image=[str(p) for p in brats["psl"]], output_dir=str(out))
    written = sorted(out.glob("*.nii.gz"))
    assert [p.name for p in written] == ["case_flair_seg.nii.gz"]
    from_bundle, from_bsf = nib.load(written[0]), nib.load(psl_prediction)
    assert from_bundle.shape == from_bsf.shape and np.allclose(from_bundle.affine, from_bsf.affine)
    assert np.array_equal(np.asanyarray(from_bundle.dataobj), np.asanyarray(from_bsf.dataobj))


def test_atlas_model_predicts_a_binary_mask_from_the_t1w_folder(tmp_path):
    from bsf.data.synth import synthesize

    root = tmp_path / "atlas"
    (subject,) = synthesize("atlas", 1, root, spacing=3.0, seed=1)
    config = load_config("stage3_brats_test", ["data.dataset=atlas", "model.in_channels=1", "model.out_channels=1", f"data.root={root}"])
    model_path = tmp_path / "checkpoint_last.pt"
    torch.save({"model": build_model(config).state_dict(), "config": config.to_dict()}, model_path)
    out = tmp_path / "lesion.nii.gz"
    assert main(["predict", "--model", str(model_path), "--device", "cpu", "--no-progress", "--input", str(subject), "--output", str(out)]) == 0
    (t1w,) = subject.rglob("*_T1w.nii.gz")
    written, reference = nib.load(out), nib.load(t1w)
    assert written.shape == reference.shape and np.array_equal(written.affine, reference.affine)
    assert set(np.unique(np.asanyarray(written.dataobj)).tolist()) <= {0, 1}
