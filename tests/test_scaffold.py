"""SCAFFOLD: the site's correction and control update by hand, its state across a site restart, the server's
global control variate, and the result guard's rule for the control variates (:mod:`bsf.fl.scaffold`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DataKind
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_common.workflows.fedavg import FedAvg

from bsf.config import FederationConfig
from bsf.engine import Engine
from bsf.errors import ConfigError
from bsf.federation.payload import exchanged
from bsf.federation.site_trainer import SiteTrainer
from bsf.fl.aggregation import CheckedFedAvgAggregator
from bsf.fl.controller import CheckedFedAvg
from bsf.fl.deploy.privacy import check_result
from bsf.fl.scaffold import CONTROL_DIFF, CONTROL_GLOBAL, ScaffoldTerm, _lr_scale
from tests.nvflare_fakes import site_context


def test_meta_keys_are_nvflares():
    assert (CONTROL_GLOBAL, CONTROL_DIFF) == (AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL, AlgorithmConstants.SCAFFOLD_CTRL_DIFF)


# ------------------------------------------------------------------ the site, by hand
def test_correction_and_control_update_by_hand():
    """w_global = [1, 2], c = [0.5, -1], c_i = 0. Step 1 (lr 0.1): the optimiser moves w by [-0.1, 0.1], the
    correction by -0.1 c -> [0.85, 2.2]; step 2 (lr 0.3): -0.3 c -> [0.7, 2.5]. Then
    c_i+ = c_i - c + (w_global - w) / (0.1 + 0.3) = [-0.5, 1] + [0.75, -1.25] = [0.25, -0.25]."""
    module = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, 2.0]]))
    term = ScaffoldTerm(module, "", ["weight"])
    term.start_round({CONTROL_GLOBAL: {"weight": np.array([[0.5, -1.0]], np.float32)}})
    with torch.no_grad():
        module.weight.add_(torch.tensor([[-0.1, 0.1]]))  # what the optimiser did in step 1
    term.after_step(0.1)
    np.testing.assert_allclose(module.weight.detach().numpy(), [[0.85, 2.2]], rtol=1e-6)
    term.after_step(0.3)
    np.testing.assert_allclose(module.weight.detach().numpy(), [[0.7, 2.5]], rtol=1e-6)
    meta = term.end_round()
    np.testing.assert_allclose(meta[CONTROL_DIFF]["weight"], [[0.25, -0.25]], rtol=1e-5)
    np.testing.assert_allclose(term.state_dict()["weight"], [[0.25, -0.25]], rtol=1e-5)


def test_a_global_model_without_controls_names_the_meta_key():
    term = ScaffoldTerm(torch.nn.Linear(2, 1, bias=False), "", ["weight"])
    with pytest.raises(ConfigError, match=CONTROL_GLOBAL):
        term.start_round({})
    with pytest.raises(ConfigError, match="1 missing"):
        term.start_round({CONTROL_GLOBAL: {"other": np.zeros((1, 2), np.float32)}})


def test_one_learning_rate_for_the_aggregated_part_or_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    optimizer = torch.optim.AdamW([{"params": model[1].parameters(), "lr": 1.0},
                                   {"params": model[0].parameters(), "lr": 0.5}])
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)  # sets initial_lr, as the engine's schedule does
    assert _lr_scale(optimizer, model[0]) == 0.5
    with pytest.raises(ConfigError, match="finetune.encoder_lr_scale"):
        _lr_scale(optimizer, model)


FAST = ("data.crops_per_volume=1", "optim.warmup_steps=1")


def _trainer(config, state_dir) -> SiteTrainer:
    engine = Engine(config)
    settings = FederationConfig(algorithm="scaffold", local_steps=1, validate_global=False)
    return SiteTrainer(engine, settings, site="site-1", state_dir=state_dir,
                       local_objective=ScaffoldTerm.for_engine(engine, settings.scope))


def test_a_site_restarting_mid_job_continues_with_its_control_variate(stage1_config, tmp_path):
    """Round 0, a new process on the same state folder, round 1 == round 1 of the site that never stopped:
    weights, control change and the site's own control variate (which round 0 made non-zero)."""
    config = stage1_config(*FAST, "train.steps=2")
    state_dir, restarted_dir = tmp_path / "site", tmp_path / "site_after_restart"
    steady = _trainer(config, state_dir)
    global0 = exchanged(steady.engine.get_weights("encoder"))
    first = steady.train(global0, 0, {CONTROL_GLOBAL: {k: np.zeros_like(v) for k, v in global0.items()}})
    assert max(float(np.abs(v).max()) for v in first.meta[CONTROL_DIFF].values()) > 0
    shutil.copytree(state_dir, restarted_dir)  # what a process that dies after round 0 leaves behind
    global1 = {k: global0[k] + 0.5 * first.params[k] for k in global0}
    meta1 = {CONTROL_GLOBAL: {k: 0.5 * v for k, v in first.meta[CONTROL_DIFF].items()}}  # the server's c after round 0

    restarted = _trainer(config, restarted_dir)
    resumed = restarted.train(global1, 1, meta1)
    uninterrupted = steady.train(global1, 1, meta1)

    assert resumed.records == uninterrupted.records
    for a, b in ((resumed.params, uninterrupted.params), (resumed.meta[CONTROL_DIFF], uninterrupted.meta[CONTROL_DIFF]),
                 (restarted.local_objective.state_dict(), steady.local_objective.state_dict())):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the server
