"""Checkpoints that describe themselves: an exported encoder carries its channels' modalities and its stage, so the
next stage adapts it without ``model.pretrained_modalities``; where nothing says, the error names that setting."""

from __future__ import annotations

import pytest
import torch
import yaml

from bsf.config import load_config
from bsf.engine import build_model
from bsf.engine.stage_model import describe_checkpoint, pretrained_modalities
from bsf.errors import CheckpointError, ConfigError
from bsf.federation.export import export_global_encoder
from bsf.model import SSLModel, save_encoder
from bsf.model.provenance import META_KEY, ModelDescription

EMBED = "swinViT.patch_embed.proj.weight"
BRATS = ["flair", "t1ce", "t1", "t2"]


@pytest.fixture(scope="module")
def brats_ssl(tmp_path_factory):
    """A Stage 2 (BraTS, 4 channels) SSL model's weights saved three ways: as a training checkpoint with its
    config, as a federated global model with its job's run config beside it, and as a bare state dict."""
    torch.manual_seed(3)
    state = SSLModel("test", 4).state_dict()
    folder = tmp_path_factory.mktemp("s2")
    config = load_config("stage2_brats_test")
    training = folder / "run" / "checkpoint_last.pt"
    training.parent.mkdir()
    torch.save({"model": state, "config": config.to_dict(), "step": 1}, training)
    server = folder / "server" / "app_server"
    (server / "config").mkdir(parents=True)
    torch.save({"model": state}, server / "FL_global_model.pt")
    (server / "config" / "bsf_run.yaml").write_text(yaml.safe_dump(config.to_dict()))
    bare = folder / "bare.pt"
    torch.save({"state_dict": state}, bare)
    return state, training, server / "FL_global_model.pt", bare


@pytest.mark.parametrize("source", ["training", "global"])
def test_an_exported_encoder_carries_its_channels_and_stage(brats_ssl, tmp_path, source):
    state, training, global_model, _ = brats_ssl
    out = export_global_encoder(training if source == "training" else global_model, tmp_path / "enc.pt")
    saved = torch.load(out, weights_only=True)
    assert saved[META_KEY] == {"modalities": BRATS, "kind": "ssl", "dataset": "brats"}
    assert torch.equal(saved["state_dict"][EMBED], state[EMBED])


def test_stage3_adapts_a_stage2_encoder_without_being_told(brats_ssl, tmp_path):
    """The test-size Stage 3 preset defaults to Stage 1's channels (t1, flair); the encoder says it has BraTS's."""
    state, training, _, _ = brats_ssl
    encoder = export_global_encoder(training, tmp_path / "enc.pt")
    config = load_config("stage3_brats_test", [f"model.pretrained={encoder}", "data.modalities=[t1, flair]", "model.in_channels=2"])
    assert list(config.model.pretrained_modalities) == ["t1", "flair"]
    assert pretrained_modalities(config) == BRATS
    model = build_model(config).state_dict()
    assert torch.equal(model[EMBED][:, 0], state[EMBED][:, 2])  # t1 <- the encoder's t1 channel
    assert torch.equal(model[EMBED][:, 1], state[EMBED][:, 0])  # flair <- its flair channel


def test_a_global_model_is_described_by_the_run_config_beside_it(brats_ssl):
    _, _, global_model, bare = brats_ssl
    description, where = describe_checkpoint(global_model)
    assert description == ModelDescription(tuple(BRATS), "ssl", "brats") and "bsf_run.yaml" in where
    assert describe_checkpoint(bare) == (None, "")


def test_an_undescribed_encoder_that_does_not_fit_names_the_setting(brats_ssl, tmp_path):
    _, _, _, bare = brats_ssl
    config = load_config("stage3_brats_test", [f"model.pretrained={bare}"])
    with pytest.raises(ConfigError) as err:
        build_model(config)
    text = str(err.value)
    assert str(bare) in text and "4 input channels" in text
    assert "model.pretrained_modalities" in text and "--pretrained-stage" in text


def test_a_stage1_encoder_still_adapts_to_brats_by_its_own_description(tmp_path):
    torch.manual_seed(1)
    source = SSLModel("test", 2)
    path = save_encoder(source, tmp_path / "s1.pt", description=ModelDescription(("t1", "flair"), "ssl", "ukb"))
    config = load_config("stage3_brats_test", [f"model.pretrained={path}", "model.pretrained_modalities=[flair, t1]"])
    model = build_model(config).state_dict()  # the file's own description wins over a wrong setting
    assert torch.equal(model[EMBED][:, 2], source.state_dict()[EMBED][:, 0])  # BraTS t1 <- Stage 1 t1


@pytest.mark.parametrize("meta", [{"modalities": [], "kind": "ssl", "dataset": "ukb"}, {"modalities": ["t1"], "kind": "other", "dataset": "ukb"}, "t1"])
def test_a_damaged_description_is_refused_by_name(tmp_path, meta):
    path = tmp_path / "enc.pt"
    torch.save({"state_dict": SSLModel("test", 1).state_dict(), META_KEY: meta}, path)
    with pytest.raises(CheckpointError, match=f"{path}.*{META_KEY}"):
        describe_checkpoint(path)


def test_a_saved_global_model_carries_its_description(tmp_path):
    """What the server persists each round says its channels itself, wherever the file is copied to."""
    from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable

    from bsf.fl.persistor import BSFModelPersistor
    from tests.nvflare_fakes import site_context

    persistor = BSFModelPersistor(run_config="stage2_brats_test", scope="encoder")
    persistor._ckpt_save_path = str(tmp_path / "FL_global_model.pt")
    ctx = site_context(tmp_path, app=tmp_path)
    sent = persistor.load_model(ctx)[ModelLearnableKey.WEIGHTS]
    persistor.save_model(make_model_learnable(weights=sent, meta_props={}), ctx)
    copied = tmp_path / "elsewhere" / "stage2.pt"
    copied.parent.mkdir()
    copied.write_bytes((tmp_path / "FL_global_model.pt").read_bytes())
    assert describe_checkpoint(copied) == (ModelDescription(tuple(BRATS), "ssl", "brats"), f"checkpoint {copied}")
