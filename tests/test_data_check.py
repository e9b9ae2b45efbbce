"""`bsf data check` and `bsf site check` on clean synthetic sets; clean datalists; label sets; the check memo;
the persistent cache; the shipped site YAMLs."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from bsf.cli import main
from bsf.config import load_config
from bsf.data import check as check_module
from bsf.data.check import check_cases
from bsf.data.labels import label_rule
from bsf.data.index import index_dataset, read_datalist
from bsf.data.pipeline import SampleStream, training_split
from bsf.data.synth import synthesize
from bsf.data.transforms import random_transforms

REPO = Path(__file__).resolve().parents[1]
SITES = {name: REPO / "sites" / f"{name}.yaml" for name in ("ukb", "brats", "atlas")}


def _crops(cfg):
    return random_transforms(cfg, with_label=False)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(root, datalist) per data set: three subjects at 4 mm."""
    out = {}
    for dataset in ("ukb", "brats", "atlas"):
        root = tmp_path_factory.mktemp(f"check_{dataset}")
        synthesize(dataset, 3, root, spacing=4.0, seed=5)
        datalist = root / "datalist.json"
        datalist.write_text(json.dumps(index_dataset(dataset, root, min_slices=40, val_count=1).datalist))
        out[dataset] = (root, datalist)
    return out


@pytest.fixture
def brats_copy(sets, tmp_path: Path) -> tuple[Path, Path]:
    root = Path(shutil.copytree(sets["brats"][0], tmp_path / "brats"))
    datalist = root / "datalist.json"
    content = json.loads(datalist.read_text())
    content["root"] = str(root)
    datalist.write_text(json.dumps(content))
    return root, datalist


@pytest.mark.parametrize("dataset", ["ukb", "brats", "atlas"])
def test_clean_sets_pass(sets, dataset: str, capsys: pytest.CaptureFixture) -> None:
    _, datalist = sets[dataset]
    assert main(["data", "check", "--datalist", str(datalist), "--workers", "2", "--no-progress"]) == 0
    assert "checked 3 case(s) (headers and data): 0 broken" in capsys.readouterr().out


