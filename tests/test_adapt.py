"""Tests for bsf.model.adapt: input-channel adaptation of the patch embedding by modality name."""

from __future__ import annotations

import math

import pytest
import torch

from bsf.errors import CheckpointError, ConfigError
from bsf.io import atomic_torch_save
from bsf.model import (
    SSLModel,
    adapt_checkpoint,
    adapt_input_channels,
    build_swin_unetr,
    import_weights,
    normalize_checkpoint_keys,
    plan_channel_adaptation,
)
from bsf.model.adapt import ATLAS_MODALITIES, BRATS_MODALITIES, PATCH_EMBED_WEIGHT, STAGE1_MODALITIES

BIAS = "swinViT.patch_embed.proj.bias"
# 32^3 instead of 64^3 keeps the five encoder passes of this file around 3 s on 2 shared CPU
# cores; the test-size encoder (window 4) still runs every stage, shifted windows included.
SIDE = 32


def _fake_state(feature: int = 12, in_ch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        PATCH_EMBED_WEIGHT: torch.randn(feature, in_ch, 2, 2, 2, generator=g),
        BIAS: torch.randn(feature, generator=g),
        "swinViT.layers1.0.blocks.0.norm1.weight": torch.randn(feature, generator=g),
        "rotation_head.weight": torch.randn(4, 8, generator=g),
    }


@pytest.fixture(scope="module")
def stage1() -> SSLModel:
    torch.manual_seed(0)
    return SSLModel("test", 2).eval()


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {m: torch.randn(1, 1, SIDE, SIDE, SIDE, generator=g) for m in ("t1", "flair")}


def _encode(state: dict[str, torch.Tensor], in_ch: int, x: torch.Tensor) -> list[torch.Tensor]:
    model = SSLModel("test", in_ch).eval()
    import_weights(model, state, scope="encoder", strict=True)
    with torch.no_grad():
        return model.swinViT(x)


