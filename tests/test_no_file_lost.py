"""One rule for every file a command writes: nothing a user has is lost by surprise.

A command never replaces a file that the same run did not create unless ``--force``, and never one of its inputs, nor
a case's own images or label, even with ``--force`` (same path, relative path, symbolic link, hard link). Each refusal
is one line naming the path and the flag, comes before any work, and leaves every byte in place.
Tiny data: synthetic BraTS at 8 mm, a random test-size model; one real training step and one real evaluation.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import bsf.data.check
import bsf.data.index
import bsf.predict
import bsf.train
from bsf.cli import main
from bsf.data.synth import check_synth_output, subject_files, synthesize
from bsf.errors import OutputError
from bsf.outputs import FileSet, check_output_file, check_output_files, same_file
from bsf.train import BEST, LAST, RUN_LOG, SUMMARY, check_run_folder, earlier_run
from tests.cli_errors import one_line_error
from tests.small_brats import brats_and_model

SPELLINGS = ["same path", "relative path", "symbolic link", "hard link"]
MODALITIES = ["flair", "t1ce", "t1", "t2"]


# ------------------------------------------------------------------------------------------- helpers


def _spelled(target: Path, spelling: str, where: Path, monkeypatch) -> Path:
    """Another name for ``target``: itself, a relative path from ``where``, a symbolic or a hard link in ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    if spelling == "same path":
        return target
    if spelling == "relative path":
        monkeypatch.chdir(where)
        return Path(os.path.relpath(target.parent, where)) / ".." / target.parent.name / target.name
    link = where / f"{spelling.replace(' ', '_')}_{target.name}"
    if spelling == "symbolic link":
        link.symlink_to(target)
    else:
        os.link(target, link)
    return link


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _must_not_run(*args, **kwargs):
    raise AssertionError("work started before the outputs were checked")


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    """Two synthetic BraTS cases at 8 mm, a datalist, and a random test-size Stage 3 model carrying its config."""
    base = tmp_path_factory.mktemp("no_file_lost")
    root, model = brats_and_model(base, seed=4)
    cases = [{"id": f"BraTS2021_0000{i}", "image": [f"BraTS2021_0000{i}/BraTS2021_0000{i}_{m}.nii.gz" for m in MODALITIES],
              "label": f"BraTS2021_0000{i}/BraTS2021_0000{i}_seg.nii.gz"} for i in range(2)]
    datalist = base / "datalist.json"
    datalist.write_text(json.dumps({"dataset": "brats", "root": str(root), "training": cases[:1], "validation": cases[1:]}))
    return {"base": base, "root": root, "model": model, "datalist": datalist, "case": root / "BraTS2021_00000"}


# ------------------------------------------------------------------------------------ bsf.outputs
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_an_input_is_never_an_output_even_with_force(tmp_path, monkeypatch, spelling):
    source = tmp_path / "data" / "input.json"
    source.parent.mkdir()
    source.write_text("{}")
    output = _spelled(source, spelling, tmp_path / "elsewhere", monkeypatch)
    for check in (lambda: check_output_file(output, inputs=[source], force=True),
                  lambda: check_output_files([tmp_path / "new.json", output], inputs=[source], force=True)):
        with pytest.raises(OutputError, match="is the input") as error:
            check()
        assert str(output) in str(error.value)
    with pytest.raises(OutputError, match="one of the case's own files"):
        check_output_file(output, keep=[source], force=True)
    assert source.read_text() == "{}"


def test_file_set_agrees_with_same_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("a")
    os.link(a, tmp_path / "hard")
    (tmp_path / "soft").symlink_to(a)
    members = FileSet([a, tmp_path / "missing"])
    for path in [a, b, tmp_path / "hard", tmp_path / "soft", tmp_path / "missing", tmp_path / "x" / ".." / "a"]:
        assert (members.find(path) is not None) == any(same_file(path, m) for m in (a, tmp_path / "missing")), path
    assert FileSet().find(a) is None and not FileSet()