def test_write_clean_and_json(brats_copy, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, datalist = brats_copy
    seg = root / "BraTS2021_00001/BraTS2021_00001_seg.nii.gz"
    image = nib.load(seg)
    nib.save(nib.Nifti1Image(np.full(image.shape, 7, np.uint8), image.affine), seg)
    clean, report = tmp_path / "clean.json", tmp_path / "report.json"
    args = ["data", "check", "--datalist", str(datalist), "--no-progress", "--write-clean", str(clean), "--json", str(report)]
    assert main(args) == 2
    out = capsys.readouterr().out
    assert "BraTS2021_00001/BraTS2021_00001_seg.nii.gz" in out and "label values [7] not allowed" in out
    cleaned = json.loads(clean.read_text())
    ids = [c["id"] for c in cleaned["training"] + cleaned.get("validation", [])]
    assert sorted(ids) == ["BraTS2021_00000", "BraTS2021_00002"] and cleaned["removed"]["cases"] == ["BraTS2021_00001"]
    assert main(["data", "check", "--datalist", str(clean), "--no-progress"]) == 0
    problems = json.loads(report.read_text())["problems"]
    assert problems[0]["file"].endswith("_seg.nii.gz") and problems[0]["severity"] == "error"


def test_headers_only_skips_voxels(brats_copy, capsys: pytest.CaptureFixture) -> None:
    root, datalist = brats_copy
    flair = root / "BraTS2021_00000/BraTS2021_00000_flair.nii.gz"
    image = nib.load(flair)
    nib.save(nib.Nifti1Image(np.full(image.shape, np.inf, np.float32), image.affine), flair)
    assert main(["data", "check", "--datalist", str(datalist), "--headers-only", "--no-progress"]) == 0
    assert main(["data", "check", "--datalist", str(datalist), "--no-progress"]) == 2
    assert "Inf voxel(s)" in capsys.readouterr().out


def test_label_sets() -> None:
    assert label_rule("brats", "BraTS2021_00000").allowed == {0, 1, 2, 4}
    assert label_rule("brats", "BraTS-GLI-00002-000").allowed == {0, 1, 2, 3}
    assert label_rule("atlas", "sub-r001s001").allowed == {0, 1}
    assert label_rule("ukb", "1000000").allowed is None
    assert label_rule("brats", "BraTS2021_00000", listed=[0, 1]).allowed == {0, 1}


def test_brats_2023_label_4_is_an_error(sets, tmp_path: Path) -> None:
    """A 2023-named case with enhancing tumour as 4 (the 2021 convention) fails; with 3 it passes."""
    root, _ = sets["brats"]
    case = "BraTS-GLI-00002-000"
    (tmp_path / case).mkdir()
    for old, new in zip(("flair", "t1ce", "t1", "t2", "seg"), ("t2f", "t1c", "t1n", "t2w", "seg")):
        shutil.copy(root / "BraTS2021_00000" / f"BraTS2021_00000_{old}.nii.gz", tmp_path / case / f"{case}-{new}.nii.gz")
    datalist = index_dataset("brats", tmp_path).datalist
    assert datalist["labels"] == [0, 1, 2, 3]
    report = check_cases(datalist["training"], tmp_path, dataset="brats", labels=datalist["labels"])
    assert not report.ok and "label values [4] not allowed" in report.errors[0].problem
    seg = tmp_path / case / f"{case}-seg.nii.gz"
    data = np.asanyarray(nib.load(seg).dataobj).copy()
    data[data == 4] = 3
    nib.save(nib.Nifti1Image(data, nib.load(seg).affine), seg)
    assert check_cases(datalist["training"], tmp_path, dataset="brats", labels=datalist["labels"]).ok


def test_header_stage_does_not_decode_clean_gzip_files(sets, monkeypatch: pytest.MonkeyPatch) -> None:
    """The truncation check reads the gzip trailer; only a size mismatch decodes the stream."""
    root, datalist = sets["brats"]

    def refuse(*args, **kwargs):
        raise AssertionError("gzip stream decoded during the header stage")

    monkeypatch.setattr(gzip, "open", refuse)
    monkeypatch.setattr(check_module.gzip, "open", refuse)
    assert check_cases(read_datalist(datalist).all_cases, root, data=False).ok


def test_memo_skips_verified_files_and_rereads_changed_ones(brats_copy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, datalist = brats_copy
    cases = read_datalist(datalist).all_cases
    reads: list[str] = []
    original = check_module.read_voxels
    monkeypatch.setattr(check_module, "read_voxels", lambda p: reads.append(Path(p).name) or original(p))
    memo = tmp_path / "memo"
    assert check_cases(cases, root, dataset="brats", memo_dir=memo).ok
    assert len(reads) == 15 and (memo / check_module.MEMO_FILE).is_file()
    reads.clear()
    assert check_cases(cases, root, dataset="brats", memo_dir=memo).ok
    assert reads == []
    t1 = root / "BraTS2021_00002/BraTS2021_00002_t1.nii.gz"
    image = nib.load(t1)
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj) * 2, image.affine), t1)
    assert check_cases(cases, root, dataset="brats", memo_dir=memo).ok
    assert reads == [t1.name]


def test_checked_load_is_a_monai_transform_so_the_memory_cache_holds_volumes(sets) -> None:
    cfg = load_config(None, ["data.dataset=ukb", f"data.datalist={sets['ukb'][1]}", "data.roi=[64, 64, 64]"]).data
    split = training_split(cfg, seed=0)
    stream = SampleStream(split.train, cfg, 0, _crops(cfg))
    cached = stream.volumes._cache[0]
    assert isinstance(cached, dict) and isinstance(cached["image"], torch.Tensor) and cached["image"].shape[0] == 2


