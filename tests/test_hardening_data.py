"""Hardening (issue 13), data side: a crash leaves nothing that breaks the next run (class 6); a datalist that lists a
case twice, or in both training and validation, is refused naming the cases; user errors about paths and values are
one line and exit code 2, bugs keep their traceback (class 7). Also the one case lister (issue 12)."""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import time
from pathlib import Path

import pytest
import torch
from monai.transforms import Compose, Transform

from bsf import io as bsf_io
from bsf.cli import main
from bsf.console import run_guarded
from bsf.data.cases import list_cases
from bsf.data.index import read_datalist
from bsf.data.pipeline import persistent_dataset
from bsf.errors import DataError
from bsf.io import STALE_TEMP_SECONDS, atomic_path, atomic_write_json, atomic_write_text
from tests.cli_errors import one_line_error

HOUR = 3600.0


# ------------------------------------------------------------------ class 6: persistent cache entries
class _Volume(Transform):
    """A deterministic 'preprocessing': the case's ``n`` as a (1, 4, 4, 4) float32 volume."""

    def __call__(self, data):
        return {**data, "image": torch.full((1, 4, 4, 4), float(data["n"]))}


def _cached(cache: Path):
    """A persistent dataset of two cases (whose files need not exist: only their stamps enter the entry name)."""
    cases = [{"id": f"c{n}", "n": n, "image": f"/nowhere/c{n}.nii.gz"} for n in (1, 2)]
    return persistent_dataset(cases, Compose([_Volume()]), str(cache), key="test")


def _only_entry(cache: Path) -> Path:
    (entry,) = cache.glob("*.pt")
    return entry


class _Planted:
    """Unpickling this object writes a file: proof that code from the cache ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _truncate(entry: Path, _: Path) -> None:
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])


def _garbage(entry: Path, _: Path) -> None:
    entry.write_bytes(b"not a torch file at all")


def _empty(entry: Path, _: Path) -> None:
    entry.write_bytes(b"")


def _code(entry: Path, marker: Path) -> None:
    torch.save({"image": torch.zeros(1), "payload": _Planted(marker)}, entry)


@pytest.mark.parametrize("damage", [_truncate, _garbage, _empty, _code], ids=["truncated", "garbage", "empty", "planted-code"])
def test_an_entry_that_fails_to_load_is_removed_with_a_warning_and_recomputed(tmp_path, caplog, damage):
    cache, marker = tmp_path / "cache", tmp_path / "code_ran"
    assert float(_cached(cache)[0]["image"].mean()) == 1.0
    entry = _only_entry(cache)
    damage(entry, marker)
    with caplog.at_level(logging.WARNING, logger="bsf.data.pipeline"):
        again = _cached(cache)[0]
    assert torch.equal(again["image"], torch.full((1, 4, 4, 4), 1.0))
    assert any(str(entry) in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)
    assert not marker.exists(), "the cache entry's pickled code ran"
    assert torch.equal(torch.load(entry, weights_only=True)["image"], again["image"])  # rewritten, tensors only


def test_cache_entries_hold_only_what_loads_with_weights_only(tmp_path):
    cache = tmp_path / "cache"
    dataset = _cached(cache)
    _ = dataset[0], dataset[1]
    entries = sorted(cache.glob("*.pt"))
    assert len(entries) == 2
    loaded = [torch.load(e, weights_only=True) for e in entries]
    assert sorted(float(x["image"].mean()) for x in loaded) == [1.0, 2.0]
    assert not list(cache.glob(".*.tmp"))


def test_a_cache_entry_is_written_beside_its_target_and_renamed(tmp_path, monkeypatch):
    """MONAI's own path writes into the system temp folder and moves (copies, across disks) the file: not atomic."""
    cache = tmp_path / "cache"
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(bsf_io.os, "replace", lambda a, b: (renames.append((Path(a), Path(b))), real_replace(a, b)))
    _cached(cache)[0]
    ((source, target),) = renames
    assert target == _only_entry(cache) and source.parent == cache and source.name.startswith(f".{target.name}.")


