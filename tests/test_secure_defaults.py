"""The default federation section protects the global model: one wild site is refused by name, a degenerate round
is named, a malformed tensor is rejected by key, and the honest paths aggregate as before.

Every case is hand-computed on fabricated updates and runs the server's aggregator in-process
(:class:`bsf.fl.aggregation.CheckedFedAvgAggregator` built from a default :class:`bsf.config.FederationConfig`), or
its controller with just enough NVFlare context (:mod:`tests.nvflare_fakes`) where the round record is the point.
The default rule: an update above 10 x the round's median update norm (rounds of >= 3 updates) or above an RMS of
100 per value (every round) is refused.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from bsf.config import FederationConfig, load_config
from bsf.errors import ConfigError
from bsf.federation.update_checks import NormBound, RoundNorm, check_update, clip_to_norm, update_norm
from bsf.fl.aggregation import CheckedFedAvgAggregator
from bsf.fl.scaffold import CONTROL_DIFF
from tests.nvflare_fakes import site_context

KEY = "swinViT.a"
HONEST_1, HONEST_2 = [1.0, 2.0, 2.0], [2.0, 4.0, 4.0]  # norms 3 and 6


def _result(site: str, values, kind: str = "DIFF", steps: int = 4, **meta) -> FLModel:
    params = values if isinstance(values, dict) else {KEY: np.asarray(values, dtype=np.float32)}
    return FLModel(params=params, params_type=ParamsType(kind),
                   meta={"client_name": site, "NUM_STEPS_CURRENT_ROUND": steps, **meta})


def _aggregator(fed: FederationConfig | None = None, reference=None, **kwargs) -> CheckedFedAvgAggregator:
    """The server's aggregator of a (default) federation section, one 3-value key, global model zeros."""
    aggregator = CheckedFedAvgAggregator.for_federation(fed or FederationConfig(local_steps=4, min_clients=1), **kwargs)
    aggregator.set_reference(reference or {KEY: np.zeros(3, np.float32)})
    aggregator.reset_stats()
    return aggregator


def _round(aggregator: CheckedFedAvgAggregator, *results: FLModel) -> FLModel:
    for result in results:
        aggregator.accept_model(result)
    return aggregator.aggregate_model()


# ------------------------------------------------------------------ the default rule
def test_the_default_federation_section_has_the_norm_bound_on():
    fed = FederationConfig()
    assert (fed.norm_bound, fed.norm_bound_multiple, fed.norm_bound_rms) == (True, 10.0, 100.0)
    assert NormBound.from_config(fed) == NormBound(10.0, 100.0, True) and NormBound().active


def test_one_wild_site_of_three_is_refused_by_name_and_the_others_averaged(caplog):
    """Norms 3, 6 and sqrt(3) x 1e30: median 6, bound 10 x 6 = 60. The wild one is refused; global = the mean of the
    other two (equal weights): (1.5, 3, 3)."""
    with caplog.at_level(logging.ERROR):
        out = _round(_aggregator(), _result("site-1", HONEST_1), _result("site-2", HONEST_2),
                     _result("site-bad", [1e30, 1e30, 1e30]))
    np.testing.assert_array_equal(out.params[KEY], np.float32([1.5, 3.0, 3.0]))
    assert out.meta["accepted_sites"] == ["site-1", "site-2"] and out.meta["rejected_sites"] == ["site-bad"]
    assert out.meta["weights"] == {"site-1": 4.0, "site-2": 4.0}
    reason = out.meta["rejections"][0]["reason"]
    assert "norm 1.73205e+30" in reason and "bound 60" in reason and "10 x the round's median update norm 6" in reason
    assert "site site-bad" in caplog.text and "1.73205e+30" in caplog.text
    bound = out.meta["norm_bound"]
    assert bound["applied"] and bound["median_norm"] == 6.0 and bound["relative_bound"] == 60.0
    assert bound["norms"] == {"site-1": 3.0, "site-2": 6.0, "site-bad": 1.73205e30}
    assert bound["refused"] == {"site-bad": {"norm": 1.73205e30, "bound": 60.0, "by": "median"}}


