"""Stage 3 across tasks (``federation.tasks``, ``stage3_all``): a shared body, one output head per task.

The rule (each key averaged over the sites that sent it: the shared tensors over all, a head over its task's
sites) against a hand computation; malformed updates rejected naming the key; a site's round trip keeps its own
head; the result guard lets a site send its own task's head only; the per-task export is an ordinary SwinUNETR
checkpoint that ``bsf predict`` runs. The simulator run of stage3_all (2 BraTS-like + 1 ATLAS-like sites, from a
``stage2_all`` model) is in ``tests/test_heterogeneous.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from bsf.config import FederationConfig, load_config
from bsf.errors import ConfigError
from bsf.federation.site_trainer import SiteTrainer
from bsf.federation.task_heads import TaskHeadError, to_global, to_local, update_task
from bsf.federation.weighted_mean import WeightedMean
from bsf.fl.aggregation import CheckedFedAvgAggregator

W, B = "out.conv.conv.weight", "out.conv.conv.bias"
SHARED = "decoder1.conv.weight"
TASKS_FED = FederationConfig(scope="all", tasks=["brats", "atlas"], rounds=2, local_steps=1)


def _reference() -> dict[str, tuple[int, ...]]:
    """A global model's shapes: one shared tensor, a 3-channel BraTS head and a 1-channel ATLAS head."""
    return {SHARED: (2, 2), f"task.brats.{W}": (3, 2), f"task.brats.{B}": (3,), f"task.atlas.{W}": (1, 2),
            f"task.atlas.{B}": (1,)}


def _update(site: str, task: str, value: float, steps: int, dice: float) -> FLModel:
    channels = 3 if task == "brats" else 1
    params = {SHARED: np.full((2, 2), value, np.float32), f"task.{task}.{W}": np.full((channels, 2), 10 * value, np.float32),
              f"task.{task}.{B}": np.full((channels,), -value, np.float32)}
    return FLModel(params=params, params_type=ParamsType.DIFF, metrics={"val_dice_mean": dice},
                   meta={"client_name": site, "NUM_STEPS_CURRENT_ROUND": steps})


def _aggregator() -> CheckedFedAvgAggregator:
    aggregator = CheckedFedAvgAggregator.for_federation(dataclasses.replace(TASKS_FED, local_steps=4, min_clients=1))
    aggregator.set_reference({k: np.zeros(s, np.float32) for k, s in _reference().items()})
    return aggregator


def test_rule_matches_hand_computation():
    """Shared: over all three sites by steps; the BraTS head over b1, b2; the ATLAS head over a1 alone; metrics per task."""
    aggregator = _aggregator()
    for update in (_update("b1", "brats", 1.0, 1, 0.2), _update("b2", "brats", 2.0, 3, 0.6), _update("a1", "atlas", 4.0, 2, 0.5)):
        assert aggregator.accept_model(update)
    result = aggregator.aggregate_model()
    shared = (1 * 1.0 + 3 * 2.0 + 2 * 4.0) / 6
    brats = (1 * 1.0 + 3 * 2.0) / 4
    np.testing.assert_allclose(result.params[SHARED], np.full((2, 2), shared), rtol=1e-6)
    np.testing.assert_allclose(result.params[f"task.brats.{W}"], np.full((3, 2), 10 * brats), rtol=1e-6)
    np.testing.assert_allclose(result.params[f"task.brats.{B}"], np.full((3,), -brats), rtol=1e-6)
    np.testing.assert_allclose(result.params[f"task.atlas.{W}"], np.full((1, 2), 40.0), rtol=1e-6)
    assert result.metrics["brats/val_dice_mean"] == pytest.approx((0.2 + 3 * 0.6) / 4)
    assert result.metrics["atlas/val_dice_mean"] == pytest.approx(0.5)
    # a round without any ATLAS site leaves the ATLAS head out of the difference (unchanged)
    aggregator.accept_model(_update("b1", "brats", 1.0, 1, 0.2))
    aggregator.accept_model(_update("b2", "brats", 3.0, 1, 0.2))
    result = aggregator.aggregate_model()
    assert not any(k.startswith("task.atlas.") for k in result.params)
    np.testing.assert_allclose(result.params[SHARED], np.full((2, 2), 2.0))


