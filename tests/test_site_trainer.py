"""The site side of a round (:class:`bsf.federation.site_trainer.SiteTrainer`) in-process, without NVFlare.

What a consortium relies on: a site that restarts mid-job continues from its own state exactly; evaluating
someone else's model leaves the site's weights alone; ``transfer`` and ``transfer_dtype`` send what they say;
and a one-site federation of R rounds x k local steps is the centralized run of R*k steps, bit for bit.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from bsf.config import FederationConfig
from bsf.engine import Engine
from bsf.federation.payload import exchanged
from bsf.federation.site_trainer import SiteTrainer

#: one crop per volume: the cheapest SSL step that still has two views per crop
FAST = ("data.crops_per_volume=1", "optim.warmup_steps=1")


def _settings(**changes) -> FederationConfig:
    """The site's part of a job's ``federation:`` section: one local step, no validation of the global model."""
    return FederationConfig(**{"local_steps": 1, "validate_global": False, **changes})


def _model_state(trainer: SiteTrainer) -> dict[str, torch.Tensor]:
    """Every tensor of the site's model (aggregated part and the site-only heads), copied."""
    return {k: v.detach().clone() for k, v in trainer.engine.model.state_dict().items()}


def _assert_same_arrays(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_site_restarting_mid_job_resumes_from_its_own_state(stage1_config, tmp_path):
    """Round 0, a new process on the same state folder, round 1 == round 1 of a site that never stopped."""
    config = stage1_config(*FAST, "train.steps=2")
    state_dir, restarted_dir = tmp_path / "site", tmp_path / "site_after_restart"
    steady = SiteTrainer(Engine(config), _settings(), site="site-1", state_dir=state_dir)
    global0 = exchanged(steady.engine.get_weights("encoder"))  # what the server sends
    update = steady.train(global0, 0).params
    shutil.copytree(state_dir, restarted_dir)  # what a process that dies after round 0 leaves behind
    # the server's average with a site that did not move: not this site's own weights
    global1 = {k: global0[k] + 0.5 * update[k] for k in global0}

    restarted = SiteTrainer(Engine(config), _settings(), site="site-1", state_dir=restarted_dir)
    resumed = restarted.train(global1, 1)
    uninterrupted = steady.train(global1, 1)

    assert restarted.engine.step == 2 and restarted.rounds_done == 1
    assert resumed.records == uninterrupted.records
    _assert_same_arrays(resumed.params, uninterrupted.params)
    _assert_same_state(_model_state(restarted), _model_state(steady))  # the site-only SSL heads too


def test_validate_restores_the_sites_weights(stage1_config):
    trainer = SiteTrainer(Engine(stage1_config(*FAST)), _settings())
    before = _model_state(trainer)
    own = trainer.validate(None)
    foreign = {k: v + np.float32(0.05) for k, v in trainer.engine.get_weights("encoder").items()}
    theirs = trainer.validate(foreign)
    assert own.keys() == theirs.keys() and own != theirs  # it did evaluate the received model ...
    _assert_same_state(_model_state(trainer), before)  # ... and gave the site its own weights back
    assert trainer.validate(None) == own


@pytest.fixture(scope="module")
def one_round(ukb_root, tmp_path_factory):
    """Round 0 of identical sites from the same global encoder, with each transfer setting: ``{name: (result, trainer, global0)}``."""
    from bsf.config import load_config

    config = load_config("stage1_test", [f"data.root={ukb_root}", "train.progress=false",
                                         f"train.output_dir={tmp_path_factory.mktemp('run')}", *FAST, "train.steps=1"])
    runs = {}
    for name, settings in {"full": _settings(transfer="full"), "diff_f16": _settings(transfer_dtype="float16")}.items():
        trainer = SiteTrainer(Engine(config), settings)
        global0 = exchanged(trainer.engine.get_weights("encoder"))
        runs[name] = (trainer.train(global0, 0), trainer, global0)
    return runs


def test_transfer_full_sends_the_trained_encoder_itself(one_round):
    result, trainer, global0 = one_round["full"]
    assert result.params_type == "FULL"
    assert all(v.dtype == np.float32 for v in result.params.values())
    _assert_same_arrays(result.params, exchanged(trainer.engine.get_weights("encoder")))
    assert sorted(result.params) == trainer.scope_keys and all(k.startswith("swinViT.") for k in result.params)
    assert any(not np.array_equal(result.params[k], global0[k]) for k in global0)  # it trained


def test_float16_uploads_are_float16_differences_close_to_the_float32_ones(one_round):
    full, _, global0 = one_round["full"]
    half, _, _ = one_round["diff_f16"]
    assert half.params_type == "DIFF" and all(v.dtype == np.float16 for v in half.params.values())
    exact = {k: full.params[k] - global0[k] for k in global0}  # the same site's float32 difference
    for key, diff in exact.items():
        assert np.array_equal(half.params[key], diff.astype(np.float16)), key  # a plain cast, nothing else lost
    flat_half = np.concatenate([half.params[k].astype(np.float32).ravel() for k in exact])
    flat = np.concatenate([exact[k].ravel() for k in exact])
    assert np.linalg.norm(flat_half - flat) <= 1e-3 * np.linalg.norm(flat)  # float16 keeps ~3 significant digits


def test_one_site_federation_equals_the_centralized_run_in_process(stage1_config):
    """R rounds x k steps through SiteTrainer, the global model = the site's own update (FedAvg of one), vs R*k steps."""
    rounds, local_steps = 2, 2
    config = stage1_config(*FAST, f"train.steps={rounds * local_steps}")
    site = SiteTrainer(Engine(config), _settings(local_steps=local_steps), site="site-1")
    global_weights = exchanged(site.engine.get_weights("encoder"))
    federated = []
    for current_round in range(rounds):
        result = site.train(global_weights, current_round)
        assert result.params_type == "DIFF"
        global_weights = {k: global_weights[k] + result.params[k] for k in global_weights}
        federated += result.records

    central = Engine(config)
    assert federated == central.train_steps(rounds * local_steps)
    _assert_same_state(_model_state(site), {k: v.detach().clone() for k, v in central.model.state_dict().items()})
