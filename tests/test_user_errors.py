"""What a new user meets first: each mistake is one line that names the file, option or key, never a traceback
nor a confident result.

An all-zero image is refused by ``bsf predict`` and ``bsf evaluate`` in ``bsf data check``'s words; a resumed (or
restarted) ``bsf train`` clears the temporary files killed runs left of its own outputs; a bad item of a
comma-separated number option is an argparse usage line naming the option and the item; ``key=value`` overrides of
``bsf site check``/``preflight`` go anywhere on the line; ``--help`` reads as plain text.
Tiny data: synthetic BraTS and ATLAS at 8 mm, random test-size models.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import bsf.predict
from bsf.cli import build_parser, main
from bsf.config import load_config
from bsf.console import IntermixedArgumentParser, number_list, plain_text
from bsf.data.check import EMPTY_IMAGE, file_data_problems
from bsf.data.synth import synthesize
from bsf.engine import build_model
from bsf.io import STALE_TEMP_SECONDS, remove_own_temp_files, sweep_stale_temp_files, temp_pattern
from bsf.train import BEST, LAST, RUN_FILES, RUN_LOG, SUMMARY
from tests.cli_errors import one_line_error
from tests.small_brats import brats_and_model

REPO = Path(__file__).resolve().parents[1]
MODALITIES = ["flair", "t1ce", "t1", "t2"]


def _usage_error(capsys, *names) -> str:
    """argparse's usage error: usage lines, then one ``error:`` line naming ``names``; no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def _zeroed(src: Path, dst: Path, keep_one_voxel: bool = False) -> Path:
    """A copy of ``src`` (same header and grid) whose voxels are all 0 (one voxel left, with ``keep_one_voxel``)."""
    image = nib.load(src)
    data = np.zeros(image.shape, dtype=image.get_data_dtype())
    if keep_one_voxel:
        data[tuple(n // 2 for n in image.shape[:3])] = 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, image.affine, image.header), dst)
    return dst


# ------------------------------------------------------------------------------------ empty images
@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    """Two synthetic BraTS cases at 8 mm, a random test-size Stage 3 model carrying its config, a datalist."""
    base = tmp_path_factory.mktemp("user_errors")
    root, model = brats_and_model(base, seed=3)
    case = root / "BraTS2021_00000"
    return {"base": base, "root": root, "model": model, "files": [case / f"BraTS2021_00000_{m}.nii.gz" for m in MODALITIES]}


def _predict(brats, inputs, out: Path) -> int:
    return main(["predict", "--model", str(brats["model"]), "--device", "cpu", "--no-progress",
                 "--input", *map(str, inputs), "--output", str(out)])


def _no_inference(*args, **kwargs):
    raise AssertionError("the model ran on an empty image")


def test_empty_image_words_are_those_of_data_check(tmp_path, brats):
    empty = _zeroed(brats["files"][0], tmp_path / "empty_flair.nii.gz")
    assert (("error", EMPTY_IMAGE) in file_data_problems(empty, "image", None))
    assert file_data_problems(_zeroed(brats["files"][0], tmp_path / "one_flair.nii.gz", keep_one_voxel=True), "image", None) == []


@pytest.mark.parametrize("how", ["case folder", "files in order", "named files", "one file for every channel"])
def test_predict_refuses_a_case_whose_every_input_is_empty(brats, tmp_path, capsys, monkeypatch, how):
    folder = tmp_path / "case"
    files = [_zeroed(src, folder / f"case_{m}.nii.gz") for src, m in zip(brats["files"], MODALITIES)]
    inputs = {"case folder": [folder], "files in order": files, "one file for every channel": [files[0]] * 4,
              "named files": [f"{m}={f}" for m, f in zip(MODALITIES[:2], files[:2])]}[how]
    out = tmp_path / "pred.nii.gz"
    monkeypatch.setattr(bsf.predict, "segment", _no_inference)
    assert _predict(brats, inputs, out) == 2
    named = {"named files": files[:2], "one file for every channel": [f"{files[0]} ({m})" for m in MODALITIES]}.get(how, files)
    err = one_line_error(capsys, EMPTY_IMAGE, *named)
    assert "while the other" not in err and not out.exists()


@pytest.mark.parametrize("empty", [["t1ce"], ["flair", "t2"], ["t1", "t1ce", "t2"]])
def test_predict_names_which_of_several_inputs_are_empty(brats, tmp_path, capsys, monkeypatch, empty):
    files = [_zeroed(src, tmp_path / f"case_{m}.nii.gz") if m in empty else src for src, m in zip(brats["files"], MODALITIES)]
    out = tmp_path / "pred.nii.gz"
    monkeypatch.setattr(bsf.predict, "segment", _no_inference)
    assert _predict(brats, files, out) == 2
    err = one_line_error(capsys, EMPTY_IMAGE, *(f"{f} ({m})" for f, m in zip(files, MODALITIES) if m in empty))
    held = [f"{m}={f}" for f, m in zip(files, MODALITIES) if m not in empty]
    assert err.rstrip().endswith("--input " + " ".join(held)), err  # how to go on: the others, named
    blamed = err.split(EMPTY_IMAGE)[0]
    assert not any(str(f) in blamed for f, m in zip(files, MODALITIES) if m not in empty), err
    assert not out.exists()


def test_predict_with_the_empty_one_left_out_as_the_message_says(brats, tmp_path, capsys):
    files = [_zeroed(brats["files"][1], tmp_path / "case_t1ce.nii.gz") if m == "t1ce" else src for src, m in zip(brats["files"], MODALITIES)]
    assert _predict(brats, files, tmp_path / "refused.nii.gz") == 2
    words = capsys.readouterr().err.rstrip().split("--input ")[1].split()
    out = tmp_path / "pred.nii.gz"
    assert _predict(brats, words, out) == 0, capsys.readouterr().err
    assert nib.load(out).shape == nib.load(brats["files"][0]).shape


def test_one_voxel_is_not_empty(brats, tmp_path, capsys):
    """The notion is ``bsf data check``'s: any voxel other than 0 is an image (its quality is data check's matter)."""
    files = [_zeroed(brats["files"][0], tmp_path / "case_flair.nii.gz", keep_one_voxel=True), *brats["files"][1:]]
    assert _predict(brats, files, tmp_path / "pred.nii.gz") == 0, capsys.readouterr().err


def test_atlas_predict_refuses_an_empty_t1w(tmp_path, capsys, monkeypatch):
    root = tmp_path / "atlas"
    synthesize("atlas", 1, root, spacing=8.0, seed=1)
    config = load_config("stage3_atlas_test", [f"data.root={root}"])
    model = tmp_path / "run" / "checkpoint_last.pt"
    model.parent.mkdir()
    torch.save({"model": build_model(config).state_dict(), "config": config.to_dict()}, model)
    t1w = next(root.rglob("*_T1w.nii.gz"))
    _zeroed(t1w, t1w)
    monkeypatch.setattr(bsf.predict, "segment", _no_inference)
    for given in (t1w, t1w.parent):  # the file, or its folder
        out = tmp_path / "pred.nii.gz"
        assert main(["predict", "--model", str(model), "--device", "cpu", "--no-progress", "--input", str(given),
                     "--output", str(out)]) == 2
        one_line_error(capsys, t1w, EMPTY_IMAGE)
        assert not out.exists()


@pytest.mark.parametrize("empty", [["flair"], MODALITIES])
def test_evaluate_refuses_a_case_with_an_empty_image_naming_case_and_file(brats, tmp_path, capsys, empty):
    root = tmp_path / "brats"
    shutil.copytree(brats["root"], root)
    cases = [{"id": f"BraTS2021_0000{i}", "image": [f"BraTS2021_0000{i}/BraTS2021_0000{i}_{m}.nii.gz" for m in MODALITIES],
              "label": f"BraTS2021_0000{i}/BraTS2021_0000{i}_seg.nii.gz"} for i in range(2)]
    for m in empty:
        path = root / cases[1]["image"][MODALITIES.index(m)]
        _zeroed(path, path)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"dataset": "brats", "root": str(root), "training": cases[:1], "validation": cases[1:]}))
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(brats["model"]), "--device", "cpu", "--no-progress", "--datalist", str(datalist),
                 "--split", "all", "--out", str(out)]) == 2
    one_line_error(capsys, "case BraTS2021_00001", EMPTY_IMAGE, "bsf data check", *(root / cases[1]["image"][MODALITIES.index(m)] for m in empty))
    assert not (out / "metrics.csv").exists() and not (out / "summary.json").exists()


