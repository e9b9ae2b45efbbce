"""Tests for bsf.ssl: rotated, corrupted views and the SSL loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bsf.errors import ConfigError
from bsf.ssl import CorruptionConfig, SSLLoss, SSLViews, corrupt, make_ssl_views, rotate90

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


def test_rotate90_matches_torch_rot90_per_sample_and_inverts() -> None:
    x = _crops(shape=(4, 2, 8, 8, 5))
    k = torch.tensor([2, 0, 3, 1])
    rotated = rotate90(x, k)
    for i in range(4):
        assert torch.equal(rotated[i], torch.rot90(x[i], int(k[i]), dims=(1, 2)))
    assert torch.equal(rotate90(rotated, (4 - k) % 4), x)


def test_rotate90_rejects_non_cubic_and_wrong_k() -> None:
    with pytest.raises(ValueError):
        rotate90(torch.zeros(2, 1, 8, 6, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        rotate90(torch.zeros(2, 1, 8, 8, 8), torch.zeros(3, dtype=torch.long))


def test_views_shapes_and_labels_match_applied_rotation() -> None:
    x = _crops()
    views = make_ssl_views(x, _gen(1))
    assert isinstance(views, SSLViews)
    assert views.inputs.shape == views.targets.shape == (8, *SHAPE[1:])
    assert views.rotation_labels.shape == (8,) and views.rotation_labels.dtype == torch.long
    for i in range(8):
        expected = torch.rot90(x[i % 4], int(views.rotation_labels[i]), dims=(1, 2))
        assert torch.equal(views.targets[i], expected)
    labels = torch.cat([make_ssl_views(x, _gen(seed)).rotation_labels for seed in range(10)])
    assert set(labels.tolist()) == {0, 1, 2, 3}


def test_corrupted_fraction_within_budget_and_positive() -> None:
    cfg = CorruptionConfig(noise_boxes=64, paste_boxes=64)  # volumes add up well past the budget
    x = _crops()
    fractions = []
    for seed in range(10):
        out, mask = corrupt(x, _gen(seed), cfg)
        assert mask.shape == (4, 1, 32, 32, 32) and mask.dtype == torch.bool
        assert not (_changed(out, x) & ~mask).any(), "voxels changed outside the mask"
        fractions.append(mask.float().mean(dim=(1, 2, 3, 4)))
    fractions = torch.cat(fractions)
    assert (fractions <= cfg.max_corrupted_fraction).all()
    assert (fractions > 0).all()
    assert fractions.max() > 0.8 * cfg.max_corrupted_fraction, "budget never approached"


def test_views_corrupted_fraction_within_default_budget() -> None:
    cfg = CorruptionConfig()
    for seed in range(5):
        views = make_ssl_views(_crops(seed), _gen(seed), cfg)
        fraction = _changed(views.inputs, views.targets).float().mean(dim=(1, 2, 3, 4))
        assert (fraction <= cfg.max_corrupted_fraction).all() and (fraction > 0).all()


def test_box_sides_within_max_box_fraction() -> None:
    cfg = CorruptionConfig(max_box_fraction=0.25, noise_boxes=1, paste_boxes=0)
    x = _crops()
    for seed in range(10):
        _, mask = corrupt(x, _gen(seed), cfg)
        for axis in (2, 3, 4):
            other = tuple(d for d in (2, 3, 4) if d != axis)
            extent = mask.any(dim=other).sum(dim=-1)
            assert (extent >= 1).all() and (extent <= 8).all()


def test_noise_within_each_sample_range() -> None:
    cfg = CorruptionConfig(noise_boxes=16, paste_boxes=0)
    x = _crops()
    out, mask = corrupt(x, _gen(3), cfg)
    for i in range(4):
        inside = out[i][mask[i].expand_as(out[i])]
        assert inside.numel() > 0
        assert inside.min() >= x[i].min() and inside.max() <= x[i].max()
        assert not torch.equal(inside, x[i][mask[i].expand_as(out[i])])


def test_pasted_voxels_come_from_another_sample() -> None:
    cfg = CorruptionConfig(noise_boxes=0, paste_boxes=8)
    x = _crops()
    for seed in range(5):
        out, mask = corrupt(x, _gen(seed), cfg)
        for i in range(4):
            region = mask[i].expand_as(out[i])
            assert region.any()
            sources = [j for j in range(4) if torch.equal(out[i][region], x[j][region])]
            assert sources and i not in sources


def test_batch_of_one_uses_noise_for_paste_boxes() -> None:
    cfg = CorruptionConfig()
    x = _crops(shape=(1, 2, 32, 32, 32))
    out, mask = corrupt(x, _gen(0), cfg)
    region = mask.expand_as(out)
    assert 0 < mask.float().mean() <= cfg.max_corrupted_fraction
    assert out[region].min() >= x.min() and out[region].max() <= x.max()
    assert (out[region] != x[region]).all()
    views = make_ssl_views(x, _gen(0), cfg)
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
    "kwargs",
    [
        {"max_box_fraction": 0.0},
        {"max_box_fraction": 1.5},
        {"max_corrupted_fraction": -0.1},
        {"max_corrupted_fraction": 1.1},
        {"noise_boxes": -1},
        {"paste_boxes": -1},
    ],
)
def test_corruption_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
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
