"""The typed site configuration (bsf.federation.site_config.SiteConfig): strict keys naming the file, values type-checked by the
run config's loader after the merge, site maps, the ``overrides:`` list merged as parsed values, and the merged run
config equal to what the former ``key=value`` string path produced."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bsf.config import load_config
from bsf.errors import ConfigError
from bsf.federation import run_folders
from bsf.fl.client import SitePaths, site_run_config
from bsf.fl.deploy.kit import check_site_config
from bsf.federation.site_config import ENV_SITE_CONFIG, SiteConfig, SyntheticData, load_with_site, resolve_site, site_seed

REPO = Path(__file__).resolve().parents[1]
STAGE3_BRATS_RUN = REPO / "jobs" / "stage3_brats" / "app" / "config" / run_folders.RUN_CONFIG_FILE
STAGE1_RUN = REPO / "jobs" / "stage1" / "app" / "config" / run_folders.RUN_CONFIG_FILE


def _resolve(tmp_path: Path, text: str, site: str = "site-1") -> tuple[SiteConfig, Path]:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return resolve_site(site, environ={ENV_SITE_CONFIG: str(path)}), path


def _string_overrides(raw: dict) -> list[str]:
    """The former path, kept here as the reference: every site value dumped as YAML text, parsed back by load_config."""
    dumped = [
        f"{section}.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
        for section in ("data", "train")
        for key, value in (raw.get(section) or {}).items()
    ]
    return dumped + list(raw.get("overrides") or [])


# ----------------------------------------------------------------------------- strict keys, named
@pytest.mark.parametrize(
    "text, key",
    [
        ("dta: {root: /x}\n", "dta"),
        ("data: {dataset: brats, roots: /x}\n", "data.roots"),
        ("synthetic: {subjects: 2, voxels: 9}\n", "synthetic.voxels"),
    ],
)
def test_an_unknown_key_names_the_file_and_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as caught:
        _resolve(tmp_path, text)
    message = str(caught.value)
    assert str(tmp_path / "site.yaml") in message and f"unknown config key {key} " in message


def test_a_job_setting_in_train_is_refused_naming_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"site\.yaml.*train\.steps cannot be set per site \(allowed: device"):
        _resolve(tmp_path, "train: {steps: 5}\n")


@pytest.mark.parametrize(
    "text, key",
    [
        ("data: {root: /data/ukb, num_workers: many}\n", "data.num_workers"),
        ("data: {root: 5}\n", "data.root"),
        ("data: {root: /d, modalities: t1}\n", "data.modalities"),
        ("train: {device: gpu}\n", "train.device"),
    ],
)
def test_a_wrong_value_type_names_the_key_and_the_site_file(tmp_path, text, key):
    site, path = _resolve(tmp_path, text)  # the keys are fine: values are checked by the run config's loader
    with pytest.raises(ConfigError) as caught:
        load_with_site(STAGE1_RUN, site)
    message = str(caught.value)
    assert message.startswith(key) and str(path) in message and str(STAGE1_RUN) in message


@pytest.mark.parametrize(
    "synthetic, key",
    [("{subjects: four}", "synthetic.subjects"), ("{subjects: 0}", "synthetic.subjects"),
     ("{spacing: -1}", "synthetic.spacing"), ("{seed: true}", "synthetic.seed"), ("[4, 3.0]", "'synthetic'")],
)
def test_a_bad_synthetic_request_names_the_file_and_the_key(tmp_path, synthetic, key):
    with pytest.raises(ConfigError, match=rf"site config {tmp_path / 'site.yaml'}.*: {key}"):
        _resolve(tmp_path, f"synthetic: {synthetic}\n")


def test_the_site_kit_check_type_checks_the_values_too(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("data: {dataset: brats, root: /data/brats, num_workers: many}\n")
    with pytest.raises(ConfigError, match=rf"^data\.num_workers: .*site config {path}"):
        check_site_config(path, "brats-site-a")
    path.write_text("data: {dataset: brats, root: /data/brats, modalities: [flair, t1ce, t1, t2]}\n")
    assert check_site_config(path, "brats-site-a") == (
        f"{path}: data.dataset=brats, data.root=/data/brats; modalities flair, t1ce, t1, t2"
    )


# ----------------------------------------------------------------------------- site maps
def test_a_site_map_entry_inline_by_path_and_by_default(tmp_path):
    (tmp_path / "one.yaml").write_text("data: {dataset: atlas, root: /d1, modalities: [t1]}\n")
    site_map = tmp_path / "map.yaml"
    site_map.write_text("sites:\n  site-1: one.yaml\n  site-2: {data: {root: /d2}, train: {device: cpu}}\n"
                        "  '*': {synthetic: {subjects: 2, seed: 7}}\n")
    env = {ENV_SITE_CONFIG: str(site_map)}
    one = resolve_site("site-1", environ=env)
    assert one.settings() == {"data.dataset": "atlas", "data.root": "/d1", "data.modalities": ["t1"]}
    assert one.source == f"{tmp_path / 'one.yaml'} (via {site_map} [site-1])"
    two = resolve_site("site-2", environ=env)
    assert two.data == {"root": "/d2"} and two.train == {"device": "cpu"} and two.source == f"{site_map} [site-2]"
    other = resolve_site("site-9", environ=env)
    assert other.synthesises and other.synthetic == SyntheticData(subjects=2, spacing=3.0, seed=7)
    assert other.source == f"{site_map} [*]" and other.synthetic.seed_for("site-9") == 7
    assert SyntheticData().seed_for("site-9") == site_seed("site-9")


# ----------------------------------------------------------------------------- overrides as parsed values
def test_overrides_are_merged_as_parsed_values_after_the_sections(tmp_path):
    site, path = _resolve(tmp_path, (
        "data: {root: /data/brats, num_workers: 2}\n"
        "overrides: ['data.transforms.spacing=[1.0, 1.0, 1.0]', 'data.num_workers=3', 'data.skip_broken=true']\n"
    ))
    assert site.overrides == {"data.transforms.spacing": [1.0, 1.0, 1.0], "data.num_workers": 3, "data.skip_broken": True}
    assert site.setting("data.num_workers") == 3  # the override comes after the data section
    config = load_with_site(STAGE3_BRATS_RUN, site)
    job = load_config(STAGE3_BRATS_RUN)
    assert config.data.transforms.spacing == [1.0, 1.0, 1.0] and config.data.num_workers == 3 and config.data.skip_broken
    # only that one key of the job's preprocessing changes
    assert config.data.transforms.orientation == job.data.transforms.orientation
    assert config.data.transforms.normalize == job.data.transforms.normalize


def test_a_malformed_override_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"site config {tmp_path / 'site.yaml'}.*override 'data.root' must look like"):
        _resolve(tmp_path, "overrides: ['data.root']\n")
    with pytest.raises(ConfigError, match=r"site\.yaml.*'overrides' must be a list"):
        _resolve(tmp_path, "overrides: data.root=/x\n")


def test_command_line_overrides_come_last_and_can_point_a_synthetic_site_at_data(tmp_path):
    site, _ = _resolve(tmp_path, "data: {dataset: ukb, num_workers: 2}\n")
    assert site.synthesises
    pointed = site.with_overrides(["data.root=/mnt/ukb", "data.num_workers=5"])
    assert not pointed.synthesises and pointed.setting("data.num_workers") == 5
    assert site.overrides == {}  # the original is unchanged


# ----------------------------------------------------------------------------- equal to the former string path
@pytest.mark.parametrize("name, job", [("ukb", "stage1"), ("brats", "stage3_brats"), ("atlas", "stage3_atlas")])
def test_shipped_site_yaml_merges_as_the_string_path_did(name, job):
    path = REPO / "sites" / f"{name}.yaml"
    run_config = REPO / "jobs" / job / "app" / "config" / run_folders.RUN_CONFIG_FILE
    site = resolve_site("site-1", environ={ENV_SITE_CONFIG: str(path)})
    assert not site.synthesises
    expected = load_config(run_config, _string_overrides(yaml.safe_load(path.read_text())))
    assert load_with_site(run_config, site) == expected


def test_simulator_site_map_gives_the_run_config_of_the_string_path(tmp_path, monkeypatch):
    """simulator/sites.yaml maps every site to sites/simulated.yaml: the site synthesises a UKB-like set and
    its run config equals the former overrides (site values, then the synthetic set, state folder, no pretrained)."""
    app = tmp_path / "ws" / "job-1" / "app_site-1"
    (app / "config").mkdir(parents=True)
    (app / "custom").mkdir()
    (app / "config" / run_folders.RUN_CONFIG_FILE).write_text(STAGE1_RUN.read_text())
    paths = SitePaths.from_script(app / "custom" / "bsf_client.py")
    monkeypatch.setenv(ENV_SITE_CONFIG, str(REPO / "simulator" / "sites.yaml"))

    config = site_run_config("site-1", paths)
    root = tmp_path / "ws" / "bsf_data" / f"synthetic-ukb-n4-s3-seed{site_seed('site-1')}"
    assert Path(config.data.root) == root and (root / ".complete").is_file()
    raw = yaml.safe_load((REPO / "sites" / "simulated.yaml").read_text())
    expected = load_config(paths.app_config / run_folders.RUN_CONFIG_FILE, [
        *_string_overrides(raw), "data.dataset=ukb", f"data.root={root}", "data.datalist=null",
        f"train.output_dir={paths.job / 'bsf_site'}", "model.pretrained=null",
    ])
    assert config == expected
