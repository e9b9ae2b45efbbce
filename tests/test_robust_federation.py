"""Robust aggregation, FedOpt's server step, slow sites: each rule against a hand computation on fabricated updates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants

from bsf.config import load_config
from bsf.errors import ConfigError
from bsf.federation.robust import RobustRule, robust_aggregate, update_norm
from bsf.federation.server_opt import ServerOptimizer
from bsf.fl.aggregation import CheckedFedAvgAggregator
from tests.nvflare_fakes import site_context


def _u(site: str, values, weight: float = 1.0):
    return (site, {"swinViT.a": np.asarray(values, dtype=np.float32)}, weight)


# ------------------------------------------------------------------ the rules, by hand
def test_clip_to_a_fixed_bound_scales_only_the_long_update():
    """a = (3, 4) has norm 5 > 1: scaled by 1/5 to (0.6, 0.8); b = (0.3, 0.4) is inside; mean (0.45, 0.6)."""
    out, report = robust_aggregate([_u("a", [3, 4]), _u("b", [0.3, 0.4])], RobustRule("clip", clip_bound=1.0))
    np.testing.assert_allclose(out["swinViT.a"], [0.45, 0.6], rtol=1e-6)
    assert report["clipped"] == {"a": {"norm": 5.0, "scale": 0.2}}
    assert report["bound"] == 1.0 and report["norms"] == {"a": 5.0, "b": 0.5}


def test_clip_to_a_multiple_of_the_median_norm_keeps_weights():
    """Norms 1, 2, 100: median 2, bound 2 x 2 = 4; c -> c * 0.04 = (4, 0); weighted (1, 1, 2) mean of x-coordinates."""
    updates = [_u("a", [1, 0]), _u("b", [0, 2]), _u("c", [100, 0], weight=2.0)]
    out, report = robust_aggregate(updates, RobustRule("clip", clip_multiple=2.0))
    np.testing.assert_allclose(out["swinViT.a"], [(1 + 0 + 2 * 4) / 4, (0 + 2 + 0) / 4], rtol=1e-6)
    assert report["bound"] == 4.0 and list(report["clipped"]) == ["c"] and report["clipped"]["c"]["scale"] == 0.04


def test_trimmed_mean_drops_the_extremes_of_each_coordinate():
    """Five sites, trim 0.2 -> one value dropped at each end of every coordinate, whichever site sent it."""
    cols = [[1, 50], [2, -40], [3, 3], [4, 4], [100, 5]]
    out, report = robust_aggregate([_u(f"s{i}", c, weight=i + 1) for i, c in enumerate(cols)],
                                   RobustRule("trimmed_mean", trim_fraction=0.2))
    np.testing.assert_allclose(out["swinViT.a"], [(2 + 3 + 4) / 3, (3 + 4 + 5) / 3], rtol=1e-6)
    assert report["trimmed_per_end"] == 1


def test_coordinate_median_odd_and_even():
    odd, _ = robust_aggregate([_u("a", [1, 9]), _u("b", [5, 0]), _u("c", [2, 3])], RobustRule("median"))
    even, _ = robust_aggregate([_u(s, [v]) for s, v in zip("abcd", [1, 2, 3, 10])], RobustRule("median"))
    np.testing.assert_allclose(odd["swinViT.a"], [2, 3])
    np.testing.assert_allclose(even["swinViT.a"], [2.5])


@pytest.mark.parametrize("attack", ["scaled", "sign_flipped"])
def test_one_poisoned_site_of_three(attack):
    """Honest sites send h + noise (||h|| = 1, noise 0.01 per coordinate); the third sends 10 h or -10 h.

    Stated distances to the honest 2-site mean m: FedAvg > 2.5 ||h||. The coordinate median and the trimmed mean
    (trim 1/3: one value off each end, which is the median of three) pick, per coordinate, a value between the
    two honest ones or an honest one, so they stay within s = ||u1 - u2|| / 2 (the honest spread) of m. The norm
    bound at 1.5 x the median norm cuts the bad site to 1.5 ||u|| and its share to a third of that: < 0.3 ||h||
    (scaled, same direction as the honest sites) and < 0.9 ||h|| (sign flipped).
    """
    rng = np.random.default_rng(0)
    h = rng.normal(size=200)
    h /= np.linalg.norm(h)
    honest = [h + rng.normal(scale=0.01, size=200) for _ in range(2)]
    bad = 10 * h if attack == "scaled" else -10 * h
    updates = [_u("site-1", honest[0]), _u("site-2", honest[1]), _u("site-bad", bad)]
    target = (honest[0] + honest[1]) / 2
    spread = float(np.linalg.norm(honest[0] - honest[1])) / 2

    def distance(rule: RobustRule) -> float:
        return float(np.linalg.norm(robust_aggregate(updates, rule)[0]["swinViT.a"] - target))

    assert distance(RobustRule("none")) > 2.5
    assert distance(RobustRule("median")) <= spread + 1e-5
    assert distance(RobustRule("trimmed_mean", trim_fraction=0.34)) <= spread + 1e-5
    assert distance(RobustRule("clip", clip_multiple=1.5)) < (0.3 if attack == "scaled" else 0.9)


def test_update_norm_spans_all_tensors():
    assert update_norm({"a": np.array([3.0]), "b": np.array([[4.0]])}) == 5.0


# ------------------------------------------------------------------ the aggregator and the config
def _result(site: str, values, kind: str = "DIFF") -> FLModel:
    return FLModel(params={"swinViT.a": np.asarray(values, dtype=np.float32)}, params_type=ParamsType(kind),
                   meta={"client_name": site, "NUM_STEPS_CURRENT_ROUND": 4})


def test_aggregator_with_a_norm_bound_says_whose_update_was_clipped():
    agg = CheckedFedAvgAggregator(expected_steps=4, robust="clip", clip_bound=1.0)
    agg.set_reference({"swinViT.a": np.zeros(2, np.float32)})
    agg.reset_stats()
    assert agg.accept_model(_result("site-1", [0.3, 0.4]))
    assert agg.accept_model(_result("site-2", [30, 40]))
    out = agg.aggregate_model()
    np.testing.assert_allclose(out.params["swinViT.a"], [0.45, 0.6], rtol=1e-6)
    assert out.meta["robust"]["clipped"] == {"site-2": {"norm": 50.0, "scale": 0.02}}
    assert out.meta["accepted_sites"] == ["site-1", "site-2"]


def test_aggregator_with_a_robust_rule_refuses_full_weights():
    agg = CheckedFedAvgAggregator(robust="median")
    agg.set_reference({"swinViT.a": np.zeros(2, np.float32)})
    agg.reset_stats()
    assert not agg.accept_model(_result("site-1", [1, 1], "FULL"))
    assert "median needs weight differences" in agg.rejected[0][1]


@pytest.mark.parametrize("settings, key", [
    ({"robust": "clip"}, "clip needs exactly one of clip_bound"),
    ({"robust": "clip", "clip_bound": 1.0, "clip_multiple": 2.0}, "clip needs exactly one of clip_bound"),
    ({"robust": "krum"}, "federation.robust: 'krum'"),
    ({"trim_fraction": 0.5}, "federation.trim_fraction"),
    ({"clip_multiple": 0.5}, "federation.clip_multiple"),
    ({"robust": "median", "transfer": "full"}, "set federation.transfer: diff"),
    ({"min_responses": 1}, "federation.min_responses"),
    ({"algorithm": "fedopt", "fedopt_lr": 0}, "federation.fedopt_lr"),
    ({"fedopt_optimizer": "sgd"}, "federation.fedopt_optimizer"),
    ({"fedprox_mu": -1}, "federation.fedprox_mu"),
])
def test_bad_federation_settings_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        load_config("stage1_test", settings={"train.steps": 12, "federation": settings})


# ------------------------------------------------------------------ FedOpt's server step
def test_server_momentum_by_hand():
    opt = ServerOptimizer("momentum", lr=0.5, beta1=0.9)
    assert opt.step({"a": np.array([1.0])})["a"][0] == pytest.approx(0.5)  # m = 1
    assert opt.step({"a": np.array([2.0])})["a"][0] == pytest.approx(0.5 * (0.9 * 1 + 2))  # m = 2.9


def test_server_adam_by_hand():
    opt = ServerOptimizer("adam", lr=1.0, beta1=0.9, beta2=0.99, eps=1e-3)
    # m = 0.1, v = 0.01: 0.1 / (0.1 + 0.001)
    assert opt.step({"a": np.array([1.0])})["a"][0] == pytest.approx(0.1 / 0.101, rel=1e-6)
    # m = 0.09 + 0.1 * (-1) = -0.01, v = 0.0099 + 0.01 = 0.0199
    assert opt.step({"a": np.array([-1.0])})["a"][0] == pytest.approx(-0.01 / (0.0199 ** 0.5 + 1e-3), rel=1e-6)


def test_server_momentum_without_memory_is_fedavg():
    d = {"a": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)}
    assert np.array_equal(ServerOptimizer("momentum", lr=1.0, beta1=0.0).step(d)["a"], d["a"])


# ------------------------------------------------------------------ the controller's round record
def _controller(tmp_path: Path, **options):
    from bsf.fl.controller import CheckedFedAvg

    aggregator = CheckedFedAvgAggregator(expected_steps=4, min_accepted=1)
    aggregator.set_reference({"swinViT.a": np.zeros(2, np.float32)})
    controller = CheckedFedAvg(num_rounds=2, persistor_id="persistor", aggregator=aggregator, **options)
    controller.fl_ctx = site_context(tmp_path)
    controller.current_round = 1
    controller._current_num_targets = 2
    controller.get_run_dir = lambda: str(tmp_path)
    return controller, aggregator


class _Client:
    def __init__(self, name: str):
        self.name = name


def test_round_record_names_missing_and_late_sites_and_drops_the_late_result(tmp_path, caplog):
    controller, aggregator = _controller(tmp_path, min_responses=1, wait_time_after_min_received=2)
    controller._asked, controller._answered = ["site-1", "site-2"], set()
    aggregator.reset_stats()
    ok = Shareable()
    assert controller._accept_train_result("site-1", ok, controller.fl_ctx)
    aggregator.accept_model(_result("site-1", [1, 1]))
    late = Shareable()
    late.set_header(AppConstants.CURRENT_ROUND, 0)
    controller.process_result_of_unknown_task(_Client("site-2"), "train", "task-id", late, controller.fl_ctx)
    assert "DROPPED the late result of site site-2 for round 0" in caplog.text
    controller.update_model(FLModel(params={"swinViT.a": np.zeros(2, np.float32)}, params_type=ParamsType.FULL),
                            aggregator.aggregate_model())
    record = json.loads((tmp_path / "bsf_rounds.jsonl").read_text())
    assert record["accepted_sites"] == ["site-1"] and record["missing_sites"] == ["site-2"]
    assert record["late_results"] == [{"site": "site-2", "round": 0}]
    assert len(aggregator.rejected) == 0  # the late result was not aggregated


def test_fedopt_controller_applies_the_server_step(tmp_path):
    controller, aggregator = _controller(tmp_path, fedopt={"kind": "momentum", "lr": 2.0, "beta1": 0.5})
    global_model = FLModel(params={"swinViT.a": np.ones(2, np.float32)}, params_type=ParamsType.FULL)
    for expected in (1 + 2 * 0.25, 1 + 2 * 0.25 + 2 * (0.5 * 0.25 + 0.25)):
        aggregator.reset_stats()
        aggregator.accept_model(_result("site-1", [0.25, 0.25]))
        global_model = controller.update_model(global_model, aggregator.aggregate_model())
        np.testing.assert_allclose(global_model.params["swinViT.a"], expected, rtol=1e-6)
    record = json.loads((tmp_path / "bsf_rounds.jsonl").read_text().splitlines()[-1])
    assert record["fedopt"]["optimizer"] == "momentum"


# ------------------------------------------------------------------ a slow site in the simulator
SLOW_ENTRY = '''"""Test-only entry script: site-2 holds its round-0 result back, so it misses the round's cutoff."""
import os
import time