def test_each_key_is_averaged_over_the_updates_holding_it_and_names():
    mean = WeightedMean()
    mean.add({"a": np.ones(2), "h": np.full(1, 4.0)}, 1.0)
    mean.add({"a": np.full(2, 3.0)}, 3.0)
    assert mean.result()["a"].tolist() == [2.5, 2.5] and mean.result()["h"].tolist() == [4.0]
    local = {SHARED: 1, W: 2, B: 3}
    assert to_global(local, "atlas") == {SHARED: 1, f"task.atlas.{W}": 2, f"task.atlas.{B}": 3}
    assert to_local({**to_global(local, "atlas"), f"task.brats.{W}": 9}, "atlas") == local
    with pytest.raises(TaskHeadError, match="no head of task 'brats'"):
        to_local(to_global(local, "atlas"), "brats")


@pytest.mark.parametrize("change, expected", [
    (lambda p: {**p, f"task.atlas.{W}": np.zeros((1, 2), np.float32), f"task.atlas.{B}": np.zeros(1, np.float32)},
     "heads of 2 tasks (atlas, brats)"),
    (lambda p: {k: v for k, v in p.items() if k != SHARED}, f"shared key(s) missing, e.g. ['{SHARED}']"),
    (lambda p: {k: v for k, v in p.items() if k != f"task.brats.{B}"}, f"task brats's head is incomplete: ['task.brats.{B}']"),
    (lambda p: {**p, f"task.brats.{W}": np.zeros((1, 2), np.float32)}, f"task.brats.{W}: (1, 2) vs global (3, 2)"),
    (lambda p: {**p, SHARED: np.full((2, 2), np.nan, np.float32)}, "NaN/Inf"),
])
def test_malformed_update_is_rejected_naming_it(change, expected):
    aggregator = _aggregator()
    update = _update("b1", "brats", 1.0, 1, 0.2)
    update.params = change(update.params)
    assert aggregator.accept_model(update) is False
    site, reason = aggregator.rejected[-1]
    assert site == "b1" and expected in reason
    assert update_task(["x"], _reference())[0] is None


def test_config_refuses_what_does_not_know_task_heads():
    with pytest.raises(ConfigError, match="set scope: all"):
        FederationConfig(tasks=["brats", "atlas"])
    with pytest.raises(ConfigError, match="robust"):
        FederationConfig(scope="all", tasks=["brats", "atlas"], robust="median")


class _Engine:
    """A site's engine stand-in: a plain model's weights (one shared tensor and a 1-channel head) and a config."""

    def __init__(self, dataset: str):
        self.config = load_config("stage3_all_test", settings={"data.dataset": dataset, "model.out_channels": 1})
        self.weights = {SHARED: np.zeros((2, 2), np.float32), W: np.full((1, 2), 7.0, np.float32), B: np.zeros(1, np.float32)}
        self.step, self.num_train_cases = 0, 3

    def get_weights(self, scope: str = "all") -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.weights.items()}

    def set_weights(self, weights) -> None:
        self.weights.update({k: np.array(v, np.float32) for k, v in weights.items()})

    def train_steps(self, n: int) -> list[dict[str, float]]:
        self.weights = {k: v + 1.0 for k, v in self.weights.items()}
        self.step += n
        return [{"step": self.step, "loss": 0.5, "lr": 1e-3}]

    def validate(self) -> dict[str, float]:
        return {"val_dice_mean": float(self.weights[W].mean())}


def test_site_round_trip_keeps_its_own_head():
    """An ATLAS site loads the shared tensors and the ATLAS head, never the BraTS head, and sends its head as ATLAS's."""
    engine = _Engine("atlas")
    trainer = SiteTrainer(engine, dataclasses.replace(TASKS_FED, validate_global=False), site="a1")
    global_model = {**{k: np.full(s, 2.0, np.float32) for k, s in _reference().items()}, f"task.atlas.{W}": np.full((1, 2), 5.0, np.float32)}
    result = trainer.train(global_model, 0)
    assert set(result.params) == {SHARED, f"task.atlas.{W}", f"task.atlas.{B}"}
    np.testing.assert_array_equal(result.params[f"task.atlas.{W}"], np.ones((1, 2)))  # 5 loaded, +1 trained, sent as a diff
    np.testing.assert_array_equal(engine.weights[W], np.full((1, 2), 6.0))
    # cross-site evaluation of a BraTS site's model (no ATLAS head): its shared parts with this site's own head
    brats_model = {SHARED: np.full((2, 2), 9.0, np.float32), f"task.brats.{W}": np.zeros((3, 2), np.float32),
                   f"task.brats.{B}": np.zeros(3, np.float32)}
    assert trainer.validate(brats_model) == {"val_dice_mean": 6.0}
    np.testing.assert_array_equal(engine.weights[SHARED], np.full((2, 2), 3.0))  # restored after validation
    assert set(trainer.local_model()) == {SHARED, f"task.atlas.{W}", f"task.atlas.{B}"}


