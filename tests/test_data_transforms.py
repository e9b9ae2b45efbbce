"""``data.transforms``: defaults equal the pipeline as it was built in code, settings change the output, strict
validation, and the persistent cache key follows every deterministic setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    NormalizeIntensityd,
    Orientationd,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
    SpatialPadd,
)

from bsf.config import load_config
from bsf.data.pipeline import CheckedLoadd, SampleStream, deterministic_transforms, preprocessing_key
from bsf.data.transforms import random_transforms
from bsf.engine.segmentation import LabelsToRegionsd
from bsf.errors import ConfigError

ROI = [64, 64, 64]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, dict]:
    """One BraTS-like and one ATLAS-like case (3 mm), absolute paths."""
    from bsf.data.index import FINDERS, absolute
    from bsf.data.synth import synthesize

    out = {}
    for name in ("brats", "atlas"):
        root = tmp_path_factory.mktemp(name)
        synthesize(name, 1, root, spacing=3.0, seed=0)
        out[name] = {k: v for k, v in absolute(FINDERS[name](root)[0], root).items() if k in ("image", "label")}
    return out


def _config(dataset: str, *overrides: str):
    return load_config("stage3_brats_test" if dataset == "brats" else "stage3_atlas_test", ["data.roi=[64, 64, 64]", *overrides])


def _legacy_deterministic(label_transform) -> Compose:
    """The deterministic pipeline as it was written in code before ``data.transforms`` (PREPROCESS_VERSION 3)."""
    keys = ["image", "label"]
    return Compose(
        [
            CheckedLoadd(with_label=True),
            label_transform,
            Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            SpatialPadd(keys=keys, spatial_size=ROI),
            EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
        ]
    )


def _legacy_finetune_random(dataset: str, crops: int) -> Compose:
    keys = ["image", "label"]
    return Compose(
        [
            RandSpatialCropSamplesd(keys=keys, roi_size=ROI, num_samples=crops, random_size=False),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            RandRotate90d(keys=keys, prob=0.25 if dataset == "atlas" else 0.0, spatial_axes=(0, 1)),
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
        ]
    )


def _crops(transform: Compose, volume: dict, seed: int) -> list[dict]:
    transform.set_random_state(seed=seed)
    return transform(volume)


@pytest.mark.parametrize("dataset", ["brats", "atlas"])
def test_defaults_reproduce_the_pipeline_built_in_code(cases, dataset) -> None:
    config = _config(dataset, "data.crops_per_volume=4")
    labels = LabelsToRegionsd(dataset)
    new = deterministic_transforms(config.data, labels)(cases[dataset])
    old = _legacy_deterministic(LabelsToRegionsd(dataset))(cases[dataset])
    for key in ("image", "label"):
        assert torch.equal(new[key], old[key]), key
    legacy = _legacy_finetune_random(dataset, 4)
    for seed in (0, 1, 2):  # ATLAS: RandRotate90d (p 0.25) fires in some of these
        for a, b in zip(_crops(random_transforms(config.data, with_label=True), new, seed), _crops(legacy, old, seed)):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    ssl = load_config("stage2_brats_test", ["data.roi=[64, 64, 64]"]).data
    ssl_legacy = Compose([RandSpatialCropSamplesd(keys="image", roi_size=ROI, num_samples=2, random_size=False)])
    for a, b in zip(_crops(random_transforms(ssl, with_label=False), new, 5), _crops(ssl_legacy, old, 5)):
        assert torch.equal(a["image"], b["image"])


def test_settings_change_the_output(cases) -> None:
    case = {"image": cases["brats"]["image"]}
    default = deterministic_transforms(_config("brats").data)(case)["image"]
    percentile = deterministic_transforms(_config("brats", "data.transforms.normalize.method=percentile").data)(case)["image"]
    assert percentile.shape == default.shape and not torch.allclose(percentile, default)
    assert float(percentile.min()) >= -0.01 and 0.9 < float(percentile.max()) <= 1.5  # 0.5/99.5 percentiles -> 0/1
    raw = deterministic_transforms(_config("brats", "data.transforms.normalize.method=none").data)(case)["image"]
    assert float(raw.max()) > 10  # the files' intensities, not z-scores
    uncropped = deterministic_transforms(_config("brats", "data.transforms.foreground_crop=false").data)(case)["image"]
    assert uncropped.shape[1:] == (80, 80, 64)  # 240 x 240 x 155 at 3 mm, padded to 64; the cropped volume is smaller
    assert all(u > d for u, d in zip(uncropped.shape[1:3], default.shape[1:3]))
    coarse = deterministic_transforms(_config("brats", "data.transforms.spacing=[4.5, 4.5, 4.5]", "data.transforms.foreground_crop=false").data)(case)
    assert coarse["image"].shape[1:] == (64, 64, 64)  # 54 x 54 x 35 after resampling, padded to the ROI


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.transforms.normalise={}", "unknown config key data.transforms.normalise"),
        ("data.transforms.normalize.metod=none", "unknown config key data.transforms.normalize.metod"),
        ("data.transforms.augment.flip=0.5", "unknown config key data.transforms.augment.flip"),
        ("data.transforms.normalize.method=ct_window", "data.transforms.normalize.method"),
        ("data.transforms.orientation=RAX", "data.transforms.orientation"),
        ("data.transforms.spacing=[1, 1]", "data.transforms.spacing"),
        ("data.transforms.normalize.upper=101", "data.transforms.normalize.upper applies to method percentile only"),
        ("data.transforms.foreground_margin=-1", "data.transforms.foreground_margin"),
        ("data.transforms.augment.flip_prob=[0.5, 0.5]", "data.transforms.augment.flip_prob"),
        ("data.transforms.augment.scale_intensity_prob=2", r"data.transforms.augment.scale_intensity_prob must be in \[0, 1\]"),
        ("data.transforms.crop.pos=3", "data.transforms.crop.pos/neg apply to mode pos_neg only"),
        ("data.transforms.crop.mode=center", "data.transforms.crop.mode"),
    ],
)
def test_bad_settings_name_the_key(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("stage3_brats_test", [override])


def test_stage_specific_settings_are_refused_for_ssl() -> None:
    with pytest.raises(ConfigError, match="data.transforms.crop.mode pos_neg needs labels"):
        load_config("stage2_brats_test", ["data.transforms.crop.mode=pos_neg"])
    with pytest.raises(ConfigError, match="data.transforms.augment applies to stage finetune only"):
        load_config("stage1_test", ["data.transforms.augment.flip_prob=[0, 0, 0]"])
    percentile = load_config("stage1_test", ["data.transforms.normalize={method: percentile, lower: 1, upper: 99}"])
    assert percentile.data.transforms.normalize.upper == 99.0


def test_cache_key_follows_every_deterministic_setting_and_only_those(cases, tmp_path: Path) -> None:
    base = _config("brats").data
    key = preprocessing_key(base)
    changed = [
        "data.transforms.orientation=LPS",
        "data.transforms.orientation=null",
        "data.transforms.spacing=[1, 1, 1]",
        "data.transforms.foreground_crop=false",
        "data.transforms.foreground_margin=2",
        "data.transforms.normalize.method=none",
        "data.transforms.normalize={method: percentile, upper: 99}",
        "data.roi=[96, 96, 96]",
    ]
    keys = {override: preprocessing_key(_config("brats", override).data) for override in changed}
    assert key not in keys.values() and len(set(keys.values())) == len(changed)
    random_only = ["data.transforms.crop.mode=pos_neg", "data.transforms.augment.rotate90_prob=0.5", "data.crops_per_volume=3"]
    assert all(preprocessing_key(_config("brats", o).data) == key for o in random_only)
    # SSL (no label) and fine-tuning (labels as regions) never share an entry, nor do two label conventions
    labelled = preprocessing_key(base, LabelsToRegionsd("brats"))
    assert labelled != key and labelled != preprocessing_key(base, LabelsToRegionsd("brats", label_format="brats2023"))
    # and the persistent cache writes a new entry for a changed setting instead of reusing the old one
    cache = ["data.cache=persistent", f"data.cache_dir={tmp_path}"]
    case = [{"image": cases["brats"]["image"]}]
    ssl = load_config("stage2_brats_test", ["data.roi=[64, 64, 64]", *cache]).data
    first = SampleStream(case, ssl, 0, random_transforms(ssl, False)).volumes[0]["image"]
    ssl_raw = load_config("stage2_brats_test", ["data.roi=[64, 64, 64]", "data.transforms.normalize.method=none", *cache]).data
    second = SampleStream(case, ssl_raw, 0, random_transforms(ssl_raw, False)).volumes[0]["image"]
    assert len(list(tmp_path.glob("*.pt"))) == 2 and not torch.equal(first, second)


def test_configs_of_older_runs_still_load() -> None:
    """Checkpoints and summaries written before ``data.transforms`` carry ``finetune.crop``."""
    old = {"stage": "finetune", "data": {"dataset": "brats", "roi": ROI}, "finetune": {"crop": "pos_neg", "loss": "dice"}}
    config = load_config(old)
    assert config.data.transforms.crop.mode == "pos_neg" and old["finetune"]["crop"] == "pos_neg"


def test_warm_persistent_reads_are_memory_mapped_and_equal(cases, tmp_path: Path, monkeypatch, caplog) -> None:
    cfg = load_config("stage2_brats_test", ["data.roi=[64, 64, 64]", "data.cache=persistent", f"data.cache_dir={tmp_path}"]).data
    case = [{"image": cases["brats"]["image"]}]
    cold = SampleStream(case, cfg, 0, random_transforms(cfg, False))[3]
    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("mmap")) or load(*a, **k))
    warm = SampleStream(case, cfg, 0, random_transforms(cfg, False))[3]
    assert calls == [True]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(cold, warm))
    # a corrupt entry is removed with a warning naming it, and recomputed
    entry = next(tmp_path.glob("*.pt"))
    entry.write_bytes(b"not a torch file")
    with caplog.at_level("WARNING", logger="bsf.data.pipeline"):
        again = SampleStream(case, cfg, 0, random_transforms(cfg, False))[3]
    assert entry.name in caplog.text and "recomputing" in caplog.text
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(cold, again))
