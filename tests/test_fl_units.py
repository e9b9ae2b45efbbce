"""Unit tests of the federation glue: aggregation, update checks, site configuration, export."""

from __future__ import annotations

import numpy as np
import pytest

from bsf.errors import ConfigError
from bsf.fl.aggregation import CheckedFedAvgAggregator, WeightedMean, check_update, update_weight, weighted_average
from bsf.federation.site_config import ENV_SITE_CONFIG, SyntheticData, resolve_site, site_seed

REF = {"swinViT.a": (2, 3), "swinViT.b": (4,)}


def _params(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in REF.items()}


# ------------------------------------------------------------------ update checks
def test_check_update_accepts_matching_finite_update():
    assert check_update(_params(1.0), REF) == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_update_rejects_non_finite(bad):
    p = _params(1.0)
    p["swinViT.b"][2] = bad
    problems = check_update(p, REF)
    assert problems and "NaN/Inf" in problems[0] and "swinViT.b" in problems[0]


def test_check_update_rejects_key_and_shape_mismatches():
    p = _params(1.0)
    p["rotation_head.weight"] = np.zeros(3, np.float32)
    assert any("not in the global model" in x for x in check_update(p, REF))
    p = _params(1.0)
    del p["swinViT.a"]
    assert any("missing" in x for x in check_update(p, REF))
    p = _params(1.0)
    p["swinViT.a"] = np.zeros((3, 2), np.float32)
    assert any("shape mismatch" in x for x in check_update(p, REF))
    assert check_update({}, REF) == ["the update is empty"]


# ------------------------------------------------------------------ weighting
def test_step_weighted_average_on_a_controlled_case():
    # site A: 1 step with value 1; site B: 3 steps with value 5 -> (1*1 + 3*5) / 4 = 4
    a, _ = update_weight({"NUM_STEPS_CURRENT_ROUND": 1, "num_cases": 30}, "steps")
    b, _ = update_weight({"NUM_STEPS_CURRENT_ROUND": 3, "num_cases": 10}, "steps")
    avg = weighted_average([(_params(1.0), a), (_params(5.0), b)])
    for k, shape in REF.items():
        assert avg[k].dtype == np.float32 and avg[k].shape == shape
        np.testing.assert_allclose(avg[k], 4.0, rtol=0, atol=1e-7)
    # by cases: (30*1 + 10*5) / 40 = 2
    ca, _ = update_weight({"NUM_STEPS_CURRENT_ROUND": 1, "num_cases": 30}, "cases")
    cb, _ = update_weight({"NUM_STEPS_CURRENT_ROUND": 3, "num_cases": 10}, "cases")
    np.testing.assert_allclose(weighted_average([(_params(1.0), ca), (_params(5.0), cb)])["swinViT.a"], 2.0)
    assert update_weight({"NUM_STEPS_CURRENT_ROUND": 7}, "uniform") == (1.0, "")
    assert update_weight({}, "steps")[0] == 1.0  # missing -> neutral, like NVFlare's FedAvg
    assert update_weight({"NUM_STEPS_CURRENT_ROUND": float("nan")}, "steps")[0] == 1.0
    with pytest.raises(ConfigError, match="bogus"):
        update_weight({}, "bogus")


def test_weighted_mean_random_case_matches_numpy():
    rng = np.random.default_rng(0)
    ups = [{k: rng.normal(size=s).astype(np.float32) for k, s in REF.items()} for _ in range(3)]
    w = [2.0, 5.0, 1.0]
    mean = WeightedMean()
    for u, wi in zip(ups, w):
        mean.add(u, wi)
    out = mean.result()
    for k in REF:
        expected = sum(u[k].astype(np.float64) * wi for u, wi in zip(ups, w)) / sum(w)
        np.testing.assert_allclose(out[k], expected, rtol=1e-6)


# ------------------------------------------------------------------ the NVFlare aggregator
def _result(site: str, value: float, steps: int, params_type="DIFF"):
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    return FLModel(
        params=_params(value),
        params_type=ParamsType(params_type),
        metrics={"val_reconstruction_l1": value},
        meta={"client_name": site, "NUM_STEPS_CURRENT_ROUND": steps, "num_cases": 4},
    )


def test_aggregator_rejects_nan_site_and_averages_the_others(caplog):
    agg = CheckedFedAvgAggregator(weigh_by="steps", min_accepted=2)
    agg.set_reference(_params(0.0))
    agg.reset_stats()
    assert agg.accept_model(_result("site-1", 1.0, 1)) is True
    assert agg.accept_model(_result("site-bad", float("nan"), 1)) is False
    assert agg.accept_model(_result("site-2", 5.0, 3)) is True
    assert "site-bad" in caplog.text and "NaN/Inf" in caplog.text
    out = agg.aggregate_model()
    assert out.meta["accepted_sites"] == ["site-1", "site-2"]
    assert out.meta["rejected_sites"] == ["site-bad"]
    np.testing.assert_allclose(out.params["swinViT.a"], 4.0)
    assert out.params_type.value == "DIFF"