@pytest.mark.parametrize("honest", [0, 1])
def test_a_wild_update_in_a_round_of_one_or_two_sites_meets_the_ceiling(honest):
    """No median in rounds of one or two: the ceiling 100 RMS x sqrt(3 values) = 173.205 refuses the wild update.
    With one honest site beside it the global model is that site's update, bit for bit; alone, the round is skipped."""
    results = [_result("site-1", HONEST_1)][:honest] + [_result("site-bad", [1e30, 0.0, 0.0])]
    out = _round(_aggregator(), *results)
    assert out.meta["rejected_sites"] == ["site-bad"]
    assert "bound 173.205" in out.meta["rejections"][0]["reason"] and "ceiling" in out.meta["rejections"][0]["reason"]
    assert out.meta["norm_bound"]["median_norm"] is None and out.meta["norm_bound"]["refused"]["site-bad"]["by"] == "ceiling"
    if honest:
        np.testing.assert_array_equal(out.params[KEY], np.float32(HONEST_1))
    else:
        assert out.params == {} and out.meta["round_skipped"]


def test_the_ceiling_is_exactly_rms_times_the_square_root_of_the_values():
    """Two sites: (173, 0, 0) has norm 173 <= 173.205 and is averaged in; (174, 0, 0) is refused."""
    out = _round(_aggregator(), _result("site-1", [173.0, 0, 0]), _result("site-2", [174.0, 0, 0]))
    assert out.meta["accepted_sites"] == ["site-1"] and out.meta["rejected_sites"] == ["site-2"]


def test_the_ceiling_also_holds_when_a_majority_is_wild():
    """Three sites, two wild: the median (1e30) bounds nothing useful, the ceiling still refuses both."""
    out = _round(_aggregator(), _result("site-1", HONEST_1), _result("w1", [1e30, 0, 0]), _result("w2", [2e30, 0, 0]))
    assert out.meta["rejected_sites"] == ["w1", "w2"]
    np.testing.assert_array_equal(out.params[KEY], np.float32(HONEST_1))


def test_an_explicit_opt_out_averages_the_wild_update_in():
    """``federation.norm_bound=off`` (YAML's off is false): (1 + 2 + 1e30) / 3 and (2 + 4 + 0) / 3, (2 + 4 + 0) / 3."""
    fed = load_config("stage1_test", ["federation.norm_bound=off", "train.steps=12"],
                      settings={"federation": {"local_steps": 4, "min_clients": 1}}).federation
    assert fed.norm_bound is False
    out = _round(_aggregator(fed), _result("site-1", HONEST_1), _result("site-2", HONEST_2),
                 _result("site-bad", [1e30, 0.0, 0.0]))
    assert out.meta["accepted_sites"] == ["site-1", "site-2", "site-bad"]
    np.testing.assert_allclose(out.params[KEY], [1e30 / 3, 2.0, 2.0], rtol=1e-6)
    assert out.meta["norm_bound"] == {"applied": False, "norms": {"site-1": 3.0, "site-2": 6.0, "site-bad": 1e30}}


def test_a_multiple_of_zero_keeps_only_the_ceiling():
    fed = FederationConfig(local_steps=4, min_clients=1, norm_bound_multiple=0)
    out = _round(_aggregator(fed), _result("site-1", HONEST_1), _result("site-2", HONEST_2), _result("big", [150.0, 0, 0]))
    assert out.meta["rejected_sites"] == [] and out.meta["norm_bound"]["relative_bound"] is None


def test_the_same_round_under_the_default_and_without_the_median():
    """150 is 25 x the median 6: refused by the default, not by the ceiling alone (150 <= 173.205)."""
    out = _round(_aggregator(), _result("site-1", HONEST_1), _result("site-2", HONEST_2), _result("big", [150.0, 0, 0]))
    assert out.meta["rejected_sites"] == ["big"] and out.meta["norm_bound"]["refused"]["big"]["by"] == "median"


@pytest.mark.parametrize("settings, key", [
    ({"norm_bound_multiple": 0.5}, "federation.norm_bound_multiple"),
    ({"norm_bound_rms": -1}, "federation.norm_bound_rms"),
    ({"norm_bound_multiple": 0, "norm_bound_rms": 0}, "norm_bound: off"),
    ({"norm_bound": "maybe"}, "federation.norm_bound"),
])
def test_bad_norm_bound_settings_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("stage1_test", settings={"train.steps": 12, "federation": settings})


