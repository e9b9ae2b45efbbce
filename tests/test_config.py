import pytest

from bsf.config import list_presets, load_config
from bsf.errors import ConfigError


def test_presets_load_and_keep_both_paper_values_visible():
    assert {"stage1_test", "stage1_ukb"} <= set(list_presets())
    paper = load_config("stage1_ukb")
    assert paper.model.size == "small" and paper.model.in_channels == 2 and paper.optim.warmup_steps == 500
    assert paper.optim.lr == 1e-6 and paper.train.steps == 200_000


def test_overrides_are_parsed_as_yaml_and_win():
    config = load_config("stage1_test", ["train.steps=7", "optim.lr=1e-3", "data.roi=[96,96,96]", "optim.grad_clip=null"])
    assert config.train.steps == 7 and config.optim.lr == 1e-3 and config.data.roi == [96, 96, 96]
    assert config.optim.grad_clip is None
    assert config.schedule_steps == 7


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "train.stepz"),
        ("optim.lr=fast", "optim.lr"),
        ("train.steps=1.5", "train.steps"),
        ("data.roi=[64,64]", "data.roi"),
        ("data.roi=[60,64,64]", "data.roi"),
        ("model.size=huge", "model.size"),
        ("train.precision=fp8", "train.precision"),
        ("optimizer.lr=1", "optimizer"),
        ("train.steps", "key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config("stage1_test", [override])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ssl.rotation_weight=-1"], "ssl.rotation_weight"),
        (["ssl.contrastive_weight=-0.5"], "contrastive_weight"),
        (["ssl.rotation_weight=0", "ssl.contrastive_weight=0", "ssl.reconstruction_weight=0"], "at least one"),
        (["optim.weight_decay=-1e-5"], "optim.weight_decay"),
        (["optim.min_lr_ratio=2"], "optim.min_lr_ratio"),
        (["optim.lr=.inf"], "optim.lr"),
        (["optim.lr=.nan"], "optim.lr"),
        (["train.log_every=0"], "train.log_every"),
        (["train.val_every=-1"], "train.val_every"),
        (["train.checkpoint_every=-5"], "train.checkpoint_every"),
        (["train.device=gpu"], "train.device"),
        (["train.device=cuda:x"], "train.device"),
        (["data.transforms.spacing=[0, 1, 1]"], "spacing"),
        (["data.transforms.spacing=[1, 1, 1000]"], "spacing"),
        (["data.transforms.spacing=[1, 1, .nan]"], "spacing"),
        (["data.roi=[4096, 4096, 4096]"], "cannot fit"),
        (["data.roi=[512, 512, 512]"], "cannot fit"),
        (["data.fold=-1"], "data.fold"),
        (["seed=-3"], "seed"),
        (["data.roi=[1,2"], "not valid YAML"),
        (["train.steps={"], "train.steps"),
    ],
)
def test_impossible_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config("stage1_test", overrides)


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.threshold=0", "finetune.threshold"),
        ("finetune.threshold=1.5", "finetune.threshold"),
        ("finetune.sw_batch_size=0", "finetune.sw_batch_size"),
    ],
)
def test_impossible_fine_tuning_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("stage3_brats_test", [override])


def test_a_cuda_device_this_machine_lacks_is_a_config_error():
    import torch

    from bsf.engine.engine import resolve_device

    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ConfigError, match="train.device"):
        resolve_device(missing)
    assert resolve_device("cpu").type == "cpu"
