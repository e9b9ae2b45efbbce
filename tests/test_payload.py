"""What a round exchanges (no constant buffers, both directions, saved model still complete) and the transfer timeouts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bsf.config import FederationConfig
from bsf.engine import load_config
from bsf.errors import CheckpointError, ConfigError
from bsf.federation.payload import round_bytes, transfer_timeouts
from bsf.federation.site_trainer import SiteTrainer
from tests.nvflare_fakes import site_context

BUFFER = "swinViT.layers1.0.blocks.0.attn.relative_position_index"


def test_round_bytes_leave_out_every_relative_position_index():
    # test size: depths (2, 2, 2, 2), window 4 -> 8 blocks x (4^3)^2 = 32768 index elements in the encoder
    config = load_config("stage1_test")
    from bsf.model import SSLModel, select_weights

    encoder = select_weights(SSLModel(config.model.size, config.model.in_channels).state_dict(), "encoder")
    total = sum(v.numel() for v in encoder.values())
    down, up = round_bytes(config, "encoder", "float32")
    assert down == up == 4 * (total - 8 * 64**2)
    assert round_bytes(config, "encoder", "float16") == (down, down // 2)


def test_small_stage3_round_and_its_timeouts_match_the_hand_computation():
    # Small SwinUNETR, 4 -> 3 channels: 65,488,641 state-dict elements, 12 blocks x (7^3)^2 = 1,411,788 of them indices
    down, up = round_bytes(load_config("stage3_brats"), "all", "float32")
    assert down == up == 4 * (65_488_641 - 12 * 343**2) == 256_307_412
    fast = transfer_timeouts(down, up, uplink_mbit=100)
    assert fast.upload_seconds == pytest.approx(256_307_412 * 8 / 100e6)  # 20.5 s
    assert (fast.submit, fast.download) == (300.0, 300.0)  # NVFlare's own 300 s suffice at 100 Mbit/s
    slow = transfer_timeouts(down, up, uplink_mbit=10)
    assert slow.submit == pytest.approx(2 * 205.0459296)


def test_a_round_across_tasks_sends_every_head_down_and_a_sites_own_head_up():
    # stage3_all_test: a 4-channel SwinUNETR body, a 3-channel BraTS head and a 1-channel ATLAS head. Down: the body
    # and both heads; up: the body and the larger (BraTS) head, i.e. the BraTS-only model's round plus the ATLAS head.
    from bsf.federation.task_heads import for_task
    from bsf.model import build_swin_unetr

    config = load_config("stage3_all_test")
    brats_model = for_task(config, "brats")  # the plain BraTS SwinUNETR of the same body
    config.federation = FederationConfig(scope="all", tasks=["brats", "atlas"])  # as the job's run config sets it
    brats_only, _ = round_bytes(brats_model, "all", "float32")
    m = config.model
    atlas_head = build_swin_unetr(m.size, m.in_channels, 1).out.conv.conv
    atlas_bytes = 4 * (atlas_head.weight.numel() + atlas_head.bias.numel())
    assert round_bytes(config, "all", "float32") == (brats_only + atlas_bytes, brats_only)


def test_uplink_must_be_positive_and_names_the_key():
    with pytest.raises(ConfigError, match="federation.uplink_mbit"):
        FederationConfig(uplink_mbit=0)
    raw = {"train": {"steps": 12}, "federation": {"uplink_mbit": 100}}  # an int from YAML is a valid speed
    assert load_config(raw).federation.uplink_mbit == 100


class _Engine:
    """Two weights and a constant buffer, as ``Engine.get_weights('encoder')`` returns them."""

    num_train_cases = 1

    def __init__(self):
        self.config = load_config("stage1_test")  # as the real Engine has it
        self.step = 0
        self.weights = {"swinViT.w": np.zeros(3, np.float32), BUFFER: np.arange(4, dtype=np.float32)}

    def get_weights(self, scope):
        return {k: v.copy() for k, v in self.weights.items()}

    def set_weights(self, weights):
        for k, v in weights.items():
            self.weights[k] = np.asarray(v, np.float32).copy()

    def train_steps(self, n):
        self.weights["swinViT.w"] = self.weights["swinViT.w"] + 1
        self.step += n
        return [{"step": self.step, "loss": 1.0}]


def test_site_neither_sends_nor_expects_constant_buffers():
    settings = FederationConfig(local_steps=1, validate_global=False, resume=False)
    trainer = SiteTrainer(_Engine(), settings)
    result = trainer.train({"swinViT.w": np.zeros(3, np.float32)}, 0)
    assert set(result.params) == {"swinViT.w"}
    np.testing.assert_array_equal(result.params["swinViT.w"], np.ones(3))
    assert set(trainer.local_model()) == {"swinViT.w"}
    # a global model that still carries them (an older server) trains; the buffer stays as the model built it
    result = trainer.train({"swinViT.w": np.zeros(3, np.float32), BUFFER: np.zeros(4, np.float32)}, 1)
    np.testing.assert_array_equal(trainer.engine.weights[BUFFER], np.arange(4))
    with pytest.raises(CheckpointError, match="1 missing"):  # but a weight that is not there is an error
        trainer.train({}, 2)


def test_server_sends_no_buffers_and_saves_a_complete_model(tmp_path):
    from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable

    from bsf.fl.persistor import BSFModelPersistor
    from bsf.model import SSLModel, import_weights

    persistor = BSFModelPersistor(run_config="stage1_test", scope="encoder")
    persistor._ckpt_save_path = str(tmp_path / "FL_global_model.pt")
    ctx = site_context(tmp_path, app=tmp_path)
    sent = persistor.load_model(ctx)[ModelLearnableKey.WEIGHTS]
    assert sent and not [k for k in sent if k.endswith("relative_position_index")]
    after_round = {k: v + 1 for k, v in sent.items()}  # the aggregated global model of round 0
    persistor.save_model(make_model_learnable(weights=after_round, meta_props={}), ctx)

    model = SSLModel("test", 2)  # what `bsf predict` / export / resume do with the file: a strict import
    report = import_weights(model, tmp_path / "FL_global_model.pt", scope="encoder", strict=True)
    assert report.ok
    state = model.state_dict()
    key = "swinViT.patch_embed.proj.weight"
    np.testing.assert_allclose(state[key].numpy(), after_round[key])
    assert torch.equal(state[BUFFER], SSLModel("test", 2).state_dict()[BUFFER])


def test_recipe_writes_timeouts_from_the_uplink(tmp_path):
    from bsf.fl.jobs import COMMITTED_JOBS, export_job

    spec = COMMITTED_JOBS["stage1"].with_federation(uplink_mbit=0.01)  # 2.1 MB at 10 kbit/s: 1690 s, x2 margin
    job = export_job(spec, tmp_path)
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    expected = 2 * 2_112_936 * 8 / 0.01e6
    assert client["submit_task_result_timeout"] == pytest.approx(expected)
    assert client["get_task_timeout"] == pytest.approx(expected)