def test_both_zero_is_fine_when_opted_out():
    assert not FederationConfig(norm_bound=False, norm_bound_multiple=0, norm_bound_rms=0).norm_bound


# ------------------------------------------------------------------ degenerate rounds
def _controller(tmp_path: Path, aggregator: CheckedFedAvgAggregator):
    from bsf.fl.controller import CheckedFedAvg

    controller = CheckedFedAvg(num_rounds=1, persistor_id="persistor", aggregator=aggregator)
    controller.fl_ctx = site_context(tmp_path)
    controller.current_round = 2
    controller._current_num_targets = 2
    controller.get_run_dir = lambda: str(tmp_path)
    return controller


def test_an_all_zero_round_is_named_in_the_round_record(tmp_path, caplog):
    aggregator = _aggregator()
    controller = _controller(tmp_path, aggregator)
    with caplog.at_level(logging.WARNING):
        aggregate = _round(aggregator, _result("site-1", [0, 0, 0]), _result("site-2", [0, 0, 0]))
    controller.update_model(FLModel(params={KEY: np.zeros(3, np.float32)}, params_type=ParamsType.FULL), aggregate)
    record = json.loads((tmp_path / "bsf_rounds.jsonl").read_text())
    assert "degenerate round" in record["degenerate"] and "site-1, site-2" in record["degenerate"]
    assert record["accepted_sites"] == ["site-1", "site-2"] and record["norm_bound"]["norms"] == {"site-1": 0.0, "site-2": 0.0}
    assert "degenerate round" in caplog.text


def test_a_round_with_one_zero_update_is_not_degenerate():
    out = _round(_aggregator(), _result("site-1", [0, 0, 0]), _result("site-2", HONEST_1))
    assert "degenerate" not in out.meta


def test_full_weights_equal_to_the_global_model_are_a_degenerate_round():
    glob = {KEY: np.float32([5.0, 5.0, 5.0])}
    out = _round(_aggregator(reference=glob), _result("site-1", [5, 5, 5], "FULL"), _result("site-2", [5, 5, 5], "FULL"))
    assert "degenerate round" in out.meta["degenerate"]


def test_the_refused_update_does_not_hide_a_degenerate_round():
    """Two zero updates and a wild one: the wild one is refused, what is left is all zeros."""
    out = _round(_aggregator(), _result("a", [0, 0, 0]), _result("b", [0, 0, 0]), _result("wild", [1e30, 0, 0]))
    assert out.meta["rejected_sites"] == ["wild"] and "(a, b)" in out.meta["degenerate"]


# ------------------------------------------------------------------ malformed tensors
@pytest.mark.parametrize("value, says", [
    ([[1.0, 2.0], [3.0]], "a ragged list (nested sequences of unequal lengths), not an array (expected an array of shape (3,))"),
    ([1.0, 2.0, 3.0], "a list of shape (3,), not an array (expected an array of shape (3,))"),
    ("1.0 2.0 3.0", "a str, not an array"),
    (None, "a NoneType, not an array"),
    (np.zeros((3, 1), np.float32), "swinViT.a: (3, 1) vs global (3,)"),
    (np.array([[1.0, 2.0], [3.0]], dtype=object), "not real floating point"),
    (np.array(["a", "b", "c"]), "not real floating point"),
])
def test_a_malformed_tensor_is_rejected_by_name_and_the_round_goes_on(value, says, caplog):
    params = {KEY: value, "swinViT.b": np.zeros(2, np.float32)}
    reference = {KEY: np.zeros(3, np.float32), "swinViT.b": np.zeros(2, np.float32)}
    aggregator = _aggregator(reference=reference)
    good = {KEY: np.float32(HONEST_1), "swinViT.b": np.float32([1.0, 1.0])}
    with caplog.at_level(logging.ERROR):
        assert aggregator.accept_model(_result("site-1", good))
        assert aggregator.accept_model(_result("site-bad", params)) is False
    out = aggregator.aggregate_model()
    reason = out.meta["rejections"][0]["reason"]
    assert out.meta["rejected_sites"] == ["site-bad"] and KEY in reason and says in reason, reason
    assert "site site-bad" in caplog.text
    np.testing.assert_array_equal(out.params[KEY], np.float32(HONEST_1))


