"""`bsf data index`: datalists from the real layouts (UKB slice rule, BraTS official folds, ATLAS held-out set),
and how training reads them back (folds, modality mapping, root resolution)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

from bsf.cli import main
from bsf.config import load_config
from bsf.data.folds import compact_table, load_folds
from bsf.data.index import index_dataset, read_datalist
from bsf.data.pipeline import training_split
from bsf.data.synth import synthesize
from bsf.errors import DataError

SHARED_FOLDS = Path("/work/shared/data/brats21_folds.json")
SPACING = 4.0  # UKB: 46 slices, BraTS: 39, ATLAS: 47


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for dataset, n in (("ukb", 3), ("brats", 4), ("atlas", 5)):
        out[dataset] = tmp_path_factory.mktemp(f"index_{dataset}")
        synthesize(dataset, n, out[dataset], spacing=SPACING, seed=2)
    return out


def _data_cfg(*overrides: str):
    return load_config(None, ["data.roi=[64, 64, 64]", *overrides]).data


# ------------------------------------------------------------------------------------------------ UKB
def test_ukb_rule_needs_100_slices_by_default(roots) -> None:
    with pytest.raises(DataError, match=">= 100 slices"):
        index_dataset("ukb", roots["ukb"])


def test_ukb_rule_with_lower_threshold_keeps_all_and_holds_out(roots) -> None:
    datalist = index_dataset("ukb", roots["ukb"], min_slices=40, val_count=1).datalist
    assert len(datalist["training"]) == 2 and len(datalist["validation"]) == 1
    assert datalist["modalities"] == ["t1", "flair"]
    for case in datalist["training"] + datalist["validation"]:
        assert all(not Path(p).is_absolute() and (roots["ukb"] / p).is_file() for p in case["image"])


def test_ukb_subject_with_a_short_flair_is_left_out(roots, tmp_path: Path) -> None:
    root = Path(shutil.copytree(roots["ukb"], tmp_path / "ukb"))
    flair = root / "1000001_20253_2_0/T2_FLAIR/T2_FLAIR_brain_to_MNI.nii.gz"
    image = nib.load(flair)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj)[:, :, :30], image.affine), flair)
    result = index_dataset("ukb", root, min_slices=40, val_count=0)
    assert [c["id"] for c in result.datalist["training"]] == ["1000000", "1000002"]
    assert any("1000001" in note and "(30)" in note for note in result.notes)
    assert result.datalist["index"]["left_out"] == 1


# ---------------------------------------------------------------------------------------------- BraTS
def test_shipped_fold_table_matches_the_official_split() -> None:
    folds = load_folds()
    assert len(folds) == 1251
    assert sorted(Counter(folds.values()).values()) == [250, 250, 250, 250, 251]
    if SHARED_FOLDS.is_file():
        official = json.loads(SHARED_FOLDS.read_text())
        assert load_folds(SHARED_FOLDS) == folds
        assert compact_table(official)["folds"] == json.loads((Path(__file__).parents[1] / "bsf/data/brats21_folds.json").read_text())["folds"]


def test_brats_cases_get_official_folds_and_unlisted_ones_are_reported(roots) -> None:
    table = load_folds()
    result = index_dataset("brats", roots["brats"])
    cases = result.datalist["training"]
    assert "validation" not in result.datalist
    assert [c["id"] for c in cases] == [f"BraTS2021_{i:05d}" for i in range(4)]
    for case in cases:
        if case["id"] in table:
            assert case["fold"] == table[case["id"]]
    # the synthetic ids 0..3: BraTS2021_00001 is not in the official split (there is no such case)
    info = result.datalist["folds"]
    assert info["not_in_split"] == ["BraTS2021_00001"] and 0 <= cases[1]["fold"] < 5
    assert info["missing_from_disk"] == 1251 - 3
    assert any("not in the split" in n for n in result.notes) and any("not on disk" in n for n in result.notes)
    assert result.datalist["labels"] == [0, 1, 2, 4]


def test_brats_fold_k_is_validation(roots) -> None:
    full = index_dataset("brats", roots["brats"]).datalist["training"]
    fold = full[0]["fold"]
    datalist = index_dataset("brats", roots["brats"], fold=fold).datalist
    assert {c["id"] for c in datalist["validation"]} == {c["id"] for c in full if c["fold"] == fold}
    assert {c["id"] for c in datalist["training"]} == {c["id"] for c in full if c["fold"] != fold}
    with pytest.raises(DataError, match="folds 0..4"):
        index_dataset("brats", roots["brats"], fold=5)


def test_brats_custom_folds_file(roots, tmp_path: Path) -> None:
    entries = [
        {"fold": i % 2, "image": [f"TrainingData/BraTS2021_{i:05d}/BraTS2021_{i:05d}_flair.nii.gz"], "label": "x"} for i in range(4)
    ]
    folds_file = tmp_path / "folds.json"
    folds_file.write_text(json.dumps({"training": entries}))
    datalist = index_dataset("brats", roots["brats"], folds_file=folds_file, fold=1).datalist
    assert [c["id"] for c in datalist["validation"]] == ["BraTS2021_00001", "BraTS2021_00003"]
    assert datalist["folds"]["n_folds"] == 2 and not datalist["folds"]["not_in_split"]


def test_training_selects_a_fold_and_maps_modalities(roots, tmp_path: Path) -> None:
    out = tmp_path / "brats.json"
    assert main(["data", "index", "--dataset", "brats", "--root", str(roots["brats"]), "--out", str(out)]) == 0
    full = json.loads(out.read_text())["training"]
    fold = full[0]["fold"]
    cfg = _data_cfg("data.dataset=brats", f"data.datalist={out}", f"data.fold={fold}", "data.modalities=[t1, flair]")
    split = training_split(cfg, seed=0)
    assert {c["id"] for c in split.val} == {c["id"] for c in full if c["fold"] == fold}
    case = split.train[0]
    assert len(case["image"]) == 2 and case["image"][0].endswith("_t1.nii.gz") and case["image"][1].endswith("_flair.nii.gz")
    assert Path(case["image"][0]).is_absolute()  # resolved through the datalist's "root"
    with pytest.raises(DataError, match="t1w"):
        training_split(_data_cfg("data.dataset=brats", f"data.datalist={out}", "data.modalities=[t1w]", "model.in_channels=1"), seed=0)


# ---------------------------------------------------------------------------------------------- ATLAS
def test_atlas_held_out_set_is_seeded_and_disjoint(roots) -> None:
    a = index_dataset("atlas", roots["atlas"], val_count=2, seed=7).datalist
    b = index_dataset("atlas", roots["atlas"], val_count=2, seed=7).datalist
    c = index_dataset("atlas", roots["atlas"], val_count=2, seed=8).datalist
    assert a["validation"] == b["validation"] and len(a["validation"]) == 2 and len(a["training"]) == 3
    assert not {x["id"] for x in a["validation"]} & {x["id"] for x in a["training"]}
    ids = lambda d: sorted(x["id"] for x in d["validation"])  # noqa: E731
    assert ids(a) != ids(c) or ids(a) == ids(index_dataset("atlas", roots["atlas"], val_count=2, seed=9).datalist)
    assert a["labels"] == [0, 1]


def test_atlas_default_holds_out_100_or_half(roots) -> None:
    result = index_dataset("atlas", roots["atlas"])
    assert len(result.datalist["validation"]) == 2  # 5 subjects: at most half
    assert any("instead of 100" in n for n in result.notes)


def test_datalist_is_monai_readable_and_folder_mode_works_for_all(roots, tmp_path: Path) -> None:
    out = tmp_path / "atlas.json"
    assert main(["data", "index", "--dataset", "atlas", "--root", str(roots["atlas"]), "--out", str(out), "--val-count", "1"]) == 0
    training = load_decathlon_datalist(out, is_segmentation=True, data_list_key="training", base_dir=roots["atlas"])
    assert len(training) == 4 and Path(training[0]["image"]).is_file()
    assert read_datalist(out).base == roots["atlas"].resolve()
    for dataset in ("brats", "atlas"):
        split = training_split(_data_cfg(f"data.dataset={dataset}", f"data.root={roots[dataset]}", "data.check=header"), seed=0)
        assert len(split.train) + len(split.val) == (4 if dataset == "brats" else 5)


def test_index_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "index", "--dataset", "brats", "--root", str(tmp_path / "none"), "--out", str(tmp_path / "x.json")]) == 2
    assert "none: BraTS root folder does not exist" in capsys.readouterr().err
