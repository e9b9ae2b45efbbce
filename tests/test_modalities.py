"""One federation across sites holding different modalities (issue 16): the modality-aware model's channels, modality
dropout, per-modality aggregation of the first layer, the result guard's ``modalities`` key, a site's claim, and
``bsf predict`` on a subset of the model's modalities."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DataKind
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from bsf.config import FederationConfig, load_config
from bsf.data.transforms import ModelChannelsd, RandModalityDropoutd, random_transforms
from bsf.errors import ConfigError, DataError
from bsf.federation.modality import MODALITY_ORDER, PATCH_EMBED_WEIGHT, ChannelMean
from bsf.fl.aggregation import CheckedFedAvgAggregator
from bsf.fl.deploy.privacy import check_result
from bsf.model.adapt import MODALITY_ALIASES, adapt_input_channels, union_modalities

UNION = ["t1", "t1ce", "t2", "flair"]
AWARE = ["model.modalities=[t1, t1ce, t2, flair]", "model.in_channels=4"]


# ------------------------------------------------------------------------------------- the model's channels
def test_the_union_is_in_the_canonical_order_and_stage1_adapts_into_it():
    assert set(MODALITY_ALIASES.values()) == set(MODALITY_ORDER)  # one vocabulary
    assert union_modalities(["t1", "flair"], ["flair", "t1ce", "t1", "t2"], ["t1w"]) == tuple(UNION)
    stage1 = torch.randn(12, 2, 2, 2, 2)  # (F, [t1, flair], 2, 2, 2)
    adapted = adapt_input_channels({PATCH_EMBED_WEIGHT: stage1}, ["t1", "flair"], UNION, seed=3)[PATCH_EMBED_WEIGHT]
    assert adapted.shape == (12, 4, 2, 2, 2)
    assert torch.equal(adapted[:, 0], stage1[:, 0]) and torch.equal(adapted[:, 3], stage1[:, 1])  # pretrained kept
    again = adapt_input_channels({PATCH_EMBED_WEIGHT: stage1}, ["t1", "flair"], UNION, seed=3)[PATCH_EMBED_WEIGHT]
    assert torch.equal(adapted, again)  # t1ce, t2: the same seeded Kaiming draws on every site


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.modalities=[flair, t1]", "model.in_channels=2"], ["model.modalities", "order"]),
        (["model.modalities=[t1, pd]", "model.in_channels=2"], ["model.modalities", "canonical"]),
        (["model.modalities=[t1, flair]", "model.in_channels=4"], ["model.modalities", "model.in_channels is 4"]),
        ([*AWARE, "data.modalities=[t1, t1]"], ["data.modalities", "distinct"]),
        (["model.modalities=[t1, flair]", "model.in_channels=2"], ["data.modalities", "flair', 't1ce'"]),
        (["data.transforms.modality_dropout=1.5"], ["data.transforms.modality_dropout"]),
    ],
)
def test_bad_modality_settings_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config("stage2_brats_test", overrides)
    assert all(word in str(err.value) for word in words), str(err.value)


def test_a_site_feeds_its_modalities_into_their_channels_and_leaves_the_others_empty():
    image = torch.arange(2 * 3, dtype=torch.float32).reshape(2, 3) + 1  # (t1, flair) x 3 voxels
    out = ModelChannelsd(["t1", "flair"], UNION)({"image": image})["image"]
    assert torch.equal(out, torch.stack([image[0], torch.zeros(3), torch.zeros(3), image[1]]))
    with pytest.raises(ConfigError, match="t2"):
        ModelChannelsd(["t1", "t2"], ["t1", "flair"])


# ------------------------------------------------------------------------------------------ modality dropout
def _crops(data, seed: int, *overrides: str) -> list[torch.Tensor]:
    """The training crops of one volume (every sample: ``set_random_state(seed)``, as the stream does)."""
    cfg = load_config("stage3_brats_test", list(overrides)).data
    config = load_config("stage3_brats_test", list(overrides))
    channels = config.model.modalities or []
    transform = random_transforms(cfg, with_label=True, channels=channels)
    transform.set_random_state(seed=seed)
    return [crop["image"] for crop in transform(dict(data))]


@pytest.fixture(scope="module")
def volume():
    """A (t1, flair) volume with no zero voxel, and a label."""
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand((2, 72, 72, 72), generator=g) + 1.0, "label": (torch.rand((3, 72, 72, 72), generator=g) > 0.5).float()}


def test_modality_dropout_is_seeded_keeps_a_present_modality_and_leaves_the_crops_as_they_were(volume):
    site = [*AWARE, "data.modalities=[t1, flair]", "data.crops_per_volume=4"]
    plain = _crops(volume, 7, *site)
    dropped = _crops(volume, 7, *site, "data.transforms.modality_dropout=1.0")
    assert [torch.equal(a, b) for a, b in zip(dropped, _crops(volume, 7, *site, "data.transforms.modality_dropout=1.0"))] == [True] * 4
    hidden = set()
    for seed in range(6):
        for full, crop in zip(_crops(volume, seed, *site), _crops(volume, seed, *site, "data.transforms.modality_dropout=1.0")):
            assert crop.shape == (4, 64, 64, 64) and not crop[1].any() and not crop[2].any()  # t1ce, t2: never held
            kept = [c for c in (0, 3) if crop[c].any()]
            assert len(kept) == 1  # with two present modalities and p = 1, exactly one is hidden
            assert all(torch.equal(crop[c], full[c]) for c in kept)  # same crop, same augmentation
            hidden.add(3 - kept[0])
    assert hidden == {0, 3}  # both modalities get hidden, depending on the sample
    assert all(not torch.equal(a, b) for a, b in zip(plain, dropped))


def test_with_the_new_options_off_the_crops_are_todays(volume):
    config = load_config("stage3_brats_test", ["data.modalities=[t1, flair]", "model.in_channels=2"])
    today = random_transforms(config.data, with_label=True)
    today.set_random_state(seed=5)
    crops = _crops(volume, 5, "data.modalities=[t1, flair]", "model.in_channels=2")
    assert all(torch.equal(a["image"], b) for a, b in zip(today(dict(volume)), crops))


def test_dropout_draws_uniformly_among_the_non_empty_proper_subsets():
    drop = RandModalityDropoutd(1.0, present=[0, 1, 2])
    drop.set_random_state(seed=0)
    seen = {}
    for _ in range(600):
        drop.randomize()
        seen[tuple(drop.hidden)] = seen.get(tuple(drop.hidden), 0) + 1
    assert set(seen) == {(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)}  # never none, never all
    assert min(seen.values()) > 60  # 6 subsets, 100 expected each


# ------------------------------------------------------------------------------------- per-modality aggregation
def _first_layer(values: list[float]) -> np.ndarray:
    """A (2, 4, 2, 2, 2) first layer whose channel c holds values[c]."""
    return np.broadcast_to(np.asarray(values, dtype=np.float32).reshape(1, 4, 1, 1, 1), (2, 4, 2, 2, 2)).copy()


def test_channel_mean_averages_each_modality_over_the_sites_holding_it():
    # site a (weight 2) holds all four, b (weight 1) t1 + flair, c (weight 1) t1 only
    mean = ChannelMean()
    mean.add(_first_layer([1, 2, 3, 4]), 2.0, np.array([1, 1, 1, 1], bool))
    mean.add(_first_layer([5, 9, 9, 8]), 1.0, np.array([1, 0, 0, 1], bool))
    mean.add(_first_layer([9, 9, 9, 9]), 1.0, np.array([1, 0, 0, 0], bool))
    # t1: (2*1 + 5 + 9) / 4 = 4; t1ce, t2: site a alone; flair: (2*4 + 8) / 3
    np.testing.assert_allclose(mean.result(), _first_layer([4.0, 2.0, 3.0, 16 / 3]), rtol=1e-6)
    assert mean.channel_weights == [4.0, 2.0, 2.0, 3.0]
    alone = ChannelMean()  # a modality no site holds: the mean over all sites, as plain FedAvg
    alone.add(_first_layer([1, 1, 1, 1]), 1.0, np.array([1, 0, 0, 0], bool))
    alone.add(_first_layer([3, 3, 3, 3]), 3.0, np.array([1, 0, 0, 0], bool))
    np.testing.assert_allclose(alone.result(), _first_layer([2.5] * 4), rtol=1e-6)


def _update(site: str, first: list[float], other: float, steps: int, **meta) -> FLModel:
    params = {PATCH_EMBED_WEIGHT: _first_layer(first), "swinViT.norm": np.full(3, other, np.float32)}
    return FLModel(params=params, params_type=ParamsType.DIFF, meta={"client_name": site, "NUM_STEPS_CURRENT_ROUND": steps, **meta})


def _aggregate(aggregator: CheckedFedAvgAggregator, *updates: FLModel) -> FLModel:
    aggregator.set_reference({PATCH_EMBED_WEIGHT: np.zeros((2, 4, 2, 2, 2)), "swinViT.norm": np.zeros(3)})
    aggregator.reset_stats()
    for update in updates:
        aggregator.accept_model(update)
    return aggregator.aggregate_model()


def test_the_server_averages_a_modalitys_filters_over_its_sites_and_the_rest_over_all():
    aggregator = CheckedFedAvgAggregator.for_federation(FederationConfig(local_steps=4, min_clients=1), modalities=UNION)
    out = _aggregate(
        aggregator,
        _update("brats", [1, 2, 3, 4], 1.0, 2, modalities=UNION),
        _update("ukb", [5, 9, 9, 8], 3.0, 1, modalities=["t1", "flair"]),
        _update("atlas", [9, 9, 9, 9], 5.0, 1, modalities=["t1"]),
    )
    np.testing.assert_allclose(out.params[PATCH_EMBED_WEIGHT], _first_layer([4.0, 2.0, 3.0, 16 / 3]), rtol=1e-6)
    np.testing.assert_allclose(out.params["swinViT.norm"], (2 * 1 + 3 + 5) / 4, rtol=1e-6)  # all sites, by steps
    assert out.meta["modalities"]["sites"] == {"brats": UNION, "ukb": ["t1", "flair"], "atlas": ["t1"]}
    assert out.meta["accepted_sites"] == ["brats", "ukb", "atlas"]


@pytest.mark.parametrize(
    "claim, words",
    [(["t1", "pd"], ["'pd'", "model's channels"]), ("t1", ["non-empty list"]), (["t1", "t1"], ["repeats"]), ([], ["non-empty"])],
)
def test_a_malformed_modalities_claim_is_rejected_naming_it(claim, words):
    aggregator = CheckedFedAvgAggregator(expected_steps=4, modalities=UNION)
    out = _aggregate(aggregator, _update("good", [1, 1, 1, 1], 1.0, 1, modalities=["t1"]), _update("bad", [7, 7, 7, 7], 7.0, 1, modalities=claim))
    assert out.meta["rejected_sites"] == ["bad"]
    assert all(word in out.meta["rejections"][0]["reason"] for word in words), out.meta["rejections"]
    np.testing.assert_array_equal(out.params[PATCH_EMBED_WEIGHT], _first_layer([1, 1, 1, 1]))


def test_updates_stay_checked_with_per_modality_aggregation():
    aggregator = CheckedFedAvgAggregator(expected_steps=4, modalities=UNION)
    nan = _update("nan", [np.nan, 1, 1, 1], 1.0, 1, modalities=["t1"])
    out = _aggregate(aggregator, _update("good", [2, 2, 2, 2], 1.0, 1, modalities=["t1"]), nan)
    assert out.meta["rejected_sites"] == ["nan"] and "NaN" in out.meta["rejections"][0]["reason"]
    with pytest.raises(ConfigError, match="robust"):
        CheckedFedAvgAggregator(robust="median", modalities=UNION)


def test_the_result_guard_lets_the_modalities_claim_out_and_nothing_else_under_its_name():
    shapes = {"swinViT.norm": (3,)}
    weights = {"swinViT.norm": np.zeros(3, np.float32)}
    assert check_result(DataKind.WEIGHT_DIFF, weights, {"modalities": ["t1", "flair"]}, {}, shapes) == []
    for bad in (["t1", "/data/case_001_t1.nii.gz"], "t1", ["t1"] * 5, [1]):
        assert check_result(DataKind.WEIGHT_DIFF, weights, {"modalities": bad}, {}, shapes), bad


# -------------------------------------------------------------------------------- a site in a mixed federation
def test_a_t1_flair_site_trains_the_four_channel_model_and_says_what_it_holds(tmp_path):
    from bsf.data.synth import synthesize
    from bsf.engine import Engine
    from bsf.federation.payload import exchanged
    from bsf.federation.site_trainer import SiteTrainer

    root = tmp_path / "brats"
    synthesize("brats", 3, root, spacing=3.0, seed=1)
    config = load_config("stage3_brats_test", [
        *AWARE, "data.modalities=[t1, flair]", "data.transforms.modality_dropout=0.5", f"data.root={root}",
        "data.crops_per_volume=1", "train.steps=1", f"train.output_dir={tmp_path / 'run'}", "train.progress=false",
    ])
    trainer = SiteTrainer(Engine(config), FederationConfig(local_steps=1, validate_global=True), site="ukb-like")
    received = exchanged(trainer.engine.get_weights("encoder"))
    result = trainer.train(received, 0)
    assert result.meta["modalities"] == ["t1", "flair"]
    assert result.params[PATCH_EMBED_WEIGHT].shape[1] == 4
    assert np.isfinite(result.metrics["val_dice_mean"])
    assert check_result(DataKind.WEIGHT_DIFF, result.params, result.meta, {}, {k: v.shape for k, v in result.params.items()}) == []


# --------------------------------------------------------------------------------------- predict on a subset
def test_predict_with_t1_and_flair_feeds_the_others_empty_and_says_so(tmp_path, caplog):
    from bsf.data.synth import synthesize
    from bsf.engine import build_model
    from bsf.predict import load_finetuned, predict_case, resolve_inputs

    root = tmp_path / "brats"
    synthesize("brats", 1, root, spacing=3.0, seed=2)
    config = load_config("stage3_brats_test", [*AWARE, f"data.root={root}"])
    torch.manual_seed(0)
    torch.save({"version": 1, "step": 0, "model": build_model(config).state_dict(), "config": config.to_dict()}, tmp_path / "model.pt")
    finetuned = load_finetuned(tmp_path / "model.pt", device="cpu")
    case = root / "BraTS2021_00000"
    files = {m: case / f"BraTS2021_00000_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")}
    seen: list[torch.Tensor] = []

    class Recording(torch.nn.Module):
        """The network, keeping every sliding window it is given."""

        def forward(self, x):
            seen.append(x.clone())
            return finetuned.model(x)

    with caplog.at_level(logging.WARNING, logger="bsf.predict"):
        subset = predict_case(finetuned, [f"t1={files['t1']}", f"FLAIR={files['flair']}"], model=Recording())
    assert "missing modalities t1ce, t2" in caplog.text
    windows, seen[:] = list(seen), []
    assert windows and all(w.shape[1] == 4 and not w[:, 1:3].any() and w[:, 0].any() and w[:, 3].any() for w in windows)
    assert subset.labels.shape == nib.load(files["t1"]).shape
    # empty T1ce and T2 files are refused, pointing to the subset input predicted above
    reference = nib.load(files["t1"])
    for m in ("t1ce", "t2"):
        nib.save(nib.Nifti1Image(np.zeros(reference.shape, np.float32), reference.affine), tmp_path / f"empty_{m}.nii.gz")
    with pytest.raises(DataError, match=f"give only the others: --input t1={files['t1']} flair={files['flair']}"):
        predict_case(finetuned, [files["t1"], tmp_path / "empty_t1ce.nii.gz", tmp_path / "empty_t2.nii.gz", files["flair"]],
                     model=Recording())
    with pytest.raises(Exception, match="given twice"):
        resolve_inputs([f"t1={files['t1']}", f"t1w={files['t1']}"], finetuned.config)