@pytest.mark.parametrize("params", [[("swinViT.a", np.zeros(3))], "weights", np.zeros(3)])
def test_an_update_that_is_no_mapping_is_rejected(params):
    aggregator = _aggregator()
    assert aggregator.accept_model(FLModel(params={KEY: np.zeros(3, np.float32)}, params_type=ParamsType.DIFF,
                                           meta={"client_name": "ok"}))
    bad = FLModel(params={KEY: np.zeros(3, np.float32)}, params_type=ParamsType.DIFF, meta={"client_name": "bad"})
    bad.params = params  # FLModel's constructor would refuse it; a decoded message need not
    assert aggregator.accept_model(bad) is False
    assert "not a mapping" in aggregator.rejected[0][1] or "is empty" in aggregator.rejected[0][1]


def test_check_update_never_raises_on_ragged_input():
    problems = check_update({KEY: [[1.0], [2.0, 3.0]]}, {KEY: (3,)})
    assert problems and "ragged" in problems[0]


# ------------------------------------------------------------------ the honest paths under the defaults
def test_full_updates_are_measured_by_their_difference_to_the_global_model():
    """Global weights 1000 (RMS 1000, far above the ceiling): honest FULL updates 1000 + d are averaged; a FULL update
    1e30 away from the global model is refused. With two sites only the ceiling applies."""
    glob = {KEY: np.full(3, 1000.0, np.float32)}
    out = _round(_aggregator(reference=glob), _result("site-1", [1001, 1002, 1002], "FULL"),
                 _result("site-2", [1002, 1004, 1004], "FULL"), _result("bad", [1e30, 1000, 1000], "FULL"))
    assert out.meta["rejected_sites"] == ["bad"] and out.meta["norm_bound"]["norms"]["site-1"] == 3.0
    np.testing.assert_array_equal(out.params[KEY], np.float32([1001.5, 1003, 1003]))


def test_full_updates_are_measured_against_the_round_the_controller_started(tmp_path):
    """The controller hands each round's global model to the aggregator as it sends it."""
    aggregator = _aggregator()
    controller = _controller(tmp_path, aggregator)
    controller.broadcast_model = lambda **kwargs: None
    controller.send_model(data=FLModel(params={KEY: np.full(3, 500.0, np.float32)}, params_type=ParamsType.FULL), targets=[])
    out = _round(aggregator, _result("site-1", [501, 502, 502], "FULL"))
    assert out.meta["norm_bound"]["norms"] == {"site-1": 3.0} and out.meta["accepted_sites"] == ["site-1"]


def test_one_site_is_passed_bit_for_bit_under_the_defaults():
    update = np.random.default_rng(3).normal(scale=1e-3, size=3).astype(np.float32)
    out = _round(_aggregator(), _result("site-1", update.copy()))
    assert np.array_equal(out.params[KEY], update) and out.meta["norm_bound"]["refused"] == {}


def test_an_honest_round_of_the_test_model_passes_the_defaults_bit_for_bit(stage1_config):
    """One real round of the Stage 1 test model at a site, through the server's default aggregator: nothing is refused
    and the global model is the site's difference applied, bit for bit (tests/test_one_site_equality.py runs the same
    server arithmetic for every stage). Its RMS is orders of magnitude below the ceiling."""
    from bsf.engine import Engine
    from bsf.federation.site_trainer import SiteTrainer

    fed = FederationConfig(rounds=1, local_steps=2, min_clients=1, validate_global=False)
    site = SiteTrainer(Engine(stage1_config("train.steps=2", "data.crops_per_volume=1")), fed, site="site-1")
    initial = site.engine.get_weights(fed.scope)
    global_model = {k: initial[k] for k in site.scope_keys}
    result = site.train(global_model, 0)
    aggregator = CheckedFedAvgAggregator.for_federation(fed)
    aggregator.set_reference(global_model)
    aggregator.reset_stats()
    assert aggregator.accept_model(FLModel(params=result.params, params_type=ParamsType(result.params_type),
                                           meta={**result.meta, "client_name": "site-1"}))
    out = aggregator.aggregate_model()
    assert out.meta["accepted_sites"] == ["site-1"] and out.meta["norm_bound"]["refused"] == {}
    assert all(np.array_equal(out.params[k], result.params[k]) for k in result.params)
    size = sum(v.size for v in result.params.values())
    assert update_norm(result.params) / math.sqrt(size) < 1e-2 * fed.norm_bound_rms