# ------------------------------------------------------------------ class 6: temporary files of interrupted writes
def _leftover(folder: Path, target: str, age: float, tag: str = "k3j9x2") -> Path:
    """A temporary file as an atomic write of ``target`` killed ``age`` seconds ago leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{target}.{tag}.tmp"
    tmp.write_bytes(b"half a checkpoint")
    stamp = time.time() - age
    os.utime(tmp, (stamp, stamp))
    return tmp


def test_an_atomic_write_sweeps_stale_temp_files_of_its_target_and_leaves_fresh_ones(tmp_path, caplog):
    stale = _leftover(tmp_path, "summary.json", age=2 * HOUR)
    fresh = _leftover(tmp_path, "summary.json", age=60, tag="p81qz0")  # another process is writing right now
    other_target = _leftover(tmp_path, "metrics.json", age=2 * HOUR)
    with caplog.at_level(logging.WARNING, logger="bsf.io"):
        atomic_write_json({"ok": 1}, tmp_path / "summary.json")
    assert json.loads((tmp_path / "summary.json").read_text()) == {"ok": 1}
    assert not stale.exists() and fresh.exists() and other_target.exists()
    assert any(str(stale) in r.getMessage() for r in caplog.records)
    assert STALE_TEMP_SECONDS <= 2 * HOUR


def test_the_persistent_cache_sweeps_its_folder_at_start(tmp_path):
    cache = tmp_path / "cache"
    stale = _leftover(cache, "0a1b2c.pt", age=2 * HOUR)
    fresh = _leftover(cache, "3d4e5f.pt", age=10)
    _cached(cache)
    assert not stale.exists() and fresh.exists()


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "notes.txt"
    atomic_write_text("old\n", target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("write", [lambda p: atomic_write_text("x", p), lambda p: atomic_write_json([1], p), lambda p: bsf_io.atomic_torch_save({"w": torch.ones(1)}, p)],
                         ids=["text", "json", "torch"])
def test_every_atomic_write_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch, write):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(bsf_io.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(bsf_io.os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    write(tmp_path / "out")
    replaced = next(path for kind, path in events if kind == "replace")
    assert events.index(("fsync", replaced)) < events.index(("replace", replaced))
    assert ("fsync", str(tmp_path)) in events[events.index(("replace", replaced)):]  # the rename itself is made durable


def test_writing_onto_a_folder_is_refused_before_anything_is_written(tmp_path):
    folder = tmp_path / "out.json"
    folder.mkdir()
    with pytest.raises(IsADirectoryError) as caught:
        atomic_write_json({}, folder)
    assert caught.value.filename == str(folder)
    assert list(tmp_path.iterdir()) == [folder] and not list(folder.iterdir())


# ------------------------------------------------------------------ class 7: datalists with duplicate or shared cases
def _datalist(tmp_path: Path, training: list[dict], validation: list[dict] | None = None) -> Path:
    """A datalist of ``training`` and ``validation`` cases beside their (empty) files."""
    path = tmp_path / "datalist.json"
    content = {"dataset": "atlas", "training": training}
    if validation is not None:
        content["validation"] = validation
    path.write_text(json.dumps(content))
    _touch_files(tmp_path, training + (validation or []))
    return path


def _touch_files(base: Path, cases: list[dict]) -> None:
    """Create each image and label file ``cases`` name under ``base`` (empty: listing only looks for them)."""
    for case in cases:
        images = case["image"] if isinstance(case["image"], list) else [case["image"]]
        for name in images + ([case["label"]] if case.get("label") else []):
            (base / name).parent.mkdir(parents=True, exist_ok=True)
            (base / name).touch()


def _case(name: str, image: str | None = None) -> dict:
    return {"id": name, "image": image or f"{name}/{name}_T1w.nii.gz", "label": f"{name}/{name}_mask.nii.gz"}


@pytest.mark.parametrize(
    "training, validation, named",
    [
        ([_case("sub-1"), _case("sub-2"), _case("sub-1")], None, ["sub-1", "entries 0 and 2"]),
        ([_case("sub-1"), _case("sub-2", "sub-1/sub-1_T1w.nii.gz")], None, ["sub-1 and sub-2", "sub-1_T1w.nii.gz"]),
        ([_case("sub-1")], [_case("sub-2"), _case("sub-2")], ["validation", "sub-2"]),
        ([_case("sub-1"), _case("sub-2")], [_case("sub-2")], ["both 'training' and 'validation'", "sub-2"]),
        ([_case("sub-1"), _case("sub-2")], [_case("sub-3", "./sub-1/sub-1_T1w.nii.gz")], ["both 'training' and 'validation'", "sub-3"]),
        ([{"image": "a/t1.nii.gz"}, {"image": "b/t1.nii.gz"}], [{"image": "a/t1.nii.gz"}], ["both", ": a"]),
    ],
    ids=["same-id", "same-image", "twice-in-validation", "id-in-both", "image-in-both", "no-ids-image-in-both"],
)
def test_data_check_refuses_a_case_listed_twice_naming_it(tmp_path, capsys, training, validation, named):
    path = _datalist(tmp_path, training, validation)
    assert main(["data", "check", "--datalist", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: datalist {path}: ") and "Traceback" not in err
    for text in named:
        assert text in err


def test_training_refuses_a_shared_case_and_evaluation_only_warns(tmp_path, caplog):
    path = _datalist(tmp_path, [_case("sub-1"), _case("sub-2")], [_case("sub-2")])
    with pytest.raises(DataError, match="sub-2"):
        list_cases("atlas", datalist=path)
    with caplog.at_level(logging.WARNING, logger="bsf.data.index"):
        listed = list_cases("atlas", datalist=path, allow_shared=True)
    assert [c["id"] for c in listed.validation] == ["sub-2"]
    assert any("sub-2" in r.getMessage() and "both" in r.getMessage() for r in caplog.records)


def test_distinct_cases_in_one_folder_are_not_duplicates(tmp_path):
    """Entries without ids whose images share a folder are told apart by their files, not by the folder's name."""
    path = _datalist(tmp_path, [{"image": f"all/img{i}.nii.gz"} for i in range(3)], [{"image": "all/img3.nii.gz"}])
    assert len(read_datalist(path).all_cases) == 4