# ------------------------------------------------------------------------------ stray temporary files
def _plant_temp_files(out: Path, age_s: float) -> tuple[list[Path], list[Path]]:
    """Temporary files of the run's own targets (two per target, as repeated kills leave) and of others, ``age_s`` old."""
    out.mkdir(parents=True, exist_ok=True)
    own = [out / f".{name}.{tag}.tmp" for name in RUN_FILES for tag in ("k1ll3d01", "x_y9z2ab")]
    others = [out / ".notes.txt.abcd1234.tmp", out / ".checkpoint_last.pt.bak.abcd1234.tmp.keep", out / "checkpoint_last.pt.tmp"]
    stamp = time.time() - age_s
    for path in [*own, *others]:
        path.write_bytes(b"half a write")
        os.utime(path, (stamp, stamp))
    return own, others


@pytest.mark.parametrize("age_s", [0.0, 60.0, 2 * STALE_TEMP_SECONDS])
def test_remove_own_temp_files_takes_any_age_and_only_those_targets(tmp_path, age_s):
    own, others = _plant_temp_files(tmp_path, age_s)
    removed = remove_own_temp_files(tmp_path, RUN_FILES)
    assert sorted(removed) == sorted(own)
    assert not any(p.exists() for p in own) and all(p.exists() for p in others)
    assert remove_own_temp_files(tmp_path, RUN_FILES) == []
    assert remove_own_temp_files(tmp_path / "no such folder", RUN_FILES) == []