def _result(site: str, control, steps: int = 4) -> FLModel:
    meta = {"client_name": site, "NUM_STEPS_CURRENT_ROUND": steps}
    if control is not None:
        meta[CONTROL_DIFF] = {"swinViT.a": np.asarray(control, np.float32)}
    return FLModel(params={"swinViT.a": np.ones(2, np.float32)}, params_type=ParamsType.DIFF, meta=meta)


def test_server_keeps_the_global_control_variate_and_sends_it(tmp_path, monkeypatch):
    """c starts at 0; site-1 (4 steps) sends [1, 2], site-2 (2 steps) [4, -1]: c = (4 [1, 2] + 2 [4, -1]) / 6 = [2, 1].
    A site whose control variates are missing or NaN is rejected by name of the meta key."""
    monkeypatch.setattr(FedAvg, "load_model", lambda self: FLModel(params={"swinViT.a": np.zeros(2, np.float32)},
                                                                 params_type=ParamsType.FULL))
    aggregator = CheckedFedAvgAggregator(expected_steps=4, scaffold=True)
    controller = CheckedFedAvg(num_rounds=2, persistor_id="persistor", aggregator=aggregator, scaffold=True)
    controller.fl_ctx, controller.current_round, controller._current_num_targets = site_context(tmp_path), 0, 4
    controller.get_run_dir = lambda: str(tmp_path)
    sent = []
    controller.broadcast_model = lambda **kwargs: sent.append(kwargs["data"].meta[CONTROL_GLOBAL])
    model = controller.load_model()
    controller.send_model(data=model, targets=[])
    assert np.array_equal(sent[0]["swinViT.a"], [0, 0])

    aggregator.reset_stats()
    assert aggregator.accept_model(_result("site-1", [1, 2]))
    assert aggregator.accept_model(_result("site-2", [4, -1], steps=2))
    assert not aggregator.accept_model(_result("site-3", None))
    assert not aggregator.accept_model(_result("site-4", [np.nan, 0]))
    assert all(CONTROL_DIFF in reason for _, reason in aggregator.rejected)
    model = controller.update_model(model, aggregator.aggregate_model())
    assert CONTROL_DIFF not in model.meta  # the aggregate's control change is not part of the global model
    controller.send_model(data=model, targets=[])
    np.testing.assert_allclose(sent[1]["swinViT.a"], [2, 1], rtol=1e-6)
    record = json.loads((tmp_path / "bsf_rounds.jsonl").read_text())
    assert record["scaffold"]["control_norm"] == pytest.approx(5 ** 0.5, rel=1e-6)
    assert record["rejected_sites"] == ["site-3", "site-4"]


# ------------------------------------------------------------------ the result guard
SHAPES = {"swinViT.a": (2, 3), "swinViT.b": (3,)}


def _weights(scale: float = 0.0) -> dict[str, np.ndarray]:
    return {k: np.full(s, scale, np.float32) for k, s in SHAPES.items()}


def test_guard_lets_exactly_the_control_variates_of_the_weights_sent_leave():
    assert check_result(DataKind.WEIGHT_DIFF, _weights(), {CONTROL_DIFF: _weights(1.0)}, {}, SHAPES, scaffold=True) == []
    refused = {
        "not a scaffold job": (DataKind.WEIGHT_DIFF, {CONTROL_DIFF: _weights()}, False, "is not allowed"),
        "a metrics result": (DataKind.METRICS, {CONTROL_DIFF: _weights()}, True, "is not allowed"),
        "an extra key": (DataKind.WEIGHT_DIFF, {CONTROL_DIFF: {**_weights(), "blob": np.zeros(3, np.float32)}}, True,
                         "'blob' is not a tensor of the weights sent"),
        "a missing key": (DataKind.WEIGHT_DIFF, {CONTROL_DIFF: {"swinViT.a": np.zeros((2, 3), np.float32)}}, True,
                          "lacks 1 key"),
        "another shape": (DataKind.WEIGHT_DIFF, {CONTROL_DIFF: {**_weights(), "swinViT.b": np.zeros(4, np.float32)}}, True,
                          "has shape (4,)"),
        "NaN": (DataKind.WEIGHT_DIFF, {CONTROL_DIFF: {**_weights(), "swinViT.b": np.full(3, np.nan, np.float32)}}, True,
                "holds NaN or Inf"),
        "ints": (DataKind.WEIGHT_DIFF, {CONTROL_DIFF: {**_weights(), "swinViT.b": np.zeros(3, np.int32)}}, True,
                 "has dtype int32"),
        "not a mapping": (DataKind.WEIGHT_DIFF, {CONTROL_DIFF: [1.0]}, True, "not a mapping of tensors"),
    }
    for case, (kind, meta, scaffold, expected) in refused.items():
        data = _weights() if kind == DataKind.WEIGHT_DIFF else {"train_loss": 0.5}
        problems = check_result(kind, data, meta, {}, SHAPES, scaffold=scaffold)
        assert any(expected in p and CONTROL_DIFF in p for p in problems), (case, problems)