# ------------------------------------------------------------------ class 7: user errors are one line, exit code 2


def test_output_paths_that_are_folders_are_one_line_errors(tmp_path, capsys):
    root = tmp_path / "atlas"
    for name in ("sub-r001s001", "sub-r001s002"):
        folder = root / "R001" / name / "ses-1" / "anat"
        folder.mkdir(parents=True)
        (folder / f"{name}_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz").write_bytes(b"")
        (folder / f"{name}_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz").write_bytes(b"")
    folder = tmp_path / "taken"
    folder.mkdir()
    assert main(["data", "index", "--dataset", "atlas", "--root", str(root), "--out", str(folder)]) == 2
    one_line_error(capsys, str(folder), "folder")
    datalist = _datalist(tmp_path, [_case("sub-1")])
    assert main(["data", "check", "--datalist", str(datalist), "--headers-only", "--no-progress", "--json", str(folder)]) == 2
    one_line_error(capsys, str(folder))


@pytest.mark.parametrize("override, named", [
    ("train.steps=abc", "train.steps"),
    ("data.roi=[1,2", "data.roi"),
    ("foo", "foo"),
    ("data.val_cases=[", "data.val_cases"),
])
def test_malformed_override_values_are_one_line_errors(capsys, override, named):
    assert main(["config", "--config", "stage1_test", override]) == 2
    one_line_error(capsys, named)


@pytest.mark.parametrize("content", [b"model: [1,\n", b"\x89PNG\r\n\x1a\n\x00\xff binary", b"- a list\n- not a mapping\n"], ids=["broken", "binary", "list"])
def test_unreadable_yaml_is_aone_line_error(tmp_path, capsys, content):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    assert main(["config", "--config", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: config {path}: ")


def test_permission_denied_names_the_file(tmp_path, capsys, monkeypatch):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\n")
    real = pathlib.Path.read_text

    def denied(self, *args, **kwargs):
        if self == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", denied)
    assert main(["config", "--config", str(path)]) == 2
    assert one_line_error(capsys, str(path)).strip() == f"error: {path}: permission denied"


def test_train_output_file_that_is_a_folder_is_aone_line_error(ukb_root, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "summary.json").mkdir(parents=True)
    code = main(["train", "--config", "stage1_test", f"data.root={ukb_root}", f"train.output_dir={out}", "train.progress=false", "train.steps=1"])
    assert code == 2
    one_line_error(capsys, str(out / "summary.json"), "is a folder")


@pytest.mark.parametrize("bug", [ValueError("a bug"), FileNotFoundError("no path named"), KeyError("k")], ids=["value", "os-no-path", "key"])
def test_bugs_keep_their_traceback(bug):
    def action():
        raise bug

    with pytest.raises(type(bug)):
        run_guarded(action)


# ------------------------------------------------------------------ issue 12: one case lister
def test_list_cases_reads_a_datalist_selects_modalities_and_splits_a_fold(tmp_path):
    cases = [{"id": f"BraTS2021_0000{i}", "image": [f"{i}/flair", f"{i}/t1ce", f"{i}/t1", f"{i}/t2"], "label": f"{i}/seg", "fold": i % 2}
             for i in range(4)]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"dataset": "brats", "training": cases}))
    _touch_files(tmp_path, cases)
    listed = list_cases("brats", datalist=path, modalities=["t2", "flair"], fold=1)
    assert [c["id"] for c in listed.training] == ["BraTS2021_00000", "BraTS2021_00002"]
    assert [c["id"] for c in listed.validation] == ["BraTS2021_00001", "BraTS2021_00003"]
    assert listed.training[0]["image"] == [str(tmp_path / "0/t2"), str(tmp_path / "0/flair")]
    assert listed.training[0]["label"] == str(tmp_path / "0/seg") and listed.modalities == ["t2", "flair"]
    assert listed.header == {"dataset": "brats", "modalities": ["t2", "flair"]}
    with pytest.raises(DataError, match=f"datalist {path}: holds brats cases"):
        list_cases("atlas", datalist=path)
    with pytest.raises(DataError, match="no such data folder"):
        list_cases("brats", root=tmp_path / "absent")