from bsf.federation.site_trainer import SiteTrainer
from bsf.fl.client import main

_train = SiteTrainer.train


def _slow_train(self, params, current_round, **kwargs):
    result = _train(self, params, current_round, **kwargs)
    if self.site == "site-2" and current_round == 0:
        time.sleep(float(os.environ["BSF_TEST_SLOW_SECONDS"]))
    return result


SiteTrainer.train = _slow_train
main()
'''


@pytest.mark.slow
def test_slow_site_misses_the_cutoff_and_the_round_closes_without_it(tmp_path):
    """min_responses=1, 1 s after it: round 0 closes with site-1 alone and names site-2 as missing.

    site-2 sleeps 15 s *after* training round 0 (the test's own entry script), so whatever the machine's speed
    its result cannot arrive before site-1's plus the 1 s cutoff. Its round-0 update never enters a global model.
    """
    import os
    import subprocess
    import sys

    from bsf.config import FederationConfig
    from bsf.federation import run_folders
    from bsf.fl.jobs import JobSpec, export_job

    fed = FederationConfig(rounds=2, local_steps=1, min_clients=1, min_responses=1, wait_time_after_min_received=1,
                           validate_global=False, cross_site_eval=False)
    job = export_job(JobSpec(name="slow", federation=fed, run_overrides=["data.crops_per_volume=1"]), tmp_path / "jobs")
    (job / "app" / "custom" / "bsf_client.py").write_text(SLOW_ENTRY)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BSF_TEST_SLOW_SECONDS": "15"}
    env.pop("BSF_SITE_CONFIG", None)
    workspace = tmp_path / "ws"
    nvflare = str(Path(sys.executable).with_name("nvflare"))
    proc = subprocess.run([nvflare, "simulator", str(job), "-w", str(workspace), "-n", "2", "-t", "2"],
                          env=env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]

    run_dir = run_folders.simulator_run(workspace)
    rounds = run_folders.read_rounds(run_dir)
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["accepted_sites"] == ["site-1"] and rounds[0]["missing_sites"] == ["site-2"]
    assert rounds[0]["asked_sites"] == ["site-1", "site-2"]
    assert run_folders.global_model(run_dir).is_file()


# ------------------------------------------------------------------ FedProx at the site
def test_fedprox_term_is_mu_half_squared_distance_to_the_round_global_model():
    """mu = 0.5, every parameter of a Linear(3, 2) moved by 0.1 after the round's start: 0.25 * 8 * 0.01."""
    import torch

    from bsf.fl.objectives import FedProxTerm

    module = torch.nn.Linear(3, 2)
    term = FedProxTerm(module, mu=0.5)
    term.start_round()
    assert float(term()) == 0.0
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1)
    value = term()
    assert float(value) == pytest.approx(0.25 * 8 * 0.01, rel=1e-5)
    value.backward()  # the gradient pulls back towards the global model: mu * (w - w_global) = 0.05
    np.testing.assert_allclose(module.weight.grad.numpy(), 0.05, rtol=1e-5)
    assert all(not p.requires_grad for p in term.reference.parameters())