def test_aggregator_keeps_global_when_too_few_updates_survive():
    agg = CheckedFedAvgAggregator(min_accepted=2)
    agg.set_reference(_params(0.0))
    agg.reset_stats()
    agg.accept_model(_result("site-1", 1.0, 1))
    agg.accept_model(_result("site-2", float("inf"), 1))
    out = agg.aggregate_model()
    assert out.params == {} and out.params_type.value == "DIFF" and out.meta["round_skipped"]


def test_aggregator_single_update_is_passed_bit_for_bit():
    agg = CheckedFedAvgAggregator(min_accepted=1)
    agg.set_reference(_params(0.0))
    agg.reset_stats()
    r = _result("site-1", 0.1, 3, "FULL")
    r.params["swinViT.a"] = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    expected = r.params["swinViT.a"].copy()
    agg.accept_model(r)
    out = agg.aggregate_model()
    assert np.array_equal(out.params["swinViT.a"], expected)


def test_aggregator_rejects_mixed_params_types():
    agg = CheckedFedAvgAggregator()
    agg.set_reference(_params(0.0))
    agg.reset_stats()
    assert agg.accept_model(_result("site-1", 1.0, 1, "DIFF"))
    assert not agg.accept_model(_result("site-2", 1.0, 1, "FULL"))


# ------------------------------------------------------------------ site configuration
def test_site_without_configuration_synthesises(tmp_path):
    setup = resolve_site("site-7", tmp_path, environ={})
    assert setup.synthesises and setup.synthetic == SyntheticData() and setup.settings() == {}
    # the CRC-32 of the name (not Python's per-process hash): the same seed on every machine and run
    assert site_seed("site-7") == 444_598_800 and site_seed("site-8") == 171_906_945


def test_site_config_from_local_folder_and_env_map(tmp_path):
    ws = tmp_path / "ws"
    (ws / "local").mkdir(parents=True)
    (ws / "local" / "bsf_site.yaml").write_text("data:\n  root: /data/ukb\ntrain:\n  device: cpu\n")
    setup = resolve_site("hospital-a", ws, environ={})
    assert setup.settings() == {"data.root": "/data/ukb", "train.device": "cpu"}
    assert not setup.synthesises

    (tmp_path / "one.yaml").write_text("data: {root: /d1}\n")
    site_map = tmp_path / "map.yaml"
    site_map.write_text("sites:\n  site-1: one.yaml\n  site-2: {synthetic: {subjects: 3}}\n")
    env = {ENV_SITE_CONFIG: str(site_map)}
    assert resolve_site("site-1", ws, environ=env).settings() == {"data.root": "/d1"}
    s2 = resolve_site("site-2", ws, environ=env)
    assert s2.synthesises and s2.synthetic == SyntheticData(subjects=3, spacing=SyntheticData().spacing)
    # unlisted in the map -> falls through to the site's local file
    assert resolve_site("site-3", ws, environ=env).setting("data.root") == "/data/ukb"


def test_site_config_rejects_unknown_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dta: {root: /x}\n")
    with pytest.raises(ConfigError, match="dta"):
        resolve_site("s", tmp_path, environ={ENV_SITE_CONFIG: str(bad)})
    bad.write_text("train: {steps: 5}\n")
    with pytest.raises(ConfigError, match="train.steps"):
        resolve_site("s", tmp_path, environ={ENV_SITE_CONFIG: str(bad)})


# ------------------------------------------------------------------ global model -> encoder checkpoint
def test_export_global_encoder_and_initial_checkpoint(tmp_path):
    import torch

    from bsf.engine import load_config
    from bsf.federation.export import export_global_encoder
    from bsf.federation.initial_model import checkpoint_weights, initial_weights

    cfg = load_config("stage1_test")
    enc = initial_weights(cfg, "encoder")
    run = tmp_path / "server" / "simulate_job" / "app_server"
    run.mkdir(parents=True)
    torch.save({"model": {k: torch.from_numpy(v) * 2 for k, v in enc.items()}, "train_conf": {}}, run / "FL_global_model.pt")
    out = export_global_encoder(tmp_path, tmp_path / "enc.pt")  # a simulator workspace is enough
    state = torch.load(out, weights_only=True)["state_dict"]
    assert set(state) == set(enc) and all(torch.equal(state[k], torch.from_numpy(enc[k]) * 2) for k in enc)
    # ... and the next federation can start from it
    again = checkpoint_weights(cfg, str(out), "encoder")
    assert all(np.array_equal(again[k], enc[k] * 2) for k in enc)
