"""A datalist means what it says: its relative paths resolve against its own root or folder before a preset's
default ``data.root``, and a datalist whose files are nowhere is one line naming every folder tried."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bsf.cli import main
from bsf.data.cases import list_cases
from bsf.data.index import read_datalist
from bsf.errors import DataError


def _case(name: str) -> dict:
    return {"id": name, "image": f"{name}/{name}_T1w.nii.gz", "label": f"{name}/{name}_mask.nii.gz"}


def _make_cases(folder: Path, *names: str) -> list[dict]:
    """Empty files of ATLAS-like cases ``names`` under ``folder``; their datalist entries (relative paths)."""
    cases = [_case(n) for n in names]
    for case in cases:
        for rel in (case["image"], case["label"]):
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).touch()
    return cases


def _write(path: Path, cases: list[dict], **top) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": "atlas", **top, "training": cases}))
    return path


def test_its_stated_root_wins_over_a_default_root_holding_other_cases(tmp_path):
    data, other = tmp_path / "data", tmp_path / "preset_default"
    cases = _make_cases(data, "sub-1", "sub-2")
    _make_cases(other, "sub-1", "sub-2")  # the same relative names exist under the default: still not chosen
    path = _write(tmp_path / "lists" / "atlas.json", cases, root=str(data))
    listed = list_cases("atlas", datalist=path, root=other)
    assert listed.base == data and listed.training[0]["image"] == str(data / "sub-1/sub-1_T1w.nii.gz")


def test_a_datalist_beside_its_files_wins_over_a_default_root(tmp_path):
    cases = _make_cases(tmp_path / "here", "sub-1")
    _make_cases(tmp_path / "default", "sub-1")
    path = _write(tmp_path / "here" / "atlas.json", cases)
    assert list_cases("atlas", datalist=path, root=tmp_path / "default").base == tmp_path / "here"


@pytest.mark.parametrize("stated", [None, "/nonexistent/atlas", "moved"])
def test_a_datalist_kept_apart_from_its_files_uses_data_root(tmp_path, stated):
    """The shipped split tables and the public code's datalists list paths relative to a data folder kept elsewhere;
    a stated root that is missing, or holds none of the files, is passed over the same way."""
    data = tmp_path / "data"
    cases = _make_cases(data, "sub-1", "sub-2")
    (tmp_path / "moved").mkdir()
    top = {"root": str(tmp_path / stated) if stated == "moved" else stated} if stated else {}
    path = _write(tmp_path / "lists" / "atlas.json", cases, **top)
    assert list_cases("atlas", datalist=path, root=data).base == data


def test_files_found_nowhere_are_one_line_naming_every_folder_tried(tmp_path):
    path = _write(tmp_path / "lists" / "atlas.json", [_case("sub-1")], root="/nonexistent/atlas")
    with pytest.raises(DataError) as err:
        list_cases("atlas", datalist=path, root=tmp_path / "preset_default")
    text = str(err.value)
    assert "\n" not in text and str(path) in text and "sub-1/sub-1_T1w.nii.gz" in text
    for named in ("/nonexistent/atlas (its 'root')", f"{path.parent} (its folder)", f"{tmp_path / 'preset_default'} (data.root)", "set data.root"):
        assert named in text


def test_an_explicit_root_is_the_only_folder_tried(tmp_path, capsys):
    cases = _make_cases(tmp_path / "data", "sub-1")
    path = _write(tmp_path / "data" / "atlas.json", cases)
    assert read_datalist(path, tmp_path / "data").base == tmp_path / "data"
    assert main(["data", "check", "--datalist", str(path), "--root", str(tmp_path / "absent"), "--headers-only", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{tmp_path / 'absent'} (--root)" in err and "(its folder)" not in err


def test_absolute_paths_need_no_folder(tmp_path):
    cases = _make_cases(tmp_path / "data", "sub-1")
    absolute = [{k: str(tmp_path / "data" / v) if k != "id" else v for k, v in c.items()} for c in cases]
    path = _write(tmp_path / "lists" / "atlas.json", absolute, root="/nonexistent")
    assert list_cases("atlas", datalist=path).training[0]["image"] == absolute[0]["image"]


@pytest.mark.parametrize(
    "entry, named",
    [
        ({"image": 7}, "'image' must be a path or a list of paths (strings), got 7"),
        ({"image": ["a.nii.gz", None]}, "got None"),
        ({"image": "a.nii.gz", "label": ["b.nii.gz"]}, "'label' must be a path (strings), got ['b.nii.gz']"),
        ({"image": []}, "has no 'image'"),
    ],
)
def test_a_path_that_is_not_a_string_names_its_entry(tmp_path, capsys, entry, named):
    path = _write(tmp_path / "atlas.json", [_case("sub-1"), entry])
    assert main(["data", "check", "--datalist", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"datalist {path}: training entry 1" in err and named in err


def test_the_test_presets_train_on_an_indexed_datalist_anywhere(tmp_path, monkeypatch):
    """docs/researcher.md's Stage 2/3 commands: a preset whose default data.root does not exist here, and a datalist
    written by `bsf data index` elsewhere, list that datalist's cases."""
    from bsf.config import load_config
    from bsf.data.pipeline import training_split
    from bsf.data.synth import synthesize

    synthesize("brats", 2, tmp_path / "brats", spacing=6.0, seed=0)
    assert main(["data", "index", "--dataset", "brats", "--root", str(tmp_path / "brats"), "--out", str(tmp_path / "brats.json")]) == 0
    monkeypatch.chdir(tmp_path)
    cfg = load_config("stage2_brats_test", [f"data.datalist={tmp_path / 'brats.json'}", "data.val_cases=1"])
    assert not Path(cfg.data.root).is_dir()  # the preset's default root, absent here
    split = training_split(cfg.data, seed=0)
    assert {Path(c["label"]).parent.parent for c in split.train + split.val} == {tmp_path / "brats"}
