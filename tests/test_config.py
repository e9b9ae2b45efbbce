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