def test_age_based_sweep_still_spares_a_fresh_write_of_another_process(tmp_path):
    own, _ = _plant_temp_files(tmp_path, 0.0)
    assert sweep_stale_temp_files(tmp_path, temp_pattern(LAST)) == []
    assert all(p.exists() for p in own)


def _train(ukb_root: Path, out: Path, *extra: str) -> int:
    return main(["train", "--config", "stage1_test", f"data.root={ukb_root}", f"train.output_dir={out}", "train.progress=false",
                 "data.val_cases=0", *extra])


def test_resumed_and_restarted_runs_sweep_the_temp_files_of_their_own_outputs(ukb_root, tmp_path, capsys):
    out = tmp_path / "run"
    own, others = _plant_temp_files(out, 0.0)  # a run killed before its first checkpoint: no earlier run to resume
    assert _train(ukb_root, out, "train.steps=1") == 0
    assert not any(p.exists() for p in own) and all(p.exists() for p in others)
    for age_s, flag, steps in ((0.0, "--resume", 2), (30.0, "--resume", 3), (2 * STALE_TEMP_SECONDS, "--force", 1)):
        own, others = _plant_temp_files(out, age_s)  # killed again, mid-write of each file
        assert _train(ukb_root, out, f"train.steps={steps}", flag) == 0, capsys.readouterr().err
        left = sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp"))
        assert left == sorted(p.name for p in others if p.name.endswith(".tmp")), (flag, left)
        assert torch.load(out / LAST, weights_only=True)["step"] == steps
    assert (out / SUMMARY).is_file() and (out / RUN_LOG).is_file() and not (out / BEST).exists()


def test_a_refused_run_folder_keeps_its_temp_files(ukb_root, tmp_path, capsys):
    """Only a run that may use the folder sweeps it: one refused (an earlier run, no flag) touches nothing."""
    out = tmp_path / "run"
    own, _ = _plant_temp_files(out, 0.0)
    (out / SUMMARY).write_text("{}")
    assert _train(ukb_root, out, "train.steps=1") == 2
    one_line_error(capsys, out, "--resume")
    assert all(p.exists() for p in own)