def test_existing_files_need_force_and_are_named(tmp_path):
    old = [tmp_path / "one.csv", tmp_path / "two.json"]
    for path in old:
        path.write_text("earlier")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match=r"one.csv: already exists; pass --force to replace it"):
        check_output_files([old[0], tmp_path / "new"])
    with pytest.raises(OutputError, match=r"2 of the 3 files to write already exist .*one.csv.*two.json.*--force"):
        check_output_files([*old, tmp_path / "new"])
    with pytest.raises(OutputError, match="dangling: already exists"):
        check_output_files([tmp_path / "dangling"])
    assert check_output_files([*old, tmp_path / "new"], force=True) == [*old, tmp_path / "new"]
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        check_output_files([tmp_path / "folder"], force=True)
    assert all(p.read_text() == "earlier" for p in old)


# ------------------------------------------------------------------------------------------ bsf train
def _train(tmp_path, out, *flags) -> int:
    return main(["train", "--config", "stage1_test", f"data.root={tmp_path}", f"train.output_dir={out}",
                 "train.progress=false", "train.steps=1", *flags])


def _plant_run(out: Path, *names: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name == "tb":
            (out / "tb").mkdir()
            (out / "tb" / "events.out.tfevents.earlier").write_bytes(b"earlier events")
        else:
            (out / name).write_bytes(f"earlier {name}".encode())


@pytest.mark.parametrize("earlier", [(LAST, BEST, SUMMARY, RUN_LOG, "tb"), (LAST,), (BEST,), (SUMMARY,), ("tb",)],
                         ids=["whole run", "last checkpoint", "best checkpoint", "summary", "tensorboard"])
def test_train_refuses_a_folder_with_an_earlier_run(tmp_path, capsys, monkeypatch, earlier):
    out = tmp_path / "run"
    _plant_run(out, *earlier)
    before = _snapshot(out)
    monkeypatch.setattr(bsf.train, "Engine", _must_not_run)
    assert _train(tmp_path, out) == 2
    err = one_line_error(capsys, out, "--resume", "--force")
    assert "holds an earlier run" in err and "continue" in err and "start over" in err
    assert _snapshot(out) == before


@pytest.mark.parametrize("state", ["fresh", "empty", "other files only", "empty tb"])
def test_train_takes_a_fresh_or_empty_folder_without_flags(tmp_path, state):
    out = tmp_path / "run"
    if state != "fresh":
        out.mkdir()
    if state == "other files only":
        (out / "notes.txt").write_text("mine")
    if state == "empty tb":
        (out / "tb").mkdir()
    check_run_folder(out)  # accepted: no earlier run there


def test_train_resume_and_force_choices(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _plant_run(out, BEST, SUMMARY)
    before = _snapshot(out)
    monkeypatch.setattr(bsf.train, "Engine", _must_not_run)
    assert _train(tmp_path, out, "--resume") == 2  # nothing to continue from: --resume would replace, not continue
    assert "no checkpoint_last.pt" in one_line_error(capsys, out, "--force")
    assert _train(tmp_path, out, "--resume", "--force") == 2
    one_line_error(capsys, out, "--resume", "--force")
    assert _snapshot(out) == before
    _plant_run(out, LAST)
    check_run_folder(out, resume=True)
    check_run_folder(out, force=True)
    assert sorted(p.name for p in earlier_run(out)) == sorted([LAST, BEST, SUMMARY])  # what --force replaces
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="afile: exists and is not a folder"):
        check_run_folder(tmp_path / "afile", force=True)


def test_train_force_starts_over_and_leaves_nothing_of_the_earlier_run(ukb_root, tmp_path, capsys):
    out = tmp_path / "run"
    _plant_run(out, LAST, BEST, SUMMARY, RUN_LOG, "tb")
    (out / "notes.txt").write_text("mine")
    assert _train(ukb_root, out, "data.val_cases=0", "--force") == 0  # no validation: this run makes no best checkpoint
    summary = json.loads((out / SUMMARY).read_text())
    assert summary["steps_done"] == 1 and summary["checkpoints"]["best"] is None
    assert not (out / BEST).exists(), "a stale best checkpoint of the earlier run survived"
    assert (out / LAST).read_bytes() != b"earlier checkpoint_last.pt" and torch.load(out / LAST, weights_only=True)["step"] == 1
    assert not (out / "tb" / "events.out.tfevents.earlier").exists() and list((out / "tb").iterdir())
    assert (out / "notes.txt").read_text() == "mine"  # not the run's: untouched
    assert _train(ukb_root, out) == 2  # and now this run is the one a rerun would replace
    one_line_error(capsys, out, "--resume", "--force")


# ------------------------------------------------------------------------------------- bsf data synth
def _synth(out: Path, subjects: int, *flags) -> int:
    return main(["data", "synth", "--dataset", "brats", "--subjects", str(subjects), "--out", str(out), "--spacing", "8",
                 "--seed", "1", *flags])


def test_synth_rerun_refuses_existing_subjects_unless_force(tmp_path, capsys):
    out = tmp_path / "brats"
    assert _synth(out, 1) == 0
    capsys.readouterr()  # its progress bar
    before = _snapshot(out)
    for subjects in (1, 2):  # the same set again, or a larger one that includes it
        assert _synth(out, subjects, "--seed", "2") == 2
        err = one_line_error(capsys, out, out / "BraTS2021_00000", "--force")
        assert f"1 of the {subjects} brats subject(s)" in err
        assert _snapshot(out) == before
    assert not (out / "BraTS2021_00001").exists(), "a subject was written before the refusal"
    assert _synth(out, 2, "--seed", "2", "--force") == 0
    assert _snapshot(out) != before and (out / "BraTS2021_00001").is_dir()


@pytest.mark.parametrize("dataset", ["ukb", "brats", "atlas"])
@pytest.mark.parametrize("planted", ["a file of the subject", "its folder only", "a symbolic link as its folder"])
def test_synth_refuses_any_trace_of_a_subject(tmp_path, dataset, planted):
    out = tmp_path / "data"
    plan = subject_files(dataset, 1, out)
    if planted == "a file of the subject":
        plan.files[-1].parent.mkdir(parents=True)
        plan.files[-1].write_bytes(b"a real label")
    elif planted == "its folder only":
        plan.folders[-1].mkdir(parents=True)
    else:
        (tmp_path / "real_subject").mkdir()
        plan.folders[-1].parent.mkdir(parents=True, exist_ok=True)
        plan.folders[-1].symlink_to(tmp_path / "real_subject")
    before = _snapshot(tmp_path)
    with pytest.raises(OutputError, match=r"already holds 1 of the 2 .* --force") as error:
        synthesize(dataset, 2, out, spacing=8.0, replace=False)
    assert str(plan.folders[0]) in str(error.value) and _snapshot(tmp_path) == before
    assert len(check_synth_output(dataset, 2, out, replace=True)) == 2


def test_synth_takes_a_folder_with_other_files_and_never_writes_into_a_folder_in_the_way(tmp_path, capsys):
    out = tmp_path / "brats"
    out.mkdir()
    (out / "README.txt").write_text("mine")
    assert _synth(out, 1) == 0 and (out / "README.txt").read_text() == "mine"
    capsys.readouterr()
    blocked = tmp_path / "blocked"
    (blocked / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").mkdir(parents=True)
    assert _synth(blocked, 1, "--force") == 2
    one_line_error(capsys, blocked / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz", "is a folder")
    assert sorted(p.relative_to(blocked).as_posix() for p in blocked.rglob("*")) == \
        ["BraTS2021_00000", "BraTS2021_00000/BraTS2021_00000_seg.nii.gz"]  # nothing written


# ------------------------------------------------------------------------ bsf data check --write-clean
def _check(brats, *flags) -> int:
    return main(["data", "check", "--datalist", str(brats["datalist"]), "--headers-only", "--no-progress", *flags])


@pytest.mark.parametrize("flag", ["--write-clean", "--json"])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_data_check_never_writes_over_its_datalist(brats, tmp_path, capsys, monkeypatch, flag, spelling):
    output = _spelled(brats["datalist"], spelling, tmp_path / "here", monkeypatch)
    before = brats["datalist"].read_bytes()
    monkeypatch.setattr(bsf.data.check, "check_cases", _must_not_run)
    assert _check(brats, flag, str(output), "--force") == 2
    assert "is the input" in one_line_error(capsys, output, flag)
    assert brats["datalist"].read_bytes() == before


def test_data_check_never_writes_over_a_case_file(brats, tmp_path, capsys, monkeypatch):
    seg = brats["case"] / "BraTS2021_00000_seg.nii.gz"
    before = seg.read_bytes()
    monkeypatch.setattr(bsf.data.check, "check_cases", _must_not_run)
    for output in (seg, _spelled(seg, "hard link", tmp_path, monkeypatch)):
        assert _check(brats, "--write-clean", str(output), "--force") == 2
        one_line_error(capsys, output, "is the input", seg)
    assert seg.read_bytes() == before


def test_data_check_replaces_another_existing_file_only_with_force(brats, tmp_path, capsys, monkeypatch):
    clean = tmp_path / "clean.json"
    clean.write_text("an earlier clean list")
    real_check = bsf.data.check.check_cases
    monkeypatch.setattr(bsf.data.check, "check_cases", _must_not_run)
    assert _check(brats, "--write-clean", str(clean)) == 2
    one_line_error(capsys, clean, "already exists", "--force")
    assert clean.read_text() == "an earlier clean list"
    assert _check(brats, "--write-clean", str(clean), "--json", str(tmp_path / "x" / ".." / "clean.json"), "--force") == 2
    one_line_error(capsys, "are one file")
    monkeypatch.setattr(bsf.data.check, "check_cases", real_check)
    assert _check(brats, "--write-clean", str(clean), "--force") == 0
    assert sorted(c["id"] for c in json.loads(clean.read_text())["training"]) == ["BraTS2021_00000"]


# ------------------------------------------------------------------------------------- bsf data index
def _index(brats, out, *flags) -> int:
    return main(["data", "index", "--dataset", "brats", "--root", str(brats["root"]), "--out", str(out), *flags])


def test_data_index_rerun_needs_force(brats, tmp_path, capsys, monkeypatch):
    out = tmp_path / "brats.json"
    out.write_text("an earlier datalist")
    real_index = bsf.data.index.index_dataset
    monkeypatch.setattr(bsf.data.index, "index_dataset", _must_not_run)
    assert _index(brats, out) == 2
    one_line_error(capsys, out, "already exists", "--force")
    assert out.read_text() == "an earlier datalist"
    monkeypatch.setattr(bsf.data.index, "index_dataset", real_index)
    assert _index(brats, out, "--force") == 0
    assert len(json.loads(out.read_text())["training"]) == 2


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_data_index_never_writes_over_its_folds_file_or_a_case_file(brats, tmp_path, capsys, monkeypatch, spelling):
    folds = tmp_path / "folds" / "folds.json"
    folds.parent.mkdir()
    folds.write_text(json.dumps({"folds": [[0], [1]]}))
    seg = brats["case"] / "BraTS2021_00000_seg.nii.gz"
    before = {folds: folds.read_bytes(), seg: seg.read_bytes()}
    for target in (folds, seg):
        output = _spelled(target, spelling, tmp_path / f"here_{target.stem}", monkeypatch)
        assert _index(brats, output, "--folds-file", str(folds), "--force") == 2
        one_line_error(capsys, output, "is the input")
    assert {p: p.read_bytes() for p in before} == before


# ---------------------------------------------------------------------------------------- bsf predict
def _predict(brats, inputs, output, *flags) -> int:
    return main(["predict", "--model", str(brats["model"]), "--device", "cpu", "--no-progress",
                 "--input", *map(str, inputs), "--output", str(output), *flags])


@pytest.mark.parametrize("given", ["case folder", "image files", "named files"])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_predict_never_writes_over_the_case_label_even_with_force(brats, tmp_path, capsys, monkeypatch, given, spelling):
    case = brats["case"]
    seg = case / "BraTS2021_00000_seg.nii.gz"
    images = [case / f"BraTS2021_00000_{m}.nii.gz" for m in MODALITIES]
    inputs = {"case folder": [case], "image files": images, "named files": [f"{m}={p}" for m, p in zip(MODALITIES, images)]}[given]
    output = _spelled(seg, spelling, tmp_path / "out", monkeypatch)
    before = _snapshot(brats["root"])
    monkeypatch.setattr(bsf.predict, "load_finetuned", _must_not_run)
    assert _predict(brats, inputs, output, "--force") == 2
    assert "one of the case's own files" in one_line_error(capsys, output, seg, "even with --force")
    assert _snapshot(brats["root"]) == before


def test_predict_never_writes_over_an_image_that_is_not_an_input(brats, tmp_path, capsys, monkeypatch):
    """Two of the model's four channels given by name: the case's other images are still its own files."""
    case = brats["case"]
    t2 = case / "BraTS2021_00000_t2.nii.gz"
    before = t2.read_bytes()
    monkeypatch.setattr(bsf.predict, "load_finetuned", _must_not_run)
    inputs = [f"flair={case / 'BraTS2021_00000_flair.nii.gz'}", f"t1={case / 'BraTS2021_00000_t1.nii.gz'}"]
    assert _predict(brats, inputs, t2, "--force") == 2
    assert "one of the case's own files" in one_line_error(capsys, t2)
    assert t2.read_bytes() == before


def test_predict_replaces_an_earlier_prediction_beside_the_case_only_with_force(brats, capsys):
    earlier = brats["case"] / "BraTS2021_00000_pred.nii.gz"  # not a case file: a name no layout gives an image or label
    earlier.write_bytes(b"an earlier prediction")
    try:
        assert _predict(brats, [brats["case"]], earlier) == 2
        one_line_error(capsys, earlier, "already exists", "--force")
        assert earlier.read_bytes() == b"an earlier prediction"
        assert _predict(brats, [brats["case"]], earlier, "--force") == 0
        assert earlier.read_bytes()[:2] == b"\x1f\x8b"  # a gzipped NIfTI now
    finally:
        earlier.unlink()


# --------------------------------------------------------------------------------------- bsf evaluate
def _evaluate(brats, *flags) -> int:
    return main(["evaluate", "--model", str(brats["model"]), "--device", "cpu", "--no-progress",
                 "--datalist", str(brats["datalist"]), *flags])


@pytest.mark.parametrize("where", ["--out", "default folder"])
def test_evaluate_rerun_needs_force(brats, tmp_path, capsys, monkeypatch, where):
    out = tmp_path / "eval" if where == "--out" else brats["model"].parent / "evaluate_validation"
    flags = ["--out", str(out)] if where == "--out" else []
    out.mkdir()
    try:
        (out / "metrics.csv").write_text("earlier metrics")
        (out / "summary.json").write_text("earlier summary")
        real_load = bsf.predict.load_finetuned
        monkeypatch.setattr(bsf.predict, "load_finetuned", _must_not_run)
        assert _evaluate(brats, *flags) == 2
        one_line_error(capsys, out / "metrics.csv", out / "summary.json", "--force")
        (out / "summary.json").unlink()
        assert _evaluate(brats, *flags) == 2  # one left is enough
        one_line_error(capsys, out / "metrics.csv", "--force")
        assert (out / "metrics.csv").read_text() == "earlier metrics"
        if where == "--out":
            monkeypatch.setattr(bsf.predict, "load_finetuned", real_load)
            assert _evaluate(brats, *flags, "--force") == 0
            assert (out / "metrics.csv").read_text().startswith("case,") and (out / "summary.json").is_file()
    finally:
        if where != "--out":
            for path in out.iterdir():
                path.unlink()
            out.rmdir()


def test_evaluate_refuses_an_earlier_saved_prediction_and_its_own_inputs(brats, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    (out / "predictions").mkdir(parents=True)
    earlier = out / "predictions" / "BraTS2021_00001.nii.gz"
    earlier.write_bytes(b"an earlier prediction")
    monkeypatch.setattr(bsf.predict, "predict_case", _must_not_run)
    monkeypatch.setattr("bsf.evaluate.predict_case", _must_not_run)
    assert _evaluate(brats, "--out", str(out), "--save-predictions") == 2
    one_line_error(capsys, earlier, "already exists", "--force")
    assert earlier.read_bytes() == b"an earlier prediction"
    # the model's own folder as --out, with a weights-only model whose config is the summary.json there
    run = tmp_path / "run"
    run.mkdir()
    state = torch.load(brats["model"], weights_only=True)
    torch.save({"model": state["model"]}, run / "checkpoint_best.pt")
    (run / "summary.json").write_text(json.dumps({"config": state["config"]}))
    before = (run / "summary.json").read_bytes()
    assert main(["evaluate", "--model", str(run / "checkpoint_best.pt"), "--device", "cpu", "--no-progress",
                 "--datalist", str(brats["datalist"]), "--out", str(run), "--force"]) == 2
    one_line_error(capsys, run / "summary.json", "is the input")
    assert (run / "summary.json").read_bytes() == before
