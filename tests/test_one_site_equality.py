"""One site equals centralized, for every stage of the graph: a one-site federation of R rounds x k local steps
(:class:`bsf.federation.site_trainer.SiteTrainer` around one :class:`bsf.engine.Engine`, the server's FedAvg of one
site = global + the site's difference) gives the centralized run of R*k steps, bit for bit: every step's loss
record and every tensor of the model (aggregated part and site-only heads) are equal, not merely close.

The two runs happen in one process, after different histories of torch's global random generator (as two
processes would be: a `bsf train` and an NVFlare client). Dropout (``model.dropout: 0.1`` in the ATLAS Stage 3
preset) draws from that generator, so before the engine re-seeded it per ``(seed, step, micro-batch)`` the ATLAS
Stage 3 runs differed from the first step on. Shipped ``*_test`` presets on tiny synthetic data (4 mm), one crop
per step, 2 rounds x 1 step, each site validating the global model it receives (the job default).
"""

from __future__ import annotations

import pytest
import torch

from bsf.config import FederationConfig, RunConfig, load_config
from bsf.engine import Engine
from bsf.federation.site_trainer import SiteTrainer
from bsf.federation.stages import STAGES
from bsf.model import SSLModel, save_encoder

ROUNDS, LOCAL_STEPS = 2, 1
SPACING_MM = 4.0


@pytest.fixture(scope="module")
def data_roots(ukb_root, tmp_path_factory) -> dict[str, str]:
    """UKB-, BraTS- and ATLAS-like folders (3 subjects at 4 mm for BraTS and ATLAS: 2 train, 1 validation)."""
    from bsf.data.synth import synthesize

    roots = {"ukb": str(ukb_root)}
    for dataset in ("brats", "atlas"):
        root = tmp_path_factory.mktemp(dataset)
        synthesize(dataset, 3, root, spacing=SPACING_MM, seed=0)
        roots[dataset] = str(root)
    return roots


@pytest.fixture(scope="module")
def stage1_encoder(tmp_path_factory) -> str:
    """A (t1, flair) Stage-1 encoder with seeded non-default weights: Stages 2 and 3 start from it, channels adapted."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = SSLModel("test", 2)
    path = tmp_path_factory.mktemp("stage1") / "stage1_encoder.pt"
    save_encoder(model, path)
    return str(path)


def _config(stage: str, data_roots: dict[str, str], encoder: str, out) -> RunConfig:
    """The stage's shipped test preset for R*k steps, one crop per step, the later stages from ``encoder``."""
    spec = STAGES[stage]
    dataset = load_config(f"{stage}_test").data.dataset  # a stage across data sets: the preset's own (one site)
    overrides = [
        f"data.root={data_roots[dataset]}", f"train.output_dir={out}", "train.progress=false",
        f"train.steps={ROUNDS * LOCAL_STEPS}", "optim.warmup_steps=1", "data.crops_per_volume=1",
    ]
    if spec.follows:
        overrides += [f"model.pretrained={encoder}", "model.pretrained_modalities=[t1,flair]"]
    return load_config(f"{stage}_test", overrides)


def _state(engine: Engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.model.state_dict().items()}


@pytest.mark.parametrize("stage", list(STAGES))
def test_one_site_federation_equals_the_centralized_run(stage, data_roots, stage1_encoder, tmp_path):
    config = _config(stage, data_roots, stage1_encoder, tmp_path / "run")
    settings = FederationConfig(rounds=ROUNDS, local_steps=LOCAL_STEPS, scope=STAGES[stage].aggregates, min_clients=1)

    torch.manual_seed(1)  # the site's process: one history of the global generator ...
    site = SiteTrainer(Engine(config), settings, site="site-1")
    initial = site.engine.get_weights(settings.scope)
    global_model = {k: initial[k] for k in site.scope_keys}  # the server's initial model: what a round exchanges
    federated = []
    for current_round in range(ROUNDS):
        result = site.train(global_model, current_round)
        assert result.params_type == "DIFF" and site.engine.task.best_metric in result.metrics  # it validated
        global_model = {k: global_model[k] + result.params[k] for k in global_model}  # FedAvg of one site
        federated += result.records

    torch.manual_seed(2)  # ... `bsf train`'s process: another
    central = Engine(config)
    centralized = central.train_steps(ROUNDS * LOCAL_STEPS)

    assert [r["step"] for r in federated] == list(range(1, ROUNDS * LOCAL_STEPS + 1))
    assert federated == centralized  # losses, loss parts and learning rates, exactly
    site_state, central_state = _state(site.engine), _state(central)
    assert site_state.keys() == central_state.keys()
    unequal = [k for k in site_state if not torch.equal(site_state[k], central_state[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"
    assert all(torch.equal(torch.as_tensor(global_model[k]), central_state[k]) for k in global_model)  # the server's model too


def test_a_resumed_run_draws_the_dropout_masks_of_an_uninterrupted_one(data_roots, stage1_encoder, tmp_path):
    """ATLAS Stage 3 (dropout 0.1): 1 step, checkpoint, a fresh engine in another generator state, 1 step == 2 steps."""
    config = _config("stage3_atlas", data_roots, stage1_encoder, tmp_path / "run")
    assert config.model.dropout > 0
    uninterrupted = Engine(config)
    expected = uninterrupted.train_steps(2)

    first = Engine(config)
    first.train_steps(1)
    first.save_checkpoint(tmp_path / "step1.pt")
    torch.manual_seed(3)
    resumed = Engine(config)
    resumed.load_checkpoint(tmp_path / "step1.pt")
    assert resumed.train_steps(1) == expected[1:]
    final, resumed_state = _state(uninterrupted), _state(resumed)
    assert all(torch.equal(final[k], resumed_state[k]) for k in final)