def test_scaffold_control_changes_are_bounded_too():
    """Three SCAFFOLD sites, the third's control change 1e30: refused by name of the meta key; c is the others' mean."""
    fed = FederationConfig(local_steps=4, min_clients=1, algorithm="scaffold")
    results = [_result(site, HONEST_1, **{CONTROL_DIFF: {KEY: np.float32(c)}})
               for site, c in (("site-1", [1, 0, 0]), ("site-2", [3, 0, 0]), ("bad", [1e30, 0, 0]))]
    out = _round(_aggregator(fed), *results)
    assert out.meta["rejected_sites"] == ["bad"] and CONTROL_DIFF in out.meta["rejections"][0]["reason"]
    np.testing.assert_array_equal(out.meta[CONTROL_DIFF][KEY], np.float32([2, 0, 0]))
    assert out.meta["norm_bound"]["scaffold_control"]["refused"]["bad"]["by"] == "median"


def test_fedcostwavg_weighs_only_the_kept_sites():
    fed = FederationConfig(local_steps=4, min_clients=1, weigh_by="fedcostwavg")
    results = [FLModel(params={KEY: np.float32(v)}, params_type=ParamsType.DIFF, metrics=m,
                       meta={"client_name": s, "num_cases": 10})
               for s, v, m in (("site-1", HONEST_1, {"loss_before": 2.0, "loss_after": 1.0}),
                               ("site-2", HONEST_2, {"loss_before": 2.0, "loss_after": 1.0}),
                               ("bad", [1e30, 0, 0], {"loss_before": 2.0, "loss_after": 1.0}))]
    out = _round(_aggregator(fed), *results)
    assert out.meta["rejected_sites"] == ["bad"] and set(out.meta["weights"]) == {"site-1", "site-2"}
    np.testing.assert_allclose(out.params[KEY], [1.5, 3.0, 3.0], rtol=1e-6)


def test_robust_clip_runs_on_what_the_norm_bound_kept():
    """Norms 3, 6, 30 and 1.7e30: the norm bound (10 x the median 18) refuses the last; clip (1 x the median of
    3, 6, 30 = 6) then scales site-3 to (6, 0, 0)."""
    fed = FederationConfig(local_steps=4, min_clients=1, robust="clip", clip_multiple=1.0)
    out = _round(_aggregator(fed), _result("site-1", HONEST_1), _result("site-2", HONEST_2),
                 _result("site-3", [30.0, 0, 0]), _result("bad", [1e30, 0, 0]))
    assert out.meta["rejected_sites"] == ["bad"]
    assert out.meta["robust"]["bound"] == 6.0 and list(out.meta["robust"]["clipped"]) == ["site-3"]
    np.testing.assert_allclose(out.params[KEY], [(1 + 2 + 6) / 3, 2.0, 2.0], rtol=1e-6)


def test_per_task_heads_with_a_wild_site():
    """stage3_all-like: two BraTS sites and an ATLAS site with a wild update; the ATLAS head stays unchanged."""
    shared, brats, atlas = "decoder1.conv.weight", "task.brats.out.conv.conv.weight", "task.atlas.out.conv.conv.weight"
    fed = FederationConfig(scope="all", tasks=["brats", "atlas"], local_steps=4, min_clients=1)
    reference = {shared: np.zeros(2, np.float32), brats: np.zeros(3, np.float32), atlas: np.zeros(1, np.float32)}
    results = [_result("b1", {shared: np.float32([1, 1]), brats: np.float32([1, 1, 1])}),
               _result("b2", {shared: np.float32([3, 3]), brats: np.float32([3, 3, 3])}),
               _result("a1", {shared: np.float32([1e30, 0]), atlas: np.float32([1])})]
    out = _round(_aggregator(fed, reference=reference), *results)
    assert out.meta["rejected_sites"] == ["a1"] and atlas not in out.params
    np.testing.assert_array_equal(out.params[shared], np.float32([2, 2]))
    np.testing.assert_array_equal(out.params[brats], np.float32([2, 2, 2]))


