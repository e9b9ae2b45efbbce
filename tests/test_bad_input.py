"""Bad-input battery: every broken input yields a message naming the file and the problem,
from `bsf data check` and from starting training (constructing the Engine runs the pre-training check)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest

from bsf.cli import main
from bsf.data.index import index_dataset
from bsf.data.synth import synthesize
from bsf.engine import Engine, load_config
from bsf.errors import DataError

CASE = "BraTS2021_00002"


def _file(root: Path, modality: str, case: str = CASE) -> Path:
    return root / case / f"{case}_{modality}.nii.gz"


def _rewrite(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    old = nib.load(path)
    nib.save(nib.Nifti1Image(data, old.affine if affine is None else affine), path)


def truncate(root: Path) -> tuple[str, str]:
    path = _file(root, "t1")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path.name, "truncated"


def not_nifti(root: Path) -> tuple[str, str]:
    _file(root, "flair").write_text("this is a radiology report, not an image\n" * 20)
    return _file(root, "flair").name, "not a readable NIfTI image"


def two_d(root: Path) -> tuple[str, str]:
    path = _file(root, "t2")
    _rewrite(path, np.asanyarray(nib.load(path).dataobj)[:, :, 10])
    return path.name, "2-D image"


def four_d(root: Path) -> tuple[str, str]:
    path = _file(root, "t1ce")
    data = np.asanyarray(nib.load(path).dataobj)
    _rewrite(path, np.stack([data, data], axis=-1))
    return path.name, "4-D image"


def other_shape(root: Path) -> tuple[str, str]:
    path = _file(root, "t1")
    _rewrite(path, np.ascontiguousarray(np.asanyarray(nib.load(path).dataobj)[:-4]))
    return path.name, "shape"


def nan_volume(root: Path) -> tuple[str, str]:
    path = _file(root, "t2")
    data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    data[10:14, 10:14, 10:14] = np.nan
    _rewrite(path, data)
    return path.name, "NaN"


def label_three(root: Path) -> tuple[str, str]:
    path = _file(root, "seg")
    data = np.asanyarray(nib.load(path).dataobj).copy()
    data[data == 4] = 3
    data[0, 0, 0] = 3
    _rewrite(path, data)
    return path.name, "label values [3] not allowed"


def missing(root: Path) -> tuple[str, str]:
    _file(root, "t1").unlink()
    return _file(root, "t1").name, "missing file"


def unreadable(root: Path) -> tuple[str, str]:
    """A folder where the file should be. (chmod 000 does not stop root, and tests run as root.)"""
    path = _file(root, "flair")
    path.unlink()
    path.mkdir()
    return path.name, "not a regular file"


def empty_brain(root: Path) -> tuple[str, str]:
    path = _file(root, "t1")
    _rewrite(path, np.zeros(nib.load(path).shape, np.float32))
    return path.name, "empty"


def moved_affine(root: Path) -> tuple[str, str]:
    path = _file(root, "t2")
    affine = nib.load(path).affine.copy()
    affine[0, 3] += 5.0
    _rewrite(path, np.asanyarray(nib.load(path).dataobj), affine)
    return path.name, "affine differs"


BREAKERS: dict[str, Callable[[Path], tuple[str, str]]] = {
    "truncated": truncate,
    "not_nifti": not_nifti,
    "two_d": two_d,
    "four_d": four_d,
    "other_shape": other_shape,
    "nan": nan_volume,
    "label_3_in_2021": label_three,
    "missing": missing,
    "unreadable": unreadable,
    "empty_brain": empty_brain,
    "moved_affine": moved_affine,
}


@pytest.fixture(scope="module")
def clean_brats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("brats_clean")
    synthesize("brats", 4, root, spacing=4.0, seed=3)
    return root


@pytest.fixture
def broken(clean_brats: Path, tmp_path: Path):
    """A private copy of the clean set, its datalist (indexed before breaking), and a breaker to apply."""

    def make(name: str) -> tuple[Path, Path, str, str]:
        root = Path(shutil.copytree(clean_brats, tmp_path / "brats"))
        datalist = tmp_path / "datalist.json"
        datalist.write_text(json.dumps(index_dataset("brats", root).datalist))
        filename, problem = BREAKERS[name](root)
        return root, datalist, filename, problem

    return make


def _engine_config(root: Path, datalist: Path, tmp_path: Path, *extra: str):
    return load_config(
        "stage1_test",
        [
            f"data.root={root}",
            "data.dataset=brats",
            f"data.datalist={datalist}",
            "model.in_channels=4",
            "data.val_cases=1",
            f"train.output_dir={tmp_path / 'run'}",
            "train.progress=false",
            *extra,
        ],
    )


@pytest.mark.parametrize("name", list(BREAKERS))
def test_data_check_names_file_and_problem(broken, name: str, capsys: pytest.CaptureFixture) -> None:
    root, datalist, filename, problem = broken(name)
    code = main(["data", "check", "--datalist", str(datalist), "--workers", "2", "--no-progress"])
    out = capsys.readouterr()
    assert code == 2
    lines = [line for line in out.out.splitlines() if filename in line]
    assert lines, out.out
    assert any(problem in line for line in lines), out.out
    assert "1 of 4 case(s)" in out.err and str(datalist) in out.err


@pytest.mark.parametrize("name", list(BREAKERS))
def test_training_refuses_to_start_naming_file_and_problem(broken, tmp_path: Path, name: str) -> None:
    root, datalist, filename, problem = broken(name)
    with pytest.raises(DataError) as info:
        Engine(_engine_config(root, datalist, tmp_path))
    message = str(info.value)
    assert filename in message and problem in message, message
    assert "skip_broken" in message


@pytest.mark.parametrize("name", ["truncated", "nan"])
def test_header_only_check_still_fails_at_start_naming_file(broken, tmp_path: Path, name: str) -> None:
    """With data.check=header the voxel problems of training cases surface while caching them, still before step 1
    (validation volumes are read at the first validation: that is why "full" is the default)."""
    root, datalist, filename, problem = broken(name)
    with pytest.raises(DataError) as info:
        Engine(_engine_config(root, datalist, tmp_path, "data.check=header", "data.cache=memory", "data.val_cases=0"))
    assert filename in str(info.value)
    assert ("NaN" if name == "nan" else "truncated") in str(info.value)


def test_skip_broken_leaves_the_case_out_and_logs_it(broken, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, datalist, filename, problem = broken("label_3_in_2021")
    with caplog.at_level(logging.WARNING, logger="bsf.data.pipeline"):
        engine = Engine(_engine_config(root, datalist, tmp_path, "data.skip_broken=true", "data.cache=none"))
    ids = [c["id"] for c in engine.split.train + engine.split.val]
    assert CASE not in ids and len(ids) == 3
    assert filename in caplog.text and problem in caplog.text
    assert engine.stream[0][0]["image"].shape == (4, 64, 64, 64)


def test_empty_datalist(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    datalist = tmp_path / "empty.json"
    datalist.write_text(json.dumps({"training": []}))
    assert main(["data", "check", "--datalist", str(datalist)]) == 2
    err = capsys.readouterr().err
    assert str(datalist) in err and "empty datalist" in err
    with pytest.raises(DataError, match="empty.json.*empty datalist"):
        Engine(_engine_config(tmp_path, datalist, tmp_path))


def test_missing_datalist_and_invalid_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "check", "--datalist", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not valid JSON"):
        Engine(_engine_config(tmp_path, bad, tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 000 does not block reads (the folder case covers 'unreadable')")
def test_permission_denied(broken, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, datalist, _, _ = broken("missing")
    path = _file(root, "t2")
    path.chmod(0)
    try:
        assert main(["data", "check", "--datalist", str(datalist), "--no-progress"]) == 2
        assert "permission denied" in capsys.readouterr().out
    finally:
        path.chmod(0o644)