def _assert_same_outputs(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


# --- weights --------------------------------------------------------------------------------


def test_brats_mapping_copies_pretrained_filters_exactly():
    src = _fake_state()
    before = {k: v.clone() for k, v in src.items()}
    out = adapt_input_channels(src, STAGE1_MODALITIES, BRATS_MODALITIES, seed=0)
    w, w0 = out[PATCH_EMBED_WEIGHT], src[PATCH_EMBED_WEIGHT]
    assert w.shape == (12, 4, 2, 2, 2)
    assert torch.equal(w[:, 0], w0[:, 1])  # flair <- source channel 1
    assert torch.equal(w[:, 2], w0[:, 0])  # t1 <- source channel 0
    for key in src:  # every other key, the bias included, passes through as is
        if key != PATCH_EMBED_WEIGHT:
            assert out[key] is src[key]
    for key, value in before.items():  # the input is not modified
        assert torch.equal(src[key], value)


def test_plan_lists_copied_initialised_and_dropped_channels():
    brats = plan_channel_adaptation(STAGE1_MODALITIES, BRATS_MODALITIES, seed=3)
    assert brats.copied == [(0, 1, "flair", 1.0), (2, 0, "t1", 1.0)]
    assert brats.initialised == [(1, "t1ce"), (3, "t2")]
    assert brats.dropped == []
    atlas = plan_channel_adaptation(STAGE1_MODALITIES, ATLAS_MODALITIES)
    assert atlas.copied == [(0, 0, "t1", 1.0)] and atlas.initialised == []
    assert atlas.dropped == [(1, "flair")]
    summary = brats.summary()
    assert "1:t1ce Kaiming (seed 3" in summary and "0:flair <- source 1" in summary


def test_new_channels_are_kaiming_normal_and_deterministic_per_seed():
    src = _fake_state(feature=480)
    a = adapt_input_channels(src, STAGE1_MODALITIES, BRATS_MODALITIES, seed=7)[PATCH_EMBED_WEIGHT]
    b = adapt_input_channels(src, STAGE1_MODALITIES, BRATS_MODALITIES, seed=7)[PATCH_EMBED_WEIGHT]
    c = adapt_input_channels(src, STAGE1_MODALITIES, BRATS_MODALITIES, seed=8)[PATCH_EMBED_WEIGHT]
    assert torch.equal(a, b)
    new = a[:, [1, 3]]
    assert not torch.equal(new, c[:, [1, 3]])
    # kaiming_normal_ (a=0, fan_in) of the adapted conv: fan_in = 4 channels * 2*2*2.
    expected_std = math.sqrt(2.0 / (4 * 8))
    assert new.std().item() == pytest.approx(expected_std, rel=0.05)  # 7,680 draws: ~1 % error
    assert abs(new.mean().item()) < 0.05 * expected_std * 4
    # pretrained channels never depend on the seed
    assert torch.equal(a[:, [0, 2]], c[:, [0, 2]])


def test_identity_and_aliases():
    src = _fake_state()
    same = adapt_input_channels(src, ("T1w", "T2-FLAIR"), ("t1", "flair"))
    assert torch.equal(same[PATCH_EMBED_WEIGHT], src[PATCH_EMBED_WEIGHT])
    canon = adapt_input_channels(src, STAGE1_MODALITIES, BRATS_MODALITIES, seed=1)
    alias = adapt_input_channels(src, ("t1", "t2f"), ("FLAIR", "t1Gd", "T1W", "t2w"), seed=1)
    assert torch.equal(canon[PATCH_EMBED_WEIGHT], alias[PATCH_EMBED_WEIGHT])


def test_unknown_modalities_are_named():
    with pytest.raises(ConfigError) as info:
        adapt_input_channels(_fake_state(), STAGE1_MODALITIES, ("t1", "dwi", "pd"))
    assert "'dwi'" in str(info.value) and "'pd'" in str(info.value)


def test_no_overlap_is_refused_unless_allowed():
    src = _fake_state()
    with pytest.raises(ConfigError, match="nothing pretrained"):
        adapt_input_channels(src, STAGE1_MODALITIES, ("t2", "t1ce"))
    out = adapt_input_channels(src, STAGE1_MODALITIES, ("t2", "t1ce"), allow_no_overlap=True)
    assert out[PATCH_EMBED_WEIGHT].shape[1] == 2


def test_inconsistent_inputs_fail_loudly():
    src = _fake_state()
    with pytest.raises(ConfigError, match="3 source modalities"):
        adapt_input_channels(src, ("t1", "flair", "t2"), ATLAS_MODALITIES)
    with pytest.raises(ConfigError, match="repeat"):
        adapt_input_channels(_fake_state(in_ch=2), ("t1", "T1w"), ATLAS_MODALITIES)
    with pytest.raises(CheckpointError, match="normalize_checkpoint_keys"):
        adapt_input_channels({"module.patch_embed.proj.weight": src[PATCH_EMBED_WEIGHT]}, STAGE1_MODALITIES, ("t1",))
    with pytest.raises(ConfigError):
        adapt_input_channels(src, STAGE1_MODALITIES, ("t1",), duplicate="mean")


# --- the encoder's output -------------------------------------------------------------------


def test_brats_encoder_equals_stage1_when_new_channels_are_zero(stage1, images):
    state = stage1.state_dict()
    adapted = adapt_input_channels(state, STAGE1_MODALITIES, BRATS_MODALITIES, seed=0)
    zero = torch.zeros_like(images["t1"])
    with torch.no_grad():
        expected = stage1.swinViT(torch.cat([images["t1"], images["flair"]], 1))
    got = _encode(adapted, 4, torch.cat([images["flair"], zero, images["t1"], zero], 1))
    _assert_same_outputs(got, expected)


def test_atlas_encoder_equals_stage1_with_flair_zero(stage1, images):
    adapted = adapt_input_channels(stage1.state_dict(), STAGE1_MODALITIES, ATLAS_MODALITIES)
    with torch.no_grad():
        expected = stage1.swinViT(torch.cat([images["t1"], torch.zeros_like(images["t1"])], 1))
    _assert_same_outputs(_encode(adapted, 1, images["t1"]), expected)
    # and the single-modality mode (T1 in both channels) reproduces the same representation
    single = adapt_input_channels(stage1.state_dict(), STAGE1_MODALITIES, ("t1", "t1"))
    w, w0 = single[PATCH_EMBED_WEIGHT], stage1.state_dict()[PATCH_EMBED_WEIGHT]
    assert torch.equal(w[:, 0], w0[:, 0] * 0.5) and torch.equal(w[:, 1], w0[:, 0] * 0.5)
    _assert_same_outputs(_encode(single, 2, images["t1"].repeat(1, 2, 1, 1, 1)), expected)


def test_repetition_one_to_two_channels_and_copy_mode():
    src = _fake_state(in_ch=1)
    split = adapt_input_channels(src, ("t1",), ("t1", "t1"))[PATCH_EMBED_WEIGHT]
    copy = adapt_input_channels(src, ("t1",), ("t1", "t1"), duplicate="copy")[PATCH_EMBED_WEIGHT]
    w0 = src[PATCH_EMBED_WEIGHT][:, 0]
    assert torch.equal(split.sum(1), w0)  # response to a duplicated input unchanged
    assert torch.equal(copy[:, 0], w0) and torch.equal(copy[:, 1], w0)


# --- checkpoint files -----------------------------------------------------------------------


def test_adapt_checkpoint_writes_a_loadable_encoder(stage1, tmp_path):
    source = tmp_path / "stage1.pt"
    # a DDP-style checkpoint, as the public code writes it
    atomic_torch_save({"state_dict": {f"module.{k}": v for k, v in stage1.state_dict().items()}}, source)
    out = tmp_path / "adapted" / "brats_encoder.pt"
    report = adapt_checkpoint(source, out, ("T1w", "FLAIR"), BRATS_MODALITIES, seed=5)
    assert report.initialised == [(1, "t1ce"), (3, "t2")] and report.init_std == pytest.approx(0.25)
    saved = normalize_checkpoint_keys(out)
    assert all(k.startswith("swinViT.") for k in saved)
    assert torch.equal(saved[PATCH_EMBED_WEIGHT][:, 2], stage1.state_dict()[PATCH_EMBED_WEIGHT][:, 0])
    unetr = build_swin_unetr("test", 4, 3)
    assert import_weights(unetr, out, scope="encoder", strict=True).ok
    again = tmp_path / "again.pt"
    adapt_checkpoint(source, again, STAGE1_MODALITIES, BRATS_MODALITIES, seed=5)
    assert torch.equal(normalize_checkpoint_keys(again)[PATCH_EMBED_WEIGHT], saved[PATCH_EMBED_WEIGHT])
    with pytest.raises(ConfigError, match="stage1.pt"):
        adapt_checkpoint(source, tmp_path / "x.pt", ("t1", "flair", "t2"), BRATS_MODALITIES)
    assert not (tmp_path / "x.pt").exists()
