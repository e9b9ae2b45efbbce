"""Tests for bsf.ssl: rotated, corrupted views and the SSL loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bsf.errors import ConfigError
from bsf.ssl import CorruptionConfig, SSLLoss, SSLViews, corrupt, make_ssl_views, rotate90
from bsf.ssl.boxes import draw_boxes

SHAPE = (4, 2, 32, 32, 32)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _crops(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    """Random crops whose samples have clearly different intensity ranges."""
    x = torch.randn(shape, generator=_gen(seed))
    scale = torch.arange(1, shape[0] + 1, dtype=x.dtype).view(-1, 1, 1, 1, 1)
    return x * scale + 10 * scale


def _changed(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) voxels where any channel differs."""
    return (out != x).any(dim=1, keepdim=True)


def test_rotate90_turns_the_last_two_spatial_axes_per_sample_and_inverts() -> None:
    x = _crops(shape=(4, 2, 5, 8, 8))
    k = torch.tensor([2, 0, 3, 1])
    rotated = rotate90(x, k)
    for i in range(4):
        assert torch.equal(rotated[i], x[i].rot90(int(k[i]), (2, 3)))  # the public code's plane
    assert torch.equal(rotate90(rotated, (4 - k) % 4), x)


def test_rotate90_rejects_non_square_plane_and_wrong_k() -> None:
    with pytest.raises(ValueError, match="Y == Z"):
        rotate90(torch.zeros(2, 1, 8, 8, 6), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one k per sample"):
        rotate90(torch.zeros(2, 1, 8, 8, 8), torch.zeros(3, dtype=torch.long))


def test_views_shapes_and_labels_match_applied_rotation() -> None:
    x = _crops()
    views = make_ssl_views(x, _gen(1))
    assert isinstance(views, SSLViews)
    assert views.inputs.shape == views.targets.shape == (8, *SHAPE[1:])
    assert views.rotation_labels.shape == (8,) and views.rotation_labels.dtype == torch.long
    for i in range(8):
        assert torch.equal(views.targets[i], x[i % 4].rot90(int(views.rotation_labels[i]), (2, 3)))
    labels = torch.cat([make_ssl_views(x, _gen(seed)).rotation_labels for seed in range(10)])
    assert set(labels.tolist()) == {0, 1, 2, 3}


def test_changes_only_inside_the_masks_and_every_sample_is_corrupted() -> None:
    x = _crops()
    for seed in range(5):
        result = corrupt(x, _gen(seed))
        assert result.noise.shape == result.pasted.shape == (4, 1, 32, 32, 32)
        assert not (_changed(result.image, x) & ~result.changed).any(), "voxels changed outside the masks"
        assert result.noise.flatten(1).any(dim=1).all(), "a target > 0 always draws at least one noise box"


def test_boxes_follow_the_public_integer_ranges() -> None:
    rules = CorruptionConfig().rules((32, 40, 64))
    assert [(r.corner_high, r.side_low, r.side_high) for r in rules] == [(31, 1, 8), (38, 2, 10), (61, 3, 16)]
    boxes = draw_boxes(64, rules, 0.3, _gen(0), torch.device("cpu"))
    start, stop = boxes.start[boxes.accepted], boxes.stop[boxes.accepted]
    for axis, rule in enumerate(rules):
        assert start[:, axis].min() >= 0 and start[:, axis].max() < rule.corner_high
        side = stop[:, axis] - start[:, axis]
        assert side.min() >= 0 and side.max() < rule.side_high and stop[:, axis].max() <= rule.size
    assert (stop == torch.tensor([32, 40, 64])).any(dim=0).all(), "no box reached the border on some axis"


def test_a_pass_adds_boxes_until_their_volumes_pass_the_target() -> None:
    rules = CorruptionConfig().rules((32, 32, 32))
    generator = _gen(3)
    target = torch.rand(256, generator=_gen(3), dtype=torch.float64) * (0.3 * 32**3)  # the first draw of the pass
    boxes = draw_boxes(256, rules, 0.3, generator, torch.device("cpu"))
    volume = ((boxes.stop - boxes.start).prod(dim=-1) * boxes.accepted).sum(dim=1).double()
    last = (boxes.stop - boxes.start).prod(dim=-1).gather(1, boxes.accepted.sum(1, keepdim=True) - 1)[:, 0]
    assert (volume >= target).all(), "stopped before the target"
    assert (volume - last < target).all(), "added a box after the target was passed"


def test_too_small_crop_names_the_side_and_the_setting() -> None:
    with pytest.raises(ConfigError, match="crop side of 6 voxels.*max_box_fraction"):
        CorruptionConfig().rules((32, 6, 32))


def test_one_box_of_noise_spans_exactly_zero_to_one() -> None:
    x = torch.full((1, 2, 32, 32, 32), 10.0)
    cfg = CorruptionConfig(max_drop_fraction=1e-6, noise_range="unit")  # target < 1 voxel: exactly one box
    for seed in range(5):
        result = corrupt(x, _gen(seed), cfg)
        inside = result.image[result.noise.expand_as(x)]
        assert inside.min() == 0.0 and inside.max() == 1.0
        assert not result.pasted.any()


def test_crop_range_noise_is_unit_noise_mapped_onto_each_channel_range() -> None:
    x = _crops()
    unit = corrupt(x, _gen(4), CorruptionConfig(noise_range="unit"))
    crop = corrupt(x, _gen(4), CorruptionConfig(noise_range="crop"))
    assert torch.equal(unit.noise, crop.noise) and torch.equal(unit.pasted, crop.pasted)
    only_noise = (unit.noise & ~unit.pasted).expand_as(x)
    low, high = x.amin(dim=(2, 3, 4), keepdim=True), x.amax(dim=(2, 3, 4), keepdim=True)
    expected = low + unit.image * (high - low)
    assert torch.allclose(crop.image[only_noise], expected[only_noise], rtol=1e-6, atol=1e-5)
    assert ((crop.image >= low - 1e-5) & (crop.image <= high + 1e-5))[only_noise].all()


def test_paste_copies_the_current_view_of_the_source() -> None:
    """At B = 2 sample 0 pastes from sample 1 still clean, sample 1 from sample 0 already corrupted."""
    x = _crops(shape=(2, 2, 32, 32, 32))
    pasted_some = [False, False]
    for seed in range(8):
        result = corrupt(x, _gen(seed))
        for i, (source, done) in enumerate([(x[1], False), (result.image[0], True)]):
            region = result.pasted[i].expand_as(x[i])
            pasted_some[i] |= bool(region.any())
            assert torch.equal(result.image[i][region], source[region]), f"sample {i} (source corrupted: {done})"
    assert all(pasted_some)


def test_batch_of_one_never_pastes() -> None:
    x = _crops(shape=(1, 2, 32, 32, 32))
    for seed in range(10):
        result = corrupt(x, _gen(seed))
        assert result.noise.any() and not result.pasted.any()
    views = make_ssl_views(x, _gen(0))
    assert views.inputs.shape == (2, 2, 32, 32, 32) and views.rotation_labels.shape == (2,)


def test_same_seed_same_views_different_seed_different_views() -> None:
    x = _crops()
    torch.manual_seed(0)
    first = make_ssl_views(x, _gen(7))
    torch.manual_seed(1)  # the global RNG must not matter
    second = make_ssl_views(x, _gen(7))
    other = make_ssl_views(x, _gen(8))
    for name in ("inputs", "targets", "rotation_labels"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert not torch.equal(first.inputs, other.inputs)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"max_box_fraction": 0.05}, "max_box_fraction"),
        ({"max_box_fraction": 1.5}, "max_box_fraction"),
        ({"max_drop_fraction": -0.1}, "max_drop_fraction"),
        ({"max_drop_fraction": 1.1}, "max_drop_fraction"),
        ({"noise_range": "zscore"}, "noise_range"),
    ],
)
def test_corruption_config_rejects_bad_values(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        CorruptionConfig(**kwargs)


def _nt_xent_loop(z: torch.Tensor, temperature: float) -> float:
    """NT-Xent written out term by term: mean over the 2B anchors."""
    n = z.shape[0]
    half = n // 2
    rows = [[float(z[i] @ z[j] / (z[i].norm() * z[j].norm())) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        positive = math.exp(rows[i][(i + half) % n] / temperature)
        denominator = sum(math.exp(rows[i][j] / temperature) for j in range(n) if j != i)
        total += -math.log(positive / denominator)
    return total / n


@pytest.mark.parametrize(("batch", "temperature"), [(3, 0.5), (1, 0.5), (4, 0.1)])
def test_contrastive_is_nt_xent(batch: int, temperature: float) -> None:
    z = torch.randn(2 * batch, 16, generator=_gen(batch), dtype=torch.float64)
    loss = SSLLoss(temperature=temperature)
    _, parts = loss(
        torch.zeros(2 * batch, 4), torch.zeros(2 * batch, dtype=torch.long), z, torch.zeros(1), torch.zeros(1)
    )
    assert parts["contrastive"].item() == pytest.approx(_nt_xent_loop(z, temperature), abs=1e-5)


def test_ssl_loss_parts_and_weights() -> None:
    g = _gen(11)
    logits, labels = torch.randn(8, 4, generator=g), torch.randint(0, 4, (8,), generator=g)
    z = torch.randn(8, 12, generator=g)
    recon, target = torch.randn(8, 2, 4, 4, 4, generator=g), torch.randn(8, 2, 4, 4, 4, generator=g)
    total, parts = SSLLoss(0.3, 2.0, 1.7)(logits, labels, z, recon, target)
    assert set(parts) == {"rotation", "contrastive", "reconstruction"}
    assert parts["rotation"].item() == pytest.approx(F.cross_entropy(logits, labels).item(), abs=1e-6)
    assert parts["contrastive"].item() == pytest.approx(_nt_xent_loop(z.double(), 0.5), abs=1e-5)
    assert parts["reconstruction"].item() == pytest.approx((recon - target).abs().mean().item(), abs=1e-6)
    expected = 0.3 * parts["rotation"] + 2.0 * parts["contrastive"] + 1.7 * parts["reconstruction"]
    assert total.item() == pytest.approx(expected.item(), abs=1e-6)
    default_total, default_parts = SSLLoss()(logits, labels, z, recon, target)
    assert default_total.item() == pytest.approx(sum(p.item() for p in default_parts.values()), abs=1e-6)


def test_ssl_loss_backpropagates_and_rejects_odd_batch() -> None:
    z = torch.randn(4, 8, requires_grad=True)
    recon = torch.randn(4, 1, 4, 4, 4, requires_grad=True)
    total, _ = SSLLoss()(torch.randn(4, 4), torch.tensor([0, 1, 2, 3]), z, recon, torch.zeros(4, 1, 4, 4, 4))
    total.backward()
    assert z.grad is not None and recon.grad is not None
    with pytest.raises(ValueError):
        SSLLoss()(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.randn(3, 8), recon, recon)
