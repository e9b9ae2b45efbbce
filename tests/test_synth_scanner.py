"""The synthesiser's scanner profile: the default is today's output, each knob does what it says, bad values are named."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bsf.cli import main as bsf_main
from bsf.data.anatomy import Anatomy
from bsf.data.synth import T1, ScannerProfile, render, synthesize
from bsf.errors import ConfigError
from bsf.federation.site_config import SiteConfig, SyntheticData, prepare_site_data

SHAPE = (24, 24, 24)


def _anatomy(wm: np.ndarray) -> Anatomy:
    """A fabricated anatomy: white matter ``wm`` (no GM, no CSF), the whole volume brain."""
    zeros = np.zeros(SHAPE, np.float32)
    return Anatomy(gm=zeros, wm=wm.astype(np.float32), csf=zeros, brain=np.ones(SHAPE, bool))


def _render(anatomy: Anatomy, spacing: float = 1.0, **scanner) -> np.ndarray:
    return render(anatomy, T1, np.random.default_rng(7), scanner=ScannerProfile(**scanner), spacing=spacing)


def test_the_default_profile_is_todays_output(tmp_path: Path) -> None:
    """Measured on the synthesiser before the profile existed (brats, 1 case, 8 mm, seed 3): same sums, same labels."""
    synthesize("brats", 1, tmp_path, spacing=8.0, seed=3)
    case = tmp_path / "BraTS2021_00000"
    expected = {"flair": 1818137.655204773, "t1": 2487646.5571289062, "t1ce": 3132774.8269958496, "t2": 2469936.672973633}
    for modality, total in expected.items():
        image = np.asarray(nib.load(case / f"BraTS2021_00000_{modality}.nii.gz").dataobj, dtype=np.float64)
        assert image.sum() == pytest.approx(total, rel=1e-6), modality
    labels, counts = np.unique(np.asarray(nib.load(case / "BraTS2021_00000_seg.nii.gz").dataobj), return_counts=True)
    assert dict(zip(labels.tolist(), counts.tolist())) == {0: 16302, 1: 30, 2: 616, 4: 152}


def test_intensity_scale_multiplies_the_image() -> None:
    anatomy = _anatomy(np.ones(SHAPE))
    usual, bright = _render(anatomy), _render(anatomy, intensity_scale=2.5)
    np.testing.assert_allclose(bright, 2.5 * usual, rtol=1e-5)
    assert bright.mean() / usual.mean() == pytest.approx(2.5, rel=1e-5)


def test_noise_scales_the_rician_std_measured_where_there_is_no_signal() -> None:
    """On zero signal the image is Rayleigh: ``sigma = sqrt(mean(x^2) / 2)``; usual sigma is 1..3 % of 700..1300."""
    anatomy = _anatomy(np.zeros(SHAPE))
    sigma = {factor: math.sqrt(np.mean(_render(anatomy, noise=factor).astype(np.float64) ** 2) / 2) for factor in (1.0, 3.0)}
    assert 7.0 <= sigma[1.0] <= 39.0
    assert sigma[3.0] == pytest.approx(3.0 * sigma[1.0], rel=1e-5)
    assert np.all(_render(anatomy, noise=0.0) == 0.0)


def test_bias_field_multiplies_smoothly_with_the_set_strength() -> None:
    """Noise-free uniform tissue: ``log(image)`` is ``log(constant) + f`` with ``f`` of RMS ``bias_strength``."""
    anatomy = _anatomy(np.ones(SHAPE))
    flat = _render(anatomy, noise=0.0, bias_strength=0.0)
    assert np.ptp(flat) <= 1e-4 * flat.max()
    log_image = np.log(_render(anatomy, noise=0.0, bias_strength=0.4).astype(np.float64))
    assert np.sqrt(np.mean((log_image - log_image.mean()) ** 2)) == pytest.approx(0.4, rel=1e-4)
    # smooth: neighbours differ by far less than white noise of that RMS would (about 0.57 on average)
    assert max(np.abs(np.diff(log_image, axis=a)).max() for a in range(3)) < 0.2


def test_resolution_blurs_with_the_point_spread_function_of_that_fwhm() -> None:
    """A point of tissue at 2 mm spacing seen at 8 mm FWHM: its profile's variance is ``((8^2 - 2^2)^0.5 / 2.3548 / 2)^2`` voxels^2."""
    point = np.zeros(SHAPE)
    point[12, 12, 12] = 1.0
    anatomy = _anatomy(point)
    sharp = _render(anatomy, spacing=2.0, noise=0.0, bias_strength=0.0)
    blurred = _render(anatomy, spacing=2.0, noise=0.0, bias_strength=0.0, resolution=8.0)
    assert blurred.sum() == pytest.approx(sharp.sum(), rel=1e-4)  # the blur keeps the signal, spreads it
    sigma = math.sqrt(8.0**2 - 2.0**2) / (2 * math.sqrt(2 * math.log(2))) / 2.0
    profile = blurred.sum(axis=(1, 2)).astype(np.float64)
    x = np.arange(SHAPE[0]) - 12
    assert np.sum(profile * x**2) / profile.sum() == pytest.approx(sigma**2, rel=0.02)
    assert np.array_equal(_render(anatomy, spacing=2.0, resolution=2.0), _render(anatomy, spacing=2.0))


@pytest.mark.parametrize(("key", "value"), [("intensity_scale", 0), ("bias_strength", -0.1), ("noise", float("nan")),
                                            ("resolution", 0.1), ("noise", True), ("intensity_scale", "2")])
def test_a_bad_value_names_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"scanner\.{key} must be a number"):
        ScannerProfile(**{key: value})


def test_an_unknown_key_is_named_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"scanner\.contrast is not a scanner setting; choose from intensity_scale"):
        ScannerProfile.from_mapping({"contrast": 2})


def test_a_site_config_sets_a_scanner_and_synthesises_with_it(tmp_path: Path) -> None:
    synthetic = SyntheticData.from_yaml({"subjects": 1, "spacing": 8, "seed": 3, "scanner": {"intensity_scale": 2}}, "s.yaml")
    assert synthetic.scanner == ScannerProfile(intensity_scale=2.0)
    site = prepare_site_data(SiteConfig(site="site-1", synthetic=synthetic), "brats", tmp_path)
    root = Path(site.data["root"])
    assert root.name == "synthetic-brats-n1-s8-seed3-scan-i2-b0.15-n1"  # another scanner: another folder
    flair = np.asarray(nib.load(root / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz").dataobj, dtype=np.float64)
    assert flair.sum() == pytest.approx(2 * 1818137.655204773, rel=1e-5)  # twice the default profile's image
    with pytest.raises(ConfigError, match=r"site config s\.yaml: synthetic\.scanner\.noise must be a number"):
        SyntheticData.from_yaml({"scanner": {"noise": -1}}, "s.yaml")


def test_bsf_data_synth_takes_a_scanner(tmp_path: Path) -> None:
    out = tmp_path / "bright"
    assert bsf_main(["data", "synth", "--dataset", "brats", "--subjects", "1", "--out", str(out), "--spacing", "8",
              "--seed", "3", "--scanner", "intensity_scale=2", "noise=1"]) == 0
    flair = np.asarray(nib.load(out / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz").dataobj, dtype=np.float64)
    assert flair.sum() == pytest.approx(2 * 1818137.655204773, rel=1e-5)