def test_modality_aware_aggregation_leaves_the_refused_site_out():
    """Per-modality first layer: the wild site's filters do not enter the per-channel mean."""
    from bsf.federation.modality import PATCH_EMBED_WEIGHT

    reference = {PATCH_EMBED_WEIGHT: np.zeros((1, 2, 1), np.float32), KEY: np.zeros(3, np.float32)}
    results = [_result(site, {PATCH_EMBED_WEIGHT: np.full((1, 2, 1), v, np.float32), KEY: np.full(3, v, np.float32)},
                       modalities=held)
               for site, v, held in (("s1", 1.0, ["t1", "flair"]), ("s2", 3.0, ["t1"]), ("bad", 1e30, ["t1", "flair"]))]
    out = _round(_aggregator(reference=reference, modalities=("t1", "flair")), *results)
    assert out.meta["rejected_sites"] == ["bad"] and set(out.meta["modalities"]["sites"]) == {"s1", "s2"}
    # t1 over s1 and s2: 2; flair over s1 alone: 1
    np.testing.assert_array_equal(out.params[PATCH_EMBED_WEIGHT][0, :, 0], np.float32([2, 1]))
    np.testing.assert_array_equal(out.params[KEY], np.float32([2, 2, 2]))


def test_fedopt_steps_on_what_the_norm_bound_kept(tmp_path):
    from bsf.fl.controller import CheckedFedAvg

    aggregator = _aggregator()
    controller = CheckedFedAvg(num_rounds=1, persistor_id="persistor", aggregator=aggregator,
                               fedopt={"kind": "momentum", "lr": 1.0, "beta1": 0.0})
    controller.fl_ctx, controller.current_round, controller._current_num_targets = site_context(tmp_path), 0, 3
    controller.get_run_dir = lambda: str(tmp_path)
    aggregate = _round(aggregator, _result("site-1", HONEST_1), _result("site-2", HONEST_2), _result("bad", [1e30, 0, 0]))
    model = controller.update_model(FLModel(params={KEY: np.zeros(3, np.float32)}, params_type=ParamsType.FULL), aggregate)
    np.testing.assert_allclose(model.params[KEY], [1.5, 3.0, 3.0], rtol=1e-6)
    record = json.loads((tmp_path / "bsf_rounds.jsonl").read_text())
    assert record["rejected_sites"] == ["bad"] and record["norm_bound"]["refused"]["bad"]["norm"] == 1e30


def test_encrypted_jobs_say_the_norm_bound_does_not_apply(caplog):
    pytest.importorskip("tenseal")
    from bsf.fl.he import HEFedAvgAggregator

    aggregator = HEFedAvgAggregator(min_accepted=1, expected_steps=4)
    aggregator.set_reference({KEY: np.zeros(3, np.float32)})
    aggregator.reset_stats()
    with caplog.at_level(logging.WARNING):
        out = aggregator.aggregate_model()
    assert out.meta["norm_bound"]["applied"] is False and "ciphertexts" in out.meta["norm_bound"]["reason"]
    assert "cannot measure the sites' update norms" in caplog.text


# ------------------------------------------------------------------ the pure pieces
def test_norm_bound_refusals_by_hand():
    reasons, report = NormBound(2.0, 0.0).refusals([RoundNorm("a", 1.0, 4), RoundNorm("b", 2.0, 4), RoundNorm("c", 4.5, 4)])
    assert reasons[:2] == [None, None] and "above the bound 4" in reasons[2]
    assert report["median_norm"] == 2.0 and report["relative_bound"] == 4.0


def test_a_median_of_zero_bounds_nothing_but_the_ceiling_still_does():
    reasons, _ = NormBound().refusals([RoundNorm("a", 0.0, 4), RoundNorm("b", 0.0, 4), RoundNorm("c", 1.0, 4)])
    assert reasons == [None, None, None]


def test_update_norm_of_full_weights_against_a_reference_and_clipping():
    assert update_norm({"a": np.float32([4.0, 6.0])}, {"a": np.float32([1.0, 2.0])}) == 5.0
    clipped, factor = clip_to_norm({"a": np.float64([3.0, 4.0])}, 1.0)
    assert factor == 0.2 and update_norm(clipped) == pytest.approx(1.0)
    same, one = clip_to_norm({"a": np.float64([0.3, 0.4])}, 1.0)
    assert one == 1.0 and same["a"].tolist() == [0.3, 0.4]
