"""Hardening (issue 13), class 5: no file is lost or overwritten by surprise; class 7 (readers): a header is checked
before memory is committed. A random test-size ATLAS model (one channel) and synthetic cases at 3 mm keep it fast."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bsf.cli import main
from bsf.config import load_config
from bsf.data.pipeline import CheckedLoadd
from bsf.engine import build_model
from bsf.errors import OutputError
from bsf.evaluate import prediction_paths
from bsf.outputs import safe_file_name
from tests.cli_errors import one_line_error

HOSTILE_IDS = ["../escape", "/abs/evil", "a/b", "..", ".", "nul\x00byte", "sp ace;rm -rf", "ünï", "-rf", "x" * 300]


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    """Two synthetic ATLAS subjects and a random Stage-3 ATLAS model (``checkpoint_last.pt`` with its config)."""
    from bsf.data.synth import synthesize

    base = tmp_path_factory.mktemp("hardening_files")
    subjects = synthesize("atlas", 2, base / "atlas", spacing=3.0, seed=1)
    config = load_config("stage3_brats_test", ["data.dataset=atlas", "model.in_channels=1", "model.out_channels=1", f"data.root={base / 'atlas'}"])
    model = base / "run" / "checkpoint_last.pt"
    model.parent.mkdir()
    torch.save({"model": build_model(config).state_dict(), "config": config.to_dict()}, model)
    cases = [{"t1w": next(s.rglob("*_T1w.nii.gz")), "label": next(s.rglob("*_mask.nii.gz"))} for s in subjects]
    return {"base": base, "model": model, "cases": cases}


def _predict(atlas, inputs, output, *extra) -> int:
    return main(["predict", "--model", str(atlas["model"]), "--device", "cpu", "--no-progress",
                 "--input", *map(str, inputs), "--output", str(output), *extra])




def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst


# ------------------------------------------------------------------------------ class 5: predict
@pytest.mark.parametrize("spelling", ["same path", "relative path", "symbolic link", "hard link"])
def test_predict_refuses_to_write_over_its_input(atlas, tmp_path, monkeypatch, capsys, spelling):
    image = _copy(atlas["cases"][0]["t1w"], tmp_path / "case" / "sub_T1w.nii.gz")
    before = image.read_bytes()
    if spelling == "relative path":
        monkeypatch.chdir(tmp_path / "case")
        output = Path("..") / "case" / image.name
    elif spelling == "symbolic link":
        output = tmp_path / "link.nii.gz"
        output.symlink_to(image)
    elif spelling == "hard link":
        output = tmp_path / "hard.nii.gz"
        os.link(image, output)
    else:
        output = image
    assert _predict(atlas, [image], output, "--force") == 2  # even --force never replaces an input
    assert "is the input" in one_line_error(capsys, output)
    assert image.read_bytes() == before


def test_predict_replaces_an_existing_output_only_with_force(atlas, tmp_path, capsys):
    output = tmp_path / "seg.nii.gz"
    output.write_bytes(b"an earlier result")
    assert _predict(atlas, [atlas["cases"][0]["t1w"]], output) == 2
    assert "--force" in one_line_error(capsys, output)
    assert output.read_bytes() == b"an earlier result"
    assert _predict(atlas, [atlas["cases"][0]["t1w"]], output, "--force") == 0
    assert nib.load(output).shape == nib.load(atlas["cases"][0]["t1w"]).shape
    assert not list(tmp_path.glob(".*.tmp"))  # the write was atomic: no temporary file left


@pytest.mark.parametrize("case", ["output is a folder", "its parent is a file", "its grandparent is a file"])
def test_predict_output_that_cannot_be_a_file_is_named_before_any_work(atlas, tmp_path, capsys, monkeypatch, case):
    (tmp_path / "plain_file").write_text("x")
    output = {
        "output is a folder": tmp_path / "folder.nii.gz",
        "its parent is a file": tmp_path / "plain_file" / "seg.nii.gz",
        "its grandparent is a file": tmp_path / "plain_file" / "sub" / "seg.nii.gz",
    }[case]
    if case == "output is a folder":
        output.mkdir()
    monkeypatch.setattr(CheckedLoadd, "__call__", _must_not_load)
    assert _predict(atlas, [atlas["cases"][0]["t1w"]], output, "--force") == 2
    one_line_error(capsys, output)
    assert (tmp_path / "plain_file").read_text() == "x"


def _must_not_load(self, data):
    raise AssertionError(f"voxels were loaded: {data}")


# --------------------------------------------------------------------- class 5: evaluate names
@pytest.mark.parametrize("name", HOSTILE_IDS)
def test_safe_file_name_stays_inside_its_folder(tmp_path, name):
    safe = safe_file_name(name)
    assert "/" not in safe and "\\" not in safe and "\x00" not in safe and not safe.startswith((".", "-"))
    assert 0 < len(safe) <= 120
    path = tmp_path / f"{safe}.nii.gz"
    assert path.resolve().parent == tmp_path.resolve()
    assert safe != safe_file_name(name + "_")  # distinct ids stay distinct


def test_safe_file_name_keeps_ordinary_ids_and_separates_look_alikes():
    assert safe_file_name("BraTS2021_00000") == "BraTS2021_00000"
    assert safe_file_name("sub-r001s001") == "sub-r001s001"
    assert len({safe_file_name(n) for n in ["a/b", "a_b", "a b", "a\\b"]}) == 4


def test_evaluate_writes_hostile_case_ids_inside_out_and_never_over_images(atlas, tmp_path, capsys):
    data = tmp_path / "data"
    cases = []
    for i, name in enumerate(["../escape", "/abs/evil", "a/b"]):
        source = atlas["cases"][i % 2]
        cases.append({"id": name, "image": [str(_copy(source["t1w"], data / f"c{i}" / "t1w.nii.gz"))],
                      "label": str(_copy(source["label"], data / f"c{i}" / "mask.nii.gz"))})
    before = {p: p.read_bytes() for p in data.rglob("*.nii.gz")}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"dataset": "atlas", "training": cases[:1], "validation": cases}))
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(atlas["model"]), "--device", "cpu", "--no-progress", "--datalist", str(datalist),
                 "--out", str(out), "--save-predictions"]) == 0
    written = sorted(p.name for p in (out / "predictions").iterdir())
    assert written == sorted(f"{safe_file_name(c['id'])}.nii.gz" for c in cases)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.nii.gz") if "predictions" not in p.parts) == \
        sorted(p.relative_to(tmp_path).as_posix() for p in before)  # nothing new outside --out/predictions
    assert all(p.read_bytes() == content for p, content in before.items())
    assert not Path("/abs/evil.nii.gz").exists()


def test_evaluate_refuses_a_prediction_that_would_replace_a_case_image(atlas, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    image = _copy(atlas["cases"][0]["t1w"], out / "predictions" / "case1.nii.gz")  # the data lives where predictions go
    label = _copy(atlas["cases"][0]["label"], tmp_path / "mask.nii.gz")
    datalist = tmp_path / "datalist.json"
    case = {"id": "case1", "image": [str(image)], "label": str(label)}
    datalist.write_text(json.dumps({"dataset": "atlas", "training": [case], "validation": [case]}))
    before = image.read_bytes()
    monkeypatch.setattr(CheckedLoadd, "__call__", _must_not_load)
    assert main(["evaluate", "--model", str(atlas["model"]), "--device", "cpu", "--no-progress", "--datalist", str(datalist),
                 "--out", str(out), "--save-predictions"]) == 2
    assert "is the data file" in one_line_error(capsys, image)
    assert image.read_bytes() == before


def test_prediction_paths_refuse_a_planted_symlink_and_shared_names(tmp_path):
    folder = tmp_path / "predictions"
    folder.mkdir()
    (folder / "case1.nii.gz").symlink_to(tmp_path / "elsewhere.nii.gz")
    with pytest.raises(OutputError, match="outside the output folder"):
        prediction_paths([{"id": "case1", "image": ["x.nii.gz"]}], folder)
    with pytest.raises(OutputError, match="would both write"):
        prediction_paths([{"id": "same", "image": ["x.nii.gz"]}, {"id": "same", "image": ["y.nii.gz"]}], folder)


# ------------------------------------------------------------------------- class 5: export, bundle
@pytest.fixture()
def encoder_model(tmp_path):
    model = tmp_path / "models" / "FL_global_model.pt"
    model.parent.mkdir()
    torch.save({"model": {"swinViT.patch_embed.proj.weight": torch.ones(2, 1, 2, 2, 2), "out.conv.conv.bias": torch.zeros(1)}}, model)
    return model


@pytest.mark.parametrize("spelling", ["same path", "relative path", "symbolic link"])
def test_export_refuses_to_write_over_its_model(encoder_model, tmp_path, monkeypatch, capsys, spelling):
    before = encoder_model.read_bytes()
    out: Path = encoder_model
    if spelling == "relative path":
        monkeypatch.chdir(tmp_path)
        out = Path("models") / ".." / "models" / encoder_model.name
    elif spelling == "symbolic link":
        out = tmp_path / "encoder.pt"
        out.symlink_to(encoder_model)
    assert main(["export", "--model", str(encoder_model), "--out", str(out), "--force"]) == 2
    assert "is the input" in one_line_error(capsys, out)
    assert encoder_model.read_bytes() == before


def test_export_replaces_an_existing_file_only_with_force_and_names_a_folder(encoder_model, tmp_path, capsys):
    out = tmp_path / "encoder.pt"
    out.write_bytes(b"older encoder")
    assert main(["export", "--model", str(encoder_model), "--out", str(out)]) == 2
    assert "--force" in one_line_error(capsys, out)
    assert out.read_bytes() == b"older encoder"
    assert main(["export", "--model", str(encoder_model), "--out", str(out), "--force"]) == 0
    assert set(torch.load(out, weights_only=True)["state_dict"]) == {"swinViT.patch_embed.proj.weight"}
    assert main(["export", "--model", str(encoder_model), "--out", str(tmp_path)]) == 2
    assert "is a folder" in one_line_error(capsys, tmp_path)


def test_bundle_export_into_a_non_empty_folder_needs_force(atlas, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "notes.txt").write_text("mine")
    args = ["bundle", "export", "--model", str(atlas["model"]), "--device", "cpu", "--out", str(bundle)]
    assert main(args) == 2
    assert "not empty" in one_line_error(capsys, bundle, "notes.txt", "--force")
    assert sorted(p.name for p in bundle.iterdir()) == ["notes.txt"]
    assert main([*args, "--force"]) == 0
    assert (bundle / "notes.txt").read_text() == "mine"
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "configs" / "inference.json").is_file()
    (tmp_path / "a_file").write_text("x")
    assert main([*args[:-1], str(tmp_path / "a_file")]) == 2
    one_line_error(capsys, tmp_path / "a_file")


# ------------------------------------------------------------------------------ class 7: headers
def _nifti_claiming(path: Path, shape: tuple[int, ...], dtype=np.int16, payload: int = 4096) -> Path:
    """A .nii.gz whose header claims ``shape`` voxels of ``dtype`` but which holds only ``payload`` bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.diag([3.0, 3.0, 3.0, 1.0]), code=1)
    header.set_sform(np.diag([3.0, 3.0, 3.0, 1.0]), code=1)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\1" * payload))
    return path


