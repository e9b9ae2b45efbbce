"""The site preflight: its figures add up as documented, and a job the machine cannot hold is refused naming the setting."""

from __future__ import annotations

import pytest

from bsf.engine import load_config
from bsf.federation.preflight import FOOTPRINTS, GIB, Machine, PreflightError, requirements, run_preflight

BIG_MACHINE = Machine(ram_available=512 * GIB, cpus=64, disk_free=10_000 * GIB, disk_path="/cache")


def _small_stage3(*overrides: str):
    return load_config("stage3_brats", ["model.size=small", "data.roi=[96,96,96]", "data.batch_size=1",
                                        "data.crops_per_volume=1", "model.use_checkpoint=false", "data.num_workers=2", *overrides])


def _need(report, what):
    return next(n for n in report.needs if n.what == what)


def test_cpu_training_ram_is_base_plus_states_plus_activations():
    config = _small_stage3("data.cache=none")
    ram = _need(requirements(config, BIG_MACHINE), "RAM")
    parameters = 64_076_853  # Small SwinUNETR, 4 -> 3 channels
    per_voxel = FOOTPRINTS["activation_bytes_per_voxel"]["finetune"]["small"]
    assert ram.needed == int(FOOTPRINTS["base_bytes"] + 16 * parameters + per_voxel * 96**3)
    assert ram.fits and not ram.estimate


def test_too_little_ram_is_refused_naming_roi_batch_and_checkpointing():
    config = _small_stage3("data.cache=none")
    with pytest.raises(PreflightError) as exc:
        run_preflight(config, Machine(ram_available=2 * GIB, cpus=8), cases=(0, 0))
    message = str(exc.value)
    assert "RAM" in message and "data.roi" in message and "data.batch_size" in message
    assert "model.use_checkpoint: true" in message


def test_a_memory_cache_that_does_not_fit_names_data_cache():
    config = _small_stage3("data.cache=memory")
    report = requirements(config, Machine(ram_available=16 * GIB, cpus=8), n_cases=100, per_case=143_000_000)
    assert _need(report, "RAM").needed > 100 * 143_000_000
    assert len(report.problems) == 1 and "data.cache: persistent" in report.problems[0]


def test_a_persistent_cache_needs_its_disk():
    config = _small_stage3("data.cache=persistent", "data.cache_dir=/cache/brats")
    machine = Machine(ram_available=64 * GIB, cpus=8, disk_free=5 * GIB, disk_path="/cache")
    report = requirements(config, machine, n_cases=100, per_case=143_000_000)
    assert _need(report, "disk").needed == 100 * 143_000_000
    assert len(report.problems) == 1 and "data.cache_dir" in report.problems[0]


def test_gpu_memory_is_an_estimate_and_names_precision():
    config = _small_stage3("data.cache=none", "data.roi=[128,128,128]", "train.precision=fp32")
    report = requirements(config, Machine(ram_available=64 * GIB, cpus=8, gpu_free=4 * GIB))
    gpu = _need(report, "GPU memory")
    assert gpu.estimate and not gpu.fits
    assert "(estimate)" in report.problems[0] and "train.precision: bf16" in report.problems[0]
    half = _need(requirements(_small_stage3("data.cache=none", "data.roi=[128,128,128]", "train.precision=bf16"),
                              Machine(ram_available=64 * GIB, cpus=8, gpu_free=4 * GIB)), "GPU memory")
    assert half.needed < gpu.needed


def test_more_loader_workers_than_cores_is_a_note_naming_num_workers():
    report = requirements(_small_stage3("data.cache=none", "data.num_workers=8"), Machine(ram_available=64 * GIB, cpus=4))
    assert report.ok and len(report.notes) == 1 and "data.num_workers <= 3" in report.notes[0]


def test_site_preflight_command_reads_the_site_and_job(tmp_path, capsys):
    from bsf.cli import main

    site = tmp_path / "site.yaml"
    site.write_text("data:\n  dataset: brats\n  root: \"\"\n  num_workers: 0\n")  # no data yet
    assert main(["site", "preflight", str(site), "--config", "stage3_brats_test"]) == 0
    assert "RAM: needs about" in capsys.readouterr().out
    # 256 x 512 x 512 crops of the Small model: more than any machine here holds
    assert main(["site", "preflight", str(site), "data.roi=[256,512,512]", "--config", "stage3_brats"]) == 2
    out = capsys.readouterr()
    assert "problem: RAM" in out.out and "data.roi" in out.out and "cannot hold job stage3_brats" in out.err