def test_persistent_cache_matches_uncached_crops(sets, tmp_path: Path) -> None:
    base = ["data.dataset=brats", f"data.datalist={sets['brats'][1]}", "data.roi=[64, 64, 64]"]
    persistent = load_config(None, [*base, "data.cache=persistent", f"data.cache_dir={tmp_path / 'cache'}"]).data
    plain = load_config(None, [*base, "data.cache=none"]).data
    split = training_split(persistent, seed=0)
    cold = [SampleStream(split.train, persistent, 1, _crops(persistent))[i] for i in range(2)]
    assert len(list((tmp_path / "cache").glob("*.pt"))) == len(split.train)
    warm = [SampleStream(split.train, persistent, 1, _crops(persistent))[i] for i in range(2)]
    reference = [SampleStream(split.train, plain, 1, _crops(plain))[i] for i in range(2)]
    for a, b, c in zip(cold, warm, reference):
        for x, y, z in zip(a, b, c):
            assert torch.equal(x["image"], z["image"]) and torch.equal(y["image"], z["image"])


# --------------------------------------------------------------------------------------------- sites
@pytest.mark.parametrize("name", list(SITES))
def test_shipped_site_yaml_is_strictly_valid_and_checks_synthetic_data(sets, name: str, tmp_path: Path, capsys) -> None:
    raw = yaml.safe_load(SITES[name].read_text())
    assert set(raw) <= {"data", "train"} and raw["data"]["dataset"] == name
    root, datalist = sets[name]
    overrides = [f"data.root={root}", f"data.datalist={datalist}", f"data.cache_dir={tmp_path / 'cache'}", "data.fold=null"]
    channels = {"ukb": 2, "brats": 4, "atlas": 1}[name]
    code = main(["site", "check", "--config", "stage1_test", "--full", str(SITES[name]), f"model.in_channels={channels}", *overrides])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "site check: OK" in out and "checked 3 case(s) (headers and data)" in out


def test_site_check_reports_missing_paths_and_bad_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["site", "check", str(SITES["atlas"])]) == 2
    out = capsys.readouterr()
    assert "data.root /data/ATLAS_2/Training: no such folder" in out.out and "problem(s)" in out.err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: brats\n  roots: /x\n")
    assert main(["site", "check", str(bad)]) == 2
    assert "unknown config key data.roots" in capsys.readouterr().err
    assert main(["site", "check", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_site_check_catches_channel_mismatch_and_missing_folds(sets, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, datalist = sets["brats"]
    args = ["site", "check", "--config", "stage1_test", str(SITES["brats"]), f"data.root={root}", "data.cache=memory", "data.cache_dir=''"]
    assert main([*args, f"data.datalist={datalist}", "data.fold=null"]) == 2  # 4 named modalities, model takes 2
    assert "one modality per model.in_channels" in capsys.readouterr().err
    assert main([*args, f"data.datalist={datalist}", "data.fold=null", "data.modalities=[]"]) == 2
    assert "cases have [4] image channel(s) but the job's model.in_channels is 2" in capsys.readouterr().out
    assert main([*args, f"data.datalist={datalist}", "data.fold=null", "data.modalities=[t1, flair]"]) == 0
    capsys.readouterr()
    content = json.loads(datalist.read_text())
    content["training"] = [{k: v for k, v in c.items() if k != "fold"} for c in content["training"]]
    no_folds = tmp_path / "no_folds.json"
    no_folds.write_text(json.dumps(content))
    assert main([*args, f"data.datalist={no_folds}", "data.fold=0", "data.modalities=[t1, flair]"]) == 2
    assert "carry no 'fold'" in capsys.readouterr().out


def test_loader_benchmark_runs_at_tiny_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """benchmarks/data_pipeline.py still runs against the current pipeline API; numbers exist, none asserted."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_data_pipeline", REPO / "benchmarks" / "data_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bench.json"
    argv = ["data_pipeline.py", "--spacing", "4", "--subjects", "2", "--samples", "2", "--roi", "64", "--workers", "0", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["results"]] == list(module.MODES)
    assert all(r["crops_per_s"] > 0 and r["cases_per_s"] > 0 for r in result["results"])
    assert "crops/s" in capsys.readouterr().out
