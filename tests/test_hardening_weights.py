"""Hostile weight files: no code runs from a checkpoint, and NaN/Inf weights are refused wherever they enter.

Every ``.pt`` a user or another site can place (a resume checkpoint, ``model.pretrained``, the server's
previous-stage model, ``bsf predict --model``, ``bsf export --model``) is read through
:func:`bsf.model.read_checkpoint` (``weights_only=True``) and checked finite, naming the file and the tensor.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bsf.cli import main
from bsf.config import load_config
from bsf.errors import CheckpointError
from bsf.model import build_swin_unetr, read_checkpoint
from bsf.model.pretrained import load_pretrained_encoder


def _run_planted_code(marker: str) -> None:
    """What a planted pickle would run on load: it leaves a file behind, so a test can tell it ran."""
    Path(marker).write_text("code from a checkpoint ran")


class _Planted:
    """Pickles as a call to :func:`_run_planted_code` (what a malicious checkpoint does with ``__reduce__``)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_run_planted_code, (self.marker,))


def _plant(path: Path, marker: Path, where: str) -> Path:
    """A file that looks like a checkpoint and runs code when unpickled with ``weights_only=False``."""
    payload: dict = {"version": 1, "step": 1, "model": {"w": torch.zeros(1)}}
    payload[where] = _Planted(marker)
    torch.save(payload, path)
    return path


def _encoder_with(value: float, size: str = "test", in_channels: int = 2) -> dict[str, torch.Tensor]:
    state = build_swin_unetr(size, in_channels, 1).state_dict()
    state = {k: v.clone() for k, v in state.items() if k.startswith("swinViT.")}
    state["swinViT.layers1.0.blocks.0.attn.qkv.weight"].view(-1)[3] = value
    return state


@pytest.mark.parametrize("where", ["optimizer", "best", "config"])
def test_bsf_train_resume_refuses_a_planted_checkpoint_without_running_it(ukb_root, tmp_path, capsys, where):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"
    _plant(out / "checkpoint_last.pt", marker, where)
    code = main(["train", "--config", "stage1_test", f"data.root={ukb_root}", f"train.output_dir={out}",
                 "train.progress=false", "train.steps=1", "--resume"])
    assert code == 2
    err = capsys.readouterr().err
    assert "checkpoint_last.pt" in err and "cannot be read safely" in err
    assert not marker.exists(), "code from the checkpoint ran"


@pytest.mark.parametrize("reader", ["read_checkpoint", "predict", "export", "pretrained"])
def test_every_weights_reader_refuses_a_planted_file(tmp_path, capsys, reader):
    marker = tmp_path / "pwned"
    planted = _plant(tmp_path / "model.pt", marker, "state_dict")
    if reader == "read_checkpoint":
        with pytest.raises(CheckpointError, match="model.pt"):
            read_checkpoint(planted)
    elif reader == "predict":
        assert main(["predict", "--model", str(planted), "--config", "stage3_brats_test", "--input", str(planted),
                     "--output", str(tmp_path / "seg.nii.gz")]) == 2
    elif reader == "export":
        assert main(["export", "--model", str(planted), "--out", str(tmp_path / "enc.pt")]) == 2
        assert not (tmp_path / "enc.pt").exists()
    else:
        with pytest.raises(CheckpointError, match="model.pt"):
            load_pretrained_encoder(build_swin_unetr("test", 2, 1), planted, ["t1", "flair"], ["t1", "flair"])
    assert not marker.exists(), "code from the checkpoint ran"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_model_pretrained_with_non_finite_weights_is_refused_naming_file_and_tensor(tmp_path, value):
    path = tmp_path / "stage1_global.pt"
    torch.save({"model": _encoder_with(value)}, path)
    with pytest.raises(CheckpointError) as info:
        load_pretrained_encoder(build_swin_unetr("test", 4, 3), path, ["t1", "flair"], ["flair", "t1ce", "t1", "t2"])
    message = str(info.value)
    assert "stage1_global.pt" in message and "swinViT.layers1.0.blocks.0.attn.qkv.weight" in message
    assert "NaN/Inf" in message and "(1 of" in message


def test_the_servers_previous_stage_model_with_nan_is_refused(tmp_path):
    from bsf.federation.initial_model import initial_global_weights

    path = tmp_path / "FL_global_model.pt"
    torch.save({"model": _encoder_with(math.nan)}, path)
    config = load_config("stage2_brats_test")
    with pytest.raises(CheckpointError) as info:
        initial_global_weights(config, "encoder", pretrained=str(path), environ={})
    assert "FL_global_model.pt" in str(info.value) and "swinViT.layers1.0.blocks.0.attn.qkv.weight" in str(info.value)


def test_bsf_export_refuses_a_global_model_with_inf(tmp_path, capsys):
    model = tmp_path / "FL_global_model.pt"
    torch.save({"model": _encoder_with(math.inf)}, model)
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "encoder.pt")]) == 2
    err = capsys.readouterr().err
    assert "FL_global_model.pt" in err and "qkv.weight" in err and "NaN/Inf" in err
    assert not (tmp_path / "encoder.pt").exists()


def test_bsf_predict_refuses_a_fine_tuned_model_with_nan(tmp_path):
    from bsf.predict import load_finetuned

    config = load_config("stage3_brats_test")
    network = build_swin_unetr(config.model.size, config.model.in_channels, config.model.out_channels)
    state = {k: v.clone() for k, v in network.state_dict().items()}
    state["out.conv.conv.weight"].view(-1)[0] = math.nan
    path = tmp_path / "checkpoint_best.pt"
    torch.save({"model": state, "config": config.to_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        load_finetuned(path)
    assert "checkpoint_best.pt" in str(info.value) and "out.conv.conv.weight" in str(info.value)


def test_a_resume_checkpoint_with_nan_weights_is_refused(stage1_config, tmp_path):
    from bsf.engine import Engine

    engine = Engine(stage1_config("train.steps=1"))
    engine.save_checkpoint(tmp_path / "checkpoint_last.pt")
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)
    first = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][first].view(-1)[0] = math.nan
    torch.save(state, tmp_path / "checkpoint_last.pt")
    with pytest.raises(CheckpointError, match=f"checkpoint_last.pt.*{first}"):
        engine.load_checkpoint(tmp_path / "checkpoint_last.pt")
