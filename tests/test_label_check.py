"""One label check for ``bsf data check``, training and ``bsf evaluate``: each case is judged on its own, the error
blames the file that holds the value and names the setting that would accept it."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch

from bsf.cli import main
from bsf.config import load_config
from bsf.data.labels import label_problems, label_rule
from bsf.data.pipeline import training_split
from bsf.engine import build_model
from bsf.engine.segmentation import LabelsToRegionsd
from bsf.errors import DataError


def _relabel(seg_path, old: int, new: int) -> None:
    img = nib.load(seg_path)
    data = np.asarray(img.dataobj).astype(np.uint8)
    data[data == old] = new
    nib.save(nib.Nifti1Image(data, img.affine, img.header), seg_path)


@pytest.fixture(scope="module")
def brats_with_a_3(tmp_path_factory):
    """Three BraTS 2021-named cases; the second marks its enhancing tumour 3 (the 2023 convention)."""
    from bsf.data.synth import synthesize

    base = tmp_path_factory.mktemp("labels")
    synthesize("brats", 3, base / "brats", spacing=6.0, seed=0)
    seg = base / "brats" / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz"
    _relabel(seg, 4, 3)
    assert main(["data", "index", "--dataset", "brats", "--root", str(base / "brats"), "--out", str(base / "brats.json")]) == 0
    return base, seg


def test_data_check_blames_the_file_and_names_the_setting(brats_with_a_3, capsys):
    base, seg = brats_with_a_3
    assert main(["data", "check", "--datalist", str(base / "brats.json"), "--no-progress"]) == 2
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "not allowed" in line]
    assert len(rows) == 1 and "BraTS2021_00001_seg.nii.gz" in rows[0]
    assert "finetune.label_format=brats2023" in rows[0] and "--labels 0,1,2,3" in rows[0]
    assert main(["data", "check", "--datalist", str(base / "brats.json"), "--no-progress", "--labels", "0,1,2,3,4"]) == 0


@pytest.mark.parametrize("check", ["full", "header"])
def test_training_blames_the_file_holding_the_value(brats_with_a_3, check):
    """The pre-training check (``full``) and, without it, the label transform reach the same verdict."""
    base, seg = brats_with_a_3
    config = load_config("stage3_brats_test", [f"data.datalist={base / 'brats.json'}", f"data.check={check}"])
    split = None
    with pytest.raises(DataError) as err:
        split = training_split(config.data, seed=0)
        transform = LabelsToRegionsd("brats", config.finetune.label_format)
        for path in sorted(c["label"] for c in split.train + split.val):
            transform({"label": _meta_label(path)})
    text = str(err.value)
    assert "BraTS2021_00001_seg" in text and "BraTS2021_00000" not in text and "BraTS2021_00002" not in text
    assert "finetune.label_format=brats2023" in text and "et_label" not in text


def _meta_label(path: str):
    from monai.transforms import LoadImage

    return LoadImage(image_only=True)(path)[None]


def test_the_setting_accepts_the_case_and_each_map_keeps_its_own_convention(brats_with_a_3):
    base, _ = brats_with_a_3
    config = load_config("stage3_brats_test", [f"data.datalist={base / 'brats.json'}", "finetune.label_format=brats2023", "data.check=full"])
    with pytest.raises(DataError, match="BraTS2021_0000[02]_seg.*not allowed for finetune.label_format=brats2023"):
        training_split(config.data, 0, config.finetune.label_format)  # now the cases marking 4 are the odd ones
    either = LabelsToRegionsd("brats")  # files of no known naming: each map by its own values, in any order
    three, four = np.array([[[[0, 1, 2, 3]]]]), np.array([[[[0, 1, 2, 4]]]])
    for _ in range(2):
        assert either({"label": three})["label"][2].sum() == 1 and either({"label": four})["label"][2].sum() == 1


@pytest.mark.parametrize(
    "dataset, case, values, fragment",
    [
        ("brats", "BraTS2021_00000", [0, 1, 2, 3], "set finetune.label_format=brats2023"),
        ("brats", "BraTS-GLI-00000-000", [0, 4], "set finetune.label_format=brats2021"),
        ("brats", "case7", [0, 3, 4], "both 3 and 4"),
        ("atlas", "sub-r001s001", [0, 2], "ATLAS lesion mask (0/1)"),
        ("brats", "BraTS2021_00000", [0, 7], "label values [7] not allowed"),
    ],
)
def test_the_rule_names_each_problem(dataset, case, values, fragment):
    problems = label_problems(values, label_rule(dataset, case))
    assert any(fragment in p for p in problems), problems
    assert label_problems([0, 1], label_rule(dataset, case)) == []


def test_evaluate_refuses_the_case_it_used_to_score_silently(brats_with_a_3, tmp_path, caplog):
    from bsf.evaluate import evaluate
    from bsf.predict import load_finetuned

    base, seg = brats_with_a_3
    config = load_config("stage3_brats_test", [f"data.datalist={base / 'brats.json'}"])
    checkpoint = tmp_path / "checkpoint_last.pt"
    torch.save({"model": build_model(config).state_dict(), "config": config.to_dict()}, checkpoint)
    listed = json.loads((base / "brats.json").read_text())
    only = {**listed, "training": [c for c in listed["training"] if c["id"] == "BraTS2021_00001"]}
    (base / "one.json").write_text(json.dumps(only))
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as err:
        evaluate(load_finetuned(checkpoint), base / "one.json", split="training", root=str(base / "brats"), out_dir=tmp_path / "eval", progress=False)
    assert str(seg) in str(err.value) and "finetune.label_format=brats2023" in str(err.value)
