"""FedCostWAvg (``weigh_by: fedcostwavg``): the weights against a hand computation, the bounded loss claim, the
aggregate at the server, the losses the site reports, and the settings that cannot go with it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from bsf.config import FederationConfig
from bsf.errors import ConfigError
from bsf.federation.fedcost import MAX_COST_RATIO, cost_ratio, fedcost_weights
from bsf.federation.site_trainer import SiteTrainer
from bsf.fl.aggregation import CheckedFedAvgAggregator
from bsf.fl.deploy.privacy import check_result


def test_weights_by_hand():
    """n = 10, 30; c = 2, 1; alpha 0.5: a = 0.5 * 10/40 + 0.5 * 2/3, b = 0.5 * 30/40 + 0.5 * 1/3."""
    weights = fedcost_weights({"a": 10, "b": 30}, {"a": 2.0, "b": 1.0}, alpha=0.5)
    assert weights == pytest.approx({"a": 0.125 + 1 / 3, "b": 0.375 + 1 / 6})
    assert fedcost_weights({"a": 10, "b": 30}, {"a": 2.0, "b": 1.0}, alpha=1.0) == pytest.approx({"a": 0.25, "b": 0.75})


@pytest.mark.parametrize("metrics, ratio, note", [
    ({"loss_before": 1.0, "loss_after": 0.5}, 2.0, ""),
    ({"loss_before": 1.0, "loss_after": 1e-6}, MAX_COST_RATIO, "clipped"),
    ({"loss_before": 1.0}, 1.0, "no valid"),
    ({"loss_before": 1.0, "loss_after": -0.5}, 1.0, "no valid"),
    ({"loss_before": True, "loss_after": 0.5}, 1.0, "no valid"),
    ({"loss_before": "1", "loss_after": 0.5}, 1.0, "no valid"),
    ({"loss_before": float("nan"), "loss_after": 0.5}, 1.0, "no valid"),
    (None, 1.0, "no valid"),
])
def test_the_loss_claim_is_checked_and_bounded(metrics, ratio, note):
    got, why = cost_ratio(metrics)
    assert got == pytest.approx(ratio) and note in why and (note or why == "")


def _result(site: str, value: float, cases: int, before: float, after: float) -> FLModel:
    return FLModel(params={"swinViT.a": np.full(2, value, np.float32)}, params_type=ParamsType.DIFF,
                   metrics={"train_loss": 1.0, "loss_before": before, "loss_after": after},
                   meta={"client_name": site, "NUM_STEPS_CURRENT_ROUND": 4, "num_cases": cases})


def test_aggregate_is_the_fedcost_weighted_mean():
    """Updates 1 and 5, n = 10 and 30, c = 2 and 1 (alpha 0.5): 1 * 11/24 + 5 * 13/24 = 76/24."""
    agg = CheckedFedAvgAggregator(weigh_by="fedcostwavg", fedcost_alpha=0.5)
    agg.set_reference({"swinViT.a": np.zeros(2, np.float32)})
    agg.reset_stats()
    assert agg.accept_model(_result("site-1", 1.0, 10, before=2.0, after=1.0))
    assert agg.accept_model(_result("site-2", 5.0, 30, before=1.0, after=1.0))
    result = agg.aggregate_model()
    np.testing.assert_allclose(result.params["swinViT.a"], 76 / 24, rtol=1e-6)
    assert result.meta["weights"] == pytest.approx({"site-1": 11 / 24, "site-2": 13 / 24})
    assert result.meta["fedcostwavg"]["loss_improvement"] == {"site-1": 2.0, "site-2": 1.0}


def test_a_wild_loss_claim_is_clipped_and_noted():
    agg = CheckedFedAvgAggregator(weigh_by="fedcostwavg", fedcost_alpha=0.0)
    agg.set_reference({"swinViT.a": np.zeros(2, np.float32)})
    agg.reset_stats()
    agg.accept_model(_result("honest", 0.0, 10, before=1.0, after=1.0))
    agg.accept_model(_result("liar", 1.0, 10, before=1e9, after=1e-9))
    meta = agg.aggregate_model().meta
    assert meta["weights"] == pytest.approx({"honest": 1 / 11, "liar": 10 / 11})
    assert "clipped" in meta["weight_notes"]["liar"]


class _FakeEngine:
    """Losses 3, 2, 1.5 over three steps; one aggregated tensor that never moves."""

    step, num_train_cases = 0, 4
    config = SimpleNamespace(model=SimpleNamespace(modalities=[]))  # not a modality-aware model

    def get_weights(self, scope):
        return {"swinViT.a": np.zeros(2, np.float32)}

    def set_weights(self, weights):
        pass

    def train_steps(self, n):
        records = [{"step": self.step + i + 1, "loss": [3.0, 2.0, 1.5][self.step + i], "lr": 0.1} for i in range(n)]
        self.step += n
        return records


def test_the_site_reports_its_first_and_last_local_loss_and_the_guard_lets_them_leave():
    trainer = SiteTrainer(_FakeEngine(), FederationConfig(weigh_by="fedcostwavg", local_steps=3, validate_global=False))
    result = trainer.train({"swinViT.a": np.zeros(2, np.float32)}, 0)
    assert (result.metrics["loss_before"], result.metrics["loss_after"]) == (3.0, 1.5)
    assert check_result("WEIGHT_DIFF", result.params, {}, {}, {"swinViT.a": (2,)}) == []
    assert check_result("METRICS", result.metrics, {}, {}, None) == []
    plain = SiteTrainer(_FakeEngine(), FederationConfig(local_steps=3, validate_global=False))
    assert "loss_before" not in plain.train({"swinViT.a": np.zeros(2, np.float32)}, 0).metrics


@pytest.mark.parametrize("settings, key", [
    ({"fedcost_alpha": 1.5}, "federation.fedcost_alpha"),
    ({"weigh_by": "fedcostwavg", "robust": "median"}, "robust: median"),
    ({"algorithm": "scaffold", "encryption": "he", "cross_site_eval": False}, "algorithm: scaffold"),
])
def test_settings_that_cannot_work_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=key):
        FederationConfig(**settings)
