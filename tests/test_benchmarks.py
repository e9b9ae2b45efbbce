"""Smoke tests of benchmarks/ssl_step.py at test size on CPU: it runs, and its JSON is complete.

Timings are never asserted (they depend on the machine and its load); only that the numbers exist
and are positive and finite.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SSL_STEP = ROOT / "benchmarks" / "ssl_step.py"

RESULT_FIELDS = (
    "step_s", "step_s_median", "steps_per_s", "samples_per_s", "encoder_passes_per_s",
    "augmentation_s", "model_step_s", "model_step_encoder_passes_per_s",
)


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_ssl_step", SSL_STEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SSL_STEP), *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.slow
def test_ssl_step_runs_at_test_size_and_writes_complete_json(tmp_path):
    out = tmp_path / "ssl_step.json"
    proc = _run(
        "--size", "test", "--roi", "64", "--batch", "1", "--crops", "2", "--device", "cpu",
        "--steps", "2", "--warmup", "1", "--reference", "--json", str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "enc passes/s" in proc.stdout and "speed-up of fast over reference" in proc.stdout

    report = json.loads(out.read_text())
    assert report["benchmark"] == "ssl_step"
    cfg = report["config"]
    assert (cfg["size"], cfg["roi"], cfg["crops"], cfg["encoder_passes_per_step"]) == ("test", 64, 2, 4)
    assert cfg["precision"] == "fp32" and cfg["device"] == "cpu"
    assert cfg["parameters"] > cfg["encoder_parameters"] > 0
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"] == torch.__version__

    assert set(report["results"]) == {"fast", "reference"}
    for name, result in report["results"].items():
        for field in RESULT_FIELDS:
            value = result[field]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, field, value)
        assert len(result["step_s_all"]) == 2
        # throughput is consistent with the step time: 4 encoder passes and 2 crops per step
        assert result["encoder_passes_per_s"] == pytest.approx(4 / result["step_s"])
        assert result["samples_per_s"] == pytest.approx(2 / result["step_s"])
        assert result["peak_memory"]["kind"] == "cpu_rss_delta_one_step"
        assert isinstance(result["peak_memory"]["bytes"], int) and result["peak_memory"]["bytes"] >= 0
        assert result["loss_finite"]
    assert report["results"]["reference"]["precision"] == "fp32"  # fp16 autocast only on CUDA
    for field in ("full_step", "model_step", "augmentation"):
        assert math.isfinite(report["speedup"][field]) and report["speedup"][field] > 0


def test_ssl_step_bad_roi_is_a_one_line_error(tmp_path):
    proc = _run("--size", "test", "--roi", "48", "--device", "cpu", "--json", str(tmp_path / "x.json"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "divisible by 32" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


def test_reference_rotation_and_corruption_follow_the_public_loop():
    bench = _load_module()
    rng = np.random.RandomState(0)
    x = torch.rand(3, 2, 64, 64, 64)
    views, k = bench.reference_rot_rand(x, rng)
    assert k.dtype == torch.long and k.shape == (3,)
    for i in range(3):  # rotating back restores each crop
        assert torch.equal(torch.rot90(views[i], -int(k[i]), dims=(1, 2)), x[i])

    before = views.clone()
    corrupted = bench.reference_aug_rand(views, rng)
    assert corrupted.shape == views.shape and not torch.equal(corrupted, views)
    assert torch.equal(views, before)  # works on a copy, like the public code
