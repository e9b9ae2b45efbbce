"""Tests for bsf.model: sizes, the SSL model, and encoder weight import/export."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pytest
import torch
from torch import nn

from bsf.errors import BSFError, CheckpointError, ConfigError
from bsf.io import atomic_torch_save
from bsf.model import (
    ENCODER_PREFIX,
    MODEL_SIZES,
    ImportReport,
    InputShapeError,
    SSLModel,
    SSLOutput,
    build_swin_unetr,
    count_parameters,
    export_encoder,
    get_size,
    import_weights,
    normalize_checkpoint_keys,
    save_encoder,
    select_weights,
)

IN_CH = 2


def _ssl(seed: int, in_channels: int = IN_CH) -> SSLModel:
    torch.manual_seed(seed)
    return SSLModel("test", in_channels)


def _unetr(seed: int, in_channels: int = IN_CH) -> nn.Module:
    torch.manual_seed(seed)
    return build_swin_unetr("test", in_channels, 3)


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    """Give every float tensor (incl. LayerNorm, biases) distinct random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(ENCODER_PREFIX)}


def _assert_equal(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def _assert_all_differ(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Precondition: float weights differ before an import, so equality afterwards means something."""
    same = [k for k, v in expected.items() if v.is_floating_point() and torch.equal(actual[k], v)]
    assert not same, same


# --- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "total", "encoder"),
    [("tiny", 62_191_941, 8_063_154), ("small", 64_076_853, 9_948_066), ("big", 69_731_589, 15_602_802)],
)
def test_paper_parameter_counts(size: str, total: int, encoder: int) -> None:
    model = build_swin_unetr(size, 4, 3)
    assert count_parameters(model) == total
    assert count_parameters(model.swinViT) == encoder


def test_sizes_table() -> None:
    assert {n: (s.feature_size, s.depths, s.num_heads, s.window_size) for n, s in MODEL_SIZES.items()} == {
        "tiny": (48, (2, 2, 2, 2), (3, 6, 12, 24), 7),
        "small": (48, (2, 2, 6, 2), (3, 6, 12, 24), 7),
        "big": (48, (2, 2, 18, 2), (3, 6, 12, 24), 7),
        "test": (12, (2, 2, 2, 2), (3, 6, 12, 24), 4),
    }
    assert get_size("small") is MODEL_SIZES["small"]


def test_get_size_unknown_lists_valid_sizes() -> None:
    with pytest.raises(ConfigError) as info:
        get_size("huge")
    assert "huge" in str(info.value)
    for name in MODEL_SIZES:
        assert name in str(info.value)


def test_build_swin_unetr_options() -> None:
    model = build_swin_unetr("test", 1, 2, dropout=0.1, use_checkpoint=True)
    assert model.swinViT.pos_drop.p == pytest.approx(0.1)
    assert model.swinViT.layers1[0].blocks[0].use_checkpoint is True
    assert model.swinViT.patch_embed.proj.in_channels == 1
    assert model.out.conv.conv.out_channels == 2
    with pytest.raises(ConfigError):
        build_swin_unetr("test", 1, 2, dropout=1.5)
    with pytest.raises(ConfigError):
        build_swin_unetr("test", 0, 2)


def test_count_parameters_trainable_only() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))
    model[0].requires_grad_(False)
    assert count_parameters(model) == 16 + 25
    assert count_parameters(model, trainable_only=True) == 25


# --- SSL model ---------------------------------------------------------------------------


def test_ssl_forward_shapes() -> None:
    model = _ssl(0)
    out = model(torch.randn(2, IN_CH, 64, 64, 64))
    assert isinstance(out, SSLOutput)
    assert out.rotation_logits.shape == (2, 4)
    assert out.contrastive.shape == (2, 512)
    assert out.reconstruction.shape == (2, IN_CH, 64, 64, 64)


def test_ssl_forward_non_cubic_custom_dim() -> None:
    torch.manual_seed(0)
    model = SSLModel("test", 1, contrastive_dim=16)
    out = model(torch.randn(1, 1, 64, 96, 64))
    assert out.contrastive.shape == (1, 16)
    assert out.reconstruction.shape == (1, 1, 64, 96, 64)


def test_ssl_heads_read_tokens_0_and_1() -> None:
    model = _ssl(1).eval()
    x = torch.randn(2, IN_CH, 64, 64, 64)
    with torch.no_grad():
        out = model(x)
        bottleneck = model.swinViT(x, normalize=True)[4]
        assert bottleneck.shape == (2, 16 * 12, 2, 2, 2)
        tokens = bottleneck.flatten(2).transpose(1, 2)
        assert torch.allclose(out.rotation_logits, model.rotation_head(tokens[:, 0]))
        assert torch.allclose(out.contrastive, model.contrastive_head(tokens[:, 1]))
        assert torch.allclose(out.reconstruction, model.conv(bottleneck))


def test_ssl_decoder_layout() -> None:
    model = SSLModel("tiny", 4)  # feature_size 48 -> bottleneck 768
    convs = {name: m for name, m in model.conv.named_children() if isinstance(m, nn.Conv3d)}
    assert list(convs) == ["0", "4", "8", "12", "16", "20"]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs.values()] == [
        (768, 384, (3, 3, 3)),
        (384, 192, (3, 3, 3)),
        (192, 96, (3, 3, 3)),
        (96, 48, (3, 3, 3)),
        (48, 48, (3, 3, 3)),
        (48, 4, (1, 1, 1)),
    ]
    kinds = [type(m).__name__ for m in model.conv][:4]
    assert kinds == ["Conv3d", "InstanceNorm3d", "LeakyReLU", "Upsample"]
    assert model.conv[3].scale_factor == 2 and model.conv[3].mode == "trilinear"
    assert (model.rotation_head.in_features, model.rotation_head.out_features) == (768, 4)
    assert (model.contrastive_head.in_features, model.contrastive_head.out_features) == (768, 512)


@pytest.mark.parametrize(
    "shape",
    [(1, IN_CH, 48, 64, 64), (1, IN_CH, 32, 64, 64), (1, IN_CH + 1, 64, 64, 64), (IN_CH, 64, 64, 64)],
    ids=["not-div-32", "below-64", "channels", "rank"],
)
def test_ssl_rejects_bad_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(InputShapeError) as info:
        _ssl(0)(torch.zeros(shape))
    assert isinstance(info.value, ValueError) and isinstance(info.value, BSFError)
    assert str(tuple(shape)) in str(info.value)


@pytest.mark.parametrize(("size", "in_channels"), [("test", 2), ("tiny", 4)])
def test_ssl_encoder_matches_swinunetr(size: str, in_channels: int) -> None:
    ssl = SSLModel(size, in_channels).swinViT.state_dict()
    seg = build_swin_unetr(size, in_channels, 3).swinViT.state_dict()
    assert list(ssl) == list(seg)
    assert {k: tuple(v.shape) for k, v in ssl.items()} == {k: tuple(v.shape) for k, v in seg.items()}


# --- select / normalize ------------------------------------------------------------------


def test_select_weights() -> None:
    state = _ssl(0).state_dict()
    encoder = select_weights(state, "encoder")
    assert encoder and all(k.startswith("swinViT.") for k in encoder)
    assert set(encoder) == {k for k in state if k.startswith("swinViT.")}
    assert set(select_weights(state, "all")) == set(state)
    with pytest.raises(ConfigError, match="decoder"):
        select_weights(state, "decoder")


def test_normalize_wrappers_and_prefixes() -> None:
    w = torch.ones(2)
    assert normalize_checkpoint_keys({"model": {"swinViT.a.weight": w}}) == {"swinViT.a.weight": w}
    assert set(normalize_checkpoint_keys({"state_dict": {"module.out.conv.weight": w}, "epoch": 3})) == {
        "out.conv.weight"
    }
    assert set(normalize_checkpoint_keys({"_orig_mod.module.swinViT.x": w, "swin_vit.y": w})) == {
        "swinViT.x",
        "swinViT.y",
    }
    assert set(normalize_checkpoint_keys({"module.layers3.0.blocks.0.mlp.fc2.bias": w, "module.norm.bias": w})) == {
        "swinViT.layers3.0.blocks.0.mlp.linear2.bias",
        "norm.bias",
    }
    with pytest.raises(CheckpointError, match="both map to"):
        normalize_checkpoint_keys({"module.swinViT.x": w, "swinViT.x": w})
    with pytest.raises(CheckpointError, match="epoch"):
        normalize_checkpoint_keys({"swinViT.x": w, "epoch": 3})


def test_normalize_unreadable_files_name_the_path(tmp_path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt"):
        normalize_checkpoint_keys(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        normalize_checkpoint_keys(garbage)


# --- import ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["module.", ""], ids=["ddp", "plain"])
def test_public_ssl_checkpoint_imports_into_ssl_model(tmp_path, prefix: str) -> None:
    source = _perturb(_ssl(1), 11)
    expected = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / "bsf_public.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in expected.items()}, "epoch": 7}, path)

    target = _ssl(2)
    _assert_all_differ(target.state_dict(), expected)
    report = import_weights(target, path, scope="all")
    assert report.ok and not report.ignored
    assert sorted(report.loaded) == sorted(expected)
    _assert_equal(target.state_dict(), expected)


@pytest.mark.parametrize("prefix", ["module.", ""], ids=["ddp", "plain"])
def test_public_ssl_checkpoint_imports_encoder_into_swinunetr(tmp_path, prefix: str) -> None:
    source = _perturb(_ssl(1), 12)
    path = tmp_path / "bsf_public.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in source.state_dict().items()}}, path)
    expected = _encoder_state(source)

    target = _unetr(3)
    decoder_before = {k: v.clone() for k, v in target.state_dict().items() if not k.startswith("swinViT.")}
    _assert_all_differ(target.state_dict(), expected)
    report = import_weights(target, path)
    assert report.ok
    assert sorted(report.loaded) == sorted(expected)
    heads = [k for k in source.state_dict() if not k.startswith("swinViT.")]
    assert heads and sorted(report.ignored) == sorted(heads)
    _assert_equal(_encoder_state(target), expected)
    after = target.state_dict()
    for key, value in decoder_before.items():  # the decoder is not touched
        assert torch.equal(after[key], value), key


def test_monai_model_swinvit_layout_imports(tmp_path) -> None:
    """model_swinvit.pt: 'module.' + SwinTransformer key, old MLP names fc1/fc2, a final norm."""
    source = _perturb(_unetr(4), 13)
    expected = _encoder_state(source)
    legacy = {}
    for key, value in expected.items():
        key = key[len("swinViT.") :].replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        legacy["module." + key] = value
    assert any(".mlp.fc1." in k for k in legacy)
    legacy["module.norm.weight"] = torch.ones(16 * 12)
    legacy["module.rotation_head.weight"] = torch.zeros(4, 16 * 12)
    path = tmp_path / "model_swinvit.pt"
    torch.save({"state_dict": legacy, "epoch": 1}, path)

    target = _unetr(5)
    _assert_all_differ(target.state_dict(), expected)
    report = import_weights(target, path)
    assert report.ok
    assert sorted(report.ignored) == ["norm.weight", "rotation_head.weight"]
    _assert_equal(_encoder_state(target), expected)


def _broken_checkpoint(tmp_path):
    state = {k: v.clone() for k, v in _perturb(_ssl(1), 14).state_dict().items()}
    missing = "swinViT.layers2.0.blocks.1.attn.qkv.weight"
    bad_shape = "swinViT.patch_embed.proj.weight"
    extra = "swinViT.layers4.0.blocks.9.attn.qkv.weight"
    del state[missing]
    state[bad_shape] = torch.zeros(12, IN_CH + 1, 2, 2, 2)
    state[extra] = torch.zeros(3)
    path = tmp_path / "broken.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    return path, state, missing, bad_shape, extra


def test_mismatched_checkpoint_raises_naming_every_key(tmp_path) -> None:
    path, _, missing, bad_shape, extra = _broken_checkpoint(tmp_path)
    target = _unetr(6)
    before = _encoder_state(target)
    with pytest.raises(CheckpointError) as info:
        import_weights(target, path)
    message = str(info.value)
    for key in (missing, bad_shape, extra, str(path)):
        assert key in message
    assert "(12, 3, 2, 2, 2)" in message and "(12, 2, 2, 2, 2)" in message
    _assert_equal(_encoder_state(target), before)  # nothing was loaded


def test_non_strict_loads_matches_and_warns(tmp_path, caplog) -> None:
    path, state, missing, bad_shape, extra = _broken_checkpoint(tmp_path)
    target = _unetr(7)
    before = _encoder_state(target)
    with caplog.at_level(logging.WARNING, logger="bsf.model.checkpoint"):
        report = import_weights(target, path, strict=False)
    assert not report.ok
    assert (report.missing, report.unexpected) == ([missing], [extra])
    assert report.shape_mismatch == [(bad_shape, (12, 3, 2, 2, 2), (12, 2, 2, 2, 2))]
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    for key in (missing, bad_shape, extra):
        assert key in warnings
    after = _encoder_state(target)
    for key in (missing, bad_shape):
        assert torch.equal(after[key], before[key])
    for key in report.loaded:
        assert torch.equal(after[key], state[key]), key
    assert len(report.loaded) == len(before) - 2


def test_checkpoint_without_encoder_keys_fails_with_hint() -> None:
    state = {"decoder1.weight": torch.zeros(1), "out.conv.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match="no keys in scope 'encoder'.*decoder1, out"):
        import_weights(_unetr(0), state)


def test_import_rejects_unknown_scope_and_model_without_encoder() -> None:
    with pytest.raises(ConfigError):
        import_weights(_unetr(0), {}, scope="heads")
    with pytest.raises(CheckpointError, match="Linear"):
        import_weights(nn.Linear(2, 2), {"swinViT.x": torch.zeros(1)})


def test_import_report_summary() -> None:
    report = ImportReport(loaded=["a"], missing=["b"], shape_mismatch=[("c", (1,), (2,))], source="x.pt")
    assert not report.ok
    text = report.summary()
    assert "x.pt" in text and "b" in text and "c (1,) vs (2,)" in text
    assert ImportReport(loaded=["a"], ignored=["h"]).ok


# --- export / save -----------------------------------------------------------------------


def test_save_encoder_round_trip(tmp_path) -> None:
    source = _perturb(_ssl(1), 15)
    expected = _encoder_state(source)
    path = save_encoder(source, tmp_path / "out" / "encoder.pt")
    assert [p.name for p in path.parent.iterdir()] == ["encoder.pt"]  # no temp file left

    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["state_dict"]
    _assert_equal(raw["state_dict"], expected)

    for target in (_ssl(2), _unetr(3)):
        _assert_all_differ(target.state_dict(), expected)
        assert import_weights(target, path).ok
        _assert_equal(_encoder_state(target), expected)


def test_export_encoder_is_a_detached_copy() -> None:
    model = _ssl(1)
    exported = export_encoder(model)
    assert exported and all(k.startswith("swinViT.") for k in exported)
    assert all(v.device.type == "cpu" and not v.requires_grad for v in exported.values())
    key = "swinViT.patch_embed.proj.weight"
    exported[key].add_(1.0)
    assert not torch.equal(exported[key], model.state_dict()[key])


def test_save_encoder_from_ddp_state_dict(tmp_path) -> None:
    source = _perturb(_unetr(1), 16)
    path = save_encoder({"module." + k: v for k, v in source.state_dict().items()}, tmp_path / "e.pt")
    _assert_equal(torch.load(path, weights_only=True)["state_dict"], _encoder_state(source))


def test_atomic_save_keeps_old_file_on_failure(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"v": torch.ones(1)}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"bad": lambda: None}, path)  # lambdas cannot be pickled
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(1))