def _full_nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0])), path)
    return path


@pytest.mark.parametrize("case, expected", [
    ("claims 8 GiB", "truncated"),
    ("claims 2 voxels per side", "2-D"),
    ("4-D with 3 volumes", "4-D image"),
    ("complex voxels", "complex"),
    ("more voxels than --max-voxels", "more than the limit of 1,000"),
])
def test_predict_checks_the_header_before_reading_voxels(atlas, tmp_path, capsys, monkeypatch, case, expected):
    image = tmp_path / "sub_T1w.nii.gz"
    extra = []
    if case == "claims 8 GiB":
        _nifti_claiming(image, (2048, 2048, 1024))
    elif case == "claims 2 voxels per side":
        _nifti_claiming(image, (64, 64), payload=64 * 64 * 2)
    elif case == "4-D with 3 volumes":
        _full_nifti(image, np.ones((8, 8, 8, 3), np.int16))
    elif case == "complex voxels":
        _full_nifti(image, np.ones((8, 8, 8), np.complex64))
    else:
        _copy(atlas["cases"][0]["t1w"], image)
        extra = ["--max-voxels", "1000"]
    monkeypatch.setattr(CheckedLoadd, "__call__", _must_not_load)
    assert _predict(atlas, [image], tmp_path / "seg.nii.gz", *extra) == 2
    assert expected in one_line_error(capsys, image)
    assert not (tmp_path / "seg.nii.gz").exists()


def test_evaluate_checks_the_label_header_before_reading_it(atlas, tmp_path, capsys, monkeypatch):
    label = _nifti_claiming(tmp_path / "mask.nii.gz", (2048, 2048, 1024), dtype=np.uint8)
    case = {"id": "c0", "image": [str(atlas["cases"][0]["t1w"])], "label": str(label)}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"dataset": "atlas", "training": [case], "validation": [case]}))
    monkeypatch.setattr(CheckedLoadd, "__call__", _must_not_load)
    assert main(["evaluate", "--model", str(atlas["model"]), "--device", "cpu", "--no-progress", "--datalist", str(datalist),
                 "--out", str(tmp_path / "eval")]) == 2
    err = one_line_error(capsys, label, "case c0")
    assert "label file" in err and "truncated" in err


def test_max_voxels_must_be_a_positive_integer(atlas, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _predict(atlas, [atlas["cases"][0]["t1w"]], tmp_path / "seg.nii.gz", "--max-voxels", "0")
    assert "not positive" in capsys.readouterr().err