# ------------------------------------------------------------------ real models: guard, export, predict
@pytest.fixture(scope="module")
def global_model(tmp_path_factory) -> Path:
    """A stage3_all global model file as the server keeps it (``app_server/FL_global_model.pt``, run config beside)."""
    from bsf.federation.initial_model import initial_global_weights
    from bsf.fl.jobs import COMMITTED_JOBS, job_run_config

    root = tmp_path_factory.mktemp("stage3_all") / "app_server"
    (root / "config").mkdir(parents=True)
    raw = job_run_config(COMMITTED_JOBS["stage3_all"])
    (root / "config" / "bsf_run.yaml").write_text(yaml.safe_dump(raw))
    weights, _ = initial_global_weights(load_config(raw), "all")
    torch.save({"model": {k: torch.from_numpy(v) for k, v in weights.items()}}, root / "FL_global_model.pt")
    return root / "FL_global_model.pt"


def test_result_guard_lets_a_site_send_its_own_head_only(global_model, tmp_path, monkeypatch):
    from bsf.fl.deploy.privacy import check_result, model_shapes_from_run_config

    monkeypatch.delenv("BSF_SITE_CONFIG", raising=False)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "bsf_site.yaml").write_text(yaml.safe_dump({"data": {"dataset": "atlas"}}))
    shapes = model_shapes_from_run_config(global_model.parent / "config" / "bsf_run.yaml", "site-3", tmp_path)
    assert shapes[f"task.atlas.{W}"] == (1, 12, 1, 1, 1) and not any(k.startswith(("task.brats.", "out.")) for k in shapes)
    update = {k: np.zeros(s, np.float32) for k, s in shapes.items() if not k.endswith("relative_position_index")}
    assert check_result("WEIGHT_DIFF", update, {"NUM_STEPS_CURRENT_ROUND": 1}, None, shapes) == []
    foreign = {**update, f"task.brats.{B}": np.zeros(3, np.float32)}
    assert any(f"'task.brats.{B}'" in p for p in check_result("WEIGHT_DIFF", foreign, None, None, shapes))


def test_task_export_loads_into_a_plain_swinunetr_and_predicts(global_model, tmp_path):
    from bsf.cli import main
    from bsf.data.synth import synthesize
    from bsf.predict import load_finetuned

    for task, channels in (("brats", 3), ("atlas", 1)):
        main(["export", "--model", str(global_model), "--task", task, "--out", str(tmp_path / f"{task}.pt")])
        finetuned = load_finetuned(tmp_path / f"{task}.pt", device="cpu")
        assert finetuned.config.data.dataset == task and finetuned.model.out.conv.conv.out_channels == channels
        state = torch.load(global_model, weights_only=True)["model"]
        mine = finetuned.model.state_dict()
        assert torch.equal(mine["out.conv.conv.weight"], state[f"task.{task}.out.conv.conv.weight"])
        assert torch.equal(mine["decoder1.conv_block.conv1.conv.weight"], state["decoder1.conv_block.conv1.conv.weight"])
    case = synthesize("brats", 1, tmp_path / "cases", spacing=4.0, seed=3)[0]
    main(["predict", "--model", str(tmp_path / "brats.pt"), "--input", str(case), "--output", str(tmp_path / "seg.nii.gz"),
          "--no-progress", "--device", "cpu"])
    assert (tmp_path / "seg.nii.gz").is_file()
    with pytest.raises(SystemExit):
        main(["export", "--model", str(global_model), "--task", "ukb", "--out", str(tmp_path / "x.pt")])