# ------------------------------------------------------------------------------- comma-separated lists
@pytest.mark.parametrize("argv, option, item", [
    (["data", "check", "--datalist", "d.json", "--labels", "0,1,x"], "--labels", "'x'"),
    (["data", "check", "--datalist", "d.json", "--labels", "0,1.5"], "--labels", "'1.5'"),
    (["data", "check", "--datalist", "d.json", "--labels", "0,-1"], "--labels", "-1"),
    (["data", "check", "--datalist", "d.json", "--labels", ","], "--labels", "no number"),
    (["experiment", "cv", "--root", "r", "--out", "o", "--folds", "0,x"], "--folds", "'x'"),
    (["experiment", "cv", "--root", "r", "--out", "o", "--folds", "0-two"], "--folds", "'0-two'"),
    (["experiment", "cv", "--root", "r", "--out", "o", "--folds", "4-1"], "--folds", "'4-1'"),
    (["experiment", "cv", "--root", "r", "--out", "o", "--seeds", "0,0"], "--seeds", "0 is given twice"),
    (["experiment", "single-modality", "--root", "r", "--out", "o", "--seeds", "1,b"], "--seeds", "'b'"),
    (["experiment", "atlas", "--root", "r", "--out", "o", "--seeds", "-2"], "--seeds", "-2"),
    (["experiment", "fewshot", "--root", "r", "--out", "o", "--percents", "5,abc"], "--percents", "'abc'"),
    (["experiment", "fewshot", "--root", "r", "--out", "o", "--percents", "0,50"], "--percents", "0 in '0,50'"),
    (["experiment", "fewshot", "--root", "r", "--out", "o", "--percents", "150"], "--percents", "150"),
    (["experiment", "fewshot", "--root", "r", "--out", "o", "--percents", "nan"], "--percents", "'nan'"),
    (["bench", "--out", "o", "--steps", "x"], "--steps", "'x'"),
    (["bench", "--out", "o", "--warmup", "-1"], "--warmup", "-1"),
    (["site", "check", "s.yaml", "--workers", "0"], "--workers", "0"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_item_of_a_number_option_is_one_usage_line_naming_option_and_item(argv, option, item, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    _usage_error(capsys, f"argument {option}", item)


@pytest.mark.parametrize("argv, field, value", [
    (["data", "check", "--datalist", "d.json", "--labels", "0, 1,2,4"], "labels", [0, 1, 2, 4]),
    (["data", "check", "--datalist", "d.json", "--labels", "0,1,"], "labels", [0, 1]),
    (["data", "check", "--datalist", "d.json"], "labels", None),
    (["experiment", "cv", "--root", "r", "--out", "o"], "folds", [0, 1, 2, 3, 4]),
    (["experiment", "cv", "--root", "r", "--out", "o", "--folds", "0-1,3"], "folds", [0, 1, 3]),
    (["experiment", "cv", "--root", "r", "--out", "o", "--seeds", "2"], "seeds", [2]),
    (["experiment", "fewshot", "--root", "r", "--out", "o"], "percents", [5.0, 10.0, 20.0, 40.0]),
    (["experiment", "fewshot", "--root", "r", "--out", "o", "--percents", "100,2.5"], "percents", [100.0, 2.5]),
    (["bench", "--out", "o", "--warmup", "0"], "warmup", 0),
])
def test_good_number_lists_and_defaults_parse(argv, field, value):
    assert getattr(build_parser().parse_args(argv), field) == value


def test_number_list_variants():
    floats = number_list(float, minimum=-1.0)
    assert floats("-1,0.5,1e2") == [-1.0, 0.5, 100.0]
    for bad, words in (("-2", "out of range: each number must be >= -1"), ("inf", "not a finite number"), ("1,,x", "'x' in '1,,x'")):
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            floats(bad)
    assert number_list(int)("3,3") == [3, 3]  # duplicates are refused only where asked


# ---------------------------------------------------------------------------------- key=value overrides
SITE_LINES = [
    ["SITE", "key.a=1", "--site", "s2", "--config", "cfg"],
    ["SITE", "--site", "s2", "key.a=1", "--config", "cfg"],
    ["SITE", "--site", "s2", "--config", "cfg", "key.a=1"],
    ["--config", "cfg", "SITE", "--site", "s2", "key.a=1"],
]


@pytest.mark.parametrize("command", ["check", "preflight"])
@pytest.mark.parametrize("line", SITE_LINES, ids=lambda line: " ".join(line))
def test_site_overrides_go_anywhere_on_the_line(command, line):
    args = build_parser().parse_args(["site", command, *line, "key.b=2"])
    assert (args.site_config, args.site, args.config, args.overrides) == ("SITE", "s2", "cfg", ["key.a=1", "key.b=2"])


def test_site_check_applies_an_override_given_after_an_option(tmp_path, capsys):
    nowhere = tmp_path / "nowhere"
    assert main(["site", "check", str(REPO / "sites" / "atlas.yaml"), "--site", "site-1", f"data.root={nowhere}",
                 "--workers", "1", f"data.datalist={tmp_path / 'none.json'}"]) == 2
    out = capsys.readouterr()
    assert f"data.root {nowhere}: no such folder" in out.out and "unrecognized arguments" not in out.err


def test_site_preflight_applies_an_override_given_after_config(tmp_path, capsys):
    site = tmp_path / "site.yaml"
    site.write_text("data:\n  dataset: brats\n  root: \"\"\n  num_workers: 0\n")
    assert main(["site", "preflight", str(site), "--config", "stage3_brats", "data.roi=[256,512,512]"]) == 2
    out = capsys.readouterr()
    assert "problem: RAM" in out.out and "data.roi" in out.out and "unrecognized arguments" not in out.err


@pytest.mark.parametrize("argv, words", [
    (["site", "check"], "the following arguments are required: site_config"),
    (["site", "check", "s.yaml", "--bogus"], "unrecognized arguments: --bogus"),
    (["site", "preflight", "s.yaml", "key.a=1"], "the following arguments are required: --config"),
    (["site", "preflight", "s.yaml", "--config"], "argument --config: expected one argument"),
])
def test_site_usage_errors_stay_plain(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    line = _usage_error(capsys, words)
    assert "key=value" not in line


def test_intermixed_parser_falls_back_for_a_parser_with_subcommands():
    parser = IntermixedArgumentParser(prog="x")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=IntermixedArgumentParser)
    p = sub.add_parser("go")
    p.add_argument("name")
    p.add_argument("rest", nargs="*", default=[])
    p.add_argument("--flag", action="store_true")
    args = parser.parse_args(["go", "n", "a=1", "--flag", "b=2"])
    assert (args.name, args.rest, args.flag) == ("n", ["a=1", "b=2"], True)


@pytest.mark.parametrize("override, key", [
    ("train.steps=abc", "train.steps"), ("train.steps=1.5", "train.steps"), ("optim.lr=fast", "optim.lr"),
    ("data.roi=[64,x,64]", "data.roi[1]"), ("seed=abc", "seed"),
])
def test_a_bad_number_in_a_config_override_is_one_line_naming_the_key(override, key, tmp_path, capsys):
    assert main(["config", "--config", "stage1_test", override]) == 2
    one_line_error(capsys, key)
    assert main(["train", "--config", "stage1_test", f"train.output_dir={tmp_path / 'run'}", override]) == 2
    one_line_error(capsys, key)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ --help
@pytest.mark.parametrize("argv", [["bench", "--help"], ["site", "check", "--help"]])
def test_help_is_plain_text(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and ":mod:" not in text and ":class:" not in text, text
    if argv[0] == "bench":
        words = " ".join(text.split())
        assert "bsf bench --size test --device cpu --out bench_out" in text and "(see the modules of bsf.bench)" in words


def test_torchrun_train_help_is_plain_text(capsys):
    from bsf.train import main as train_main

    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and ":mod:" not in text
    assert "- checkpoint_last.pt: full resumable engine state" in text  # the list keeps its lines


@pytest.mark.parametrize("rest, plain", [
    ("``bsf bench`` writes ``bench.json``", "bsf bench writes bench.json"),
    ("see :func:`bsf.io.atomic_path`", "see bsf.io.atomic_path"),
    ("see :func:`~bsf.io.atomic_path`", "see atomic_path"),
    ("see :class:`the engine <bsf.engine.Engine>`", "see the engine"),
    ("see :py:meth:`Engine.step`", "see Engine.step"),
    ("The route::\n\n    a -> b", "The route:\n\n    a -> b"),
    ("Run it:\n\n::\n\n    bsf x", "Run it:\n\n    bsf x"),
    ("a `single` backtick stays", "a `single` backtick stays"),
])
def test_plain_text_variants(rest, plain):
    assert plain_text(rest) == plain
