"""The `bsf` command as a user meets it: outputs, summaries, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from bsf.cli import main
from bsf.model import SSLModel, import_weights


def test_model_info_prints_paper_counts(capsys):
    assert main(["model", "info", "--size", "small", "--in-channels", "4", "--out-channels", "3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["total_parameters"] == 64_076_853
    assert info["encoder_parameters"] == 9_948_066


def test_train_writes_summary_checkpoints_and_resumes(ukb_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", "stage1_test", f"data.root={ukb_root}", f"train.output_dir={out}", "train.progress=false"]
    assert main([*args, "train.steps=2", "train.val_every=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in summary["train"]] == [1, 2]
    assert set(summary["train"][0]) >= {"loss", "rotation", "contrastive", "reconstruction", "lr"}
    assert summary["validation"][0]["val_reconstruction_l1"] > 0
    assert (out / "checkpoint_last.pt").is_file() and (out / "checkpoint_best.pt").is_file()
    assert list((out / "tb").iterdir()), "no TensorBoard events"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"

    assert main([*args, "train.steps=3", "--resume"]) == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in resumed["train"]] == [1, 2, 3]  # the whole loss curve, not only the new step
    assert resumed["train"][:2] == summary["train"] and resumed["steps_this_run"] == 1
    assert [v["step"] for v in resumed["validation"]] == [2, 3]
    assert resumed["validation"][0] == summary["validation"][0]


def test_resume_keeps_only_the_records_the_checkpoint_covers(tmp_path):
    """A crash after the run log was written but before the checkpoint: the steps past the checkpoint run again."""
    from bsf.errors import CheckpointError
    from bsf.train import RunLog

    path = tmp_path / "run_log.json"
    RunLog([{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)], [{"step": 2, "val_loss": 0.5}, {"step": 4, "val_loss": 0.4}]).save(path)
    kept = RunLog.up_to(path, 2)
    assert [r["step"] for r in kept.steps] == [1, 2] and kept.validations == [{"step": 2, "val_loss": 0.5}]
    assert RunLog.up_to(tmp_path / "none.json", 2) == RunLog()

    path.write_text('{"steps": 3}')
    with pytest.raises(CheckpointError, match="run_log.json"):
        RunLog.up_to(path, 2)


def test_export_writes_an_encoder_that_imports_exactly(ukb_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", "stage1_test", f"data.root={ukb_root}", f"train.output_dir={out}", "train.steps=1", "train.progress=false"]) == 0
    encoder = tmp_path / "encoder.pt"
    assert main(["export", "--model", str(out / "checkpoint_best.pt"), "--out", str(encoder)]) == 0
    trained = torch.load(out / "checkpoint_best.pt", weights_only=True)["model"]
    fresh = SSLModel("test", 2)
    report = import_weights(fresh, encoder, scope="encoder")
    assert report.ok and not report.missing
    for key, value in fresh.state_dict().items():
        if key.startswith("swinViT."):
            assert torch.equal(value, trained[key]), key


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["train.stepz=3"], "train.stepz"),
        (["data.root=/nonexistent/ukb"], "/nonexistent/ukb"),
        (["optim.lr=fast"], "optim.lr"),
    ],
)
def test_user_errors_are_one_line_without_traceback(argv_tail, message, tmp_path, capsys):
    code = main(["train", "--config", "stage1_test", f"train.output_dir={tmp_path / 'run'}", *argv_tail])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_output_dir_that_is_a_file_is_refused(ukb_root, tmp_path, capsys):
    blocker = tmp_path / "run"
    blocker.write_text("not a folder")
    code = main(["train", "--config", "stage1_test", f"data.root={ukb_root}", f"train.output_dir={blocker}"])
    assert code == 2 and str(blocker) in capsys.readouterr().err


def test_synth_into_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "x"
    blocker.write_text("")
    assert main(["data", "synth", "--dataset", "ukb", "--subjects", "1", "--out", str(blocker)]) == 2
    assert str(blocker) in capsys.readouterr().err
