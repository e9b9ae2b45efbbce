"""``bsf bench`` at test size on CPU: it runs, its table and JSON are complete, speed-ups are computed
against the reference-style run of the same process, and the fast path's loss tracks fp32.

Timings are never asserted (they depend on the machine and its load); only that the numbers exist,
are positive and finite, and are consistent with each other.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bsf.bench.ssl_step import reference_aug_rand, reference_rot_rand
from bsf.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_bench_runs_at_test_size_and_reports_speedups_against_the_reference(tmp_path, capsys):
    code = main(["bench", "--size", "test", "--device", "cpu", "--only", "ssl_step", "finetune_step",
                 "--steps", "1", "--warmup", "0", "--repeats", "1", "--out", str(tmp_path)])
    assert code == 0
    table = capsys.readouterr().out
    for column in ("configuration", "steps/s", "samples/s", "peak mem", "speed-up"):
        assert column in table
    assert (tmp_path / "bench.txt").read_text().strip() in table

    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"] == torch.__version__
    assert report["options"]["precision"] == "fp32" and report["options"]["compile"] is False  # CPU defaults
    assert set(report["results"]) == {"ssl_step", "finetune_step"}
    expected = {"ssl_step": ["reference", "fast"], "finetune_step": ["reference", "fast", "fast+ckpt x2"]}
    for bench, result in report["results"].items():
        rows = result["rows"]
        assert [r["name"] for r in rows] == expected[bench]
        reference = rows[0]
        assert reference["reference"] and reference["speedup"] == pytest.approx(1.0)
        for row in rows:
            for field in ("steps_per_s", "samples_per_s", "step_s_median", "speedup"):
                assert _positive(row[field]), (bench, row["name"], field)
            assert len(row["step_s_all"]) == 1
            assert row["samples_per_s"] == pytest.approx(row["items_per_step"] / row["step_s_median"])
            assert row["speedup"] == pytest.approx(row["samples_per_s"] / reference["samples_per_s"])
            memory = row["peak_memory"]
            assert memory["kind"] == "cpu_rss_rise" and memory["bytes"] >= memory["state_bytes"] > 0
            assert math.isfinite(row["info"]["final_loss"])
    ssl = report["results"]["ssl_step"]
    assert ssl["config"]["encoder_passes_per_step"] == 4
    assert all(r["encoder_passes_per_s"] == pytest.approx(2 * r["samples_per_s"]) for r in ssl["rows"])
    assert all(r["info"]["augmentation_s_median"] > 0 for r in ssl["rows"])
    ckpt = report["results"]["finetune_step"]["rows"][-1]
    assert ckpt["items_per_step"] == 2 * reference["items_per_step"]


@pytest.mark.slow
def test_bf16_autocast_loss_tracks_fp32_within_the_stated_tolerance():
    from bsf.bench.harness import Options
    from bsf.bench.numerics import MAX_REL_TOL, MEAN_REL_TOL, run
    from bsf.bench.sizes import SIZES

    size = SIZES["test"]
    opts = Options(size=type(size)(**{**size.__dict__, "numerics_steps": 3}), device=torch.device("cpu"),
                   precision="fp32", compile=False, steps=1, warmup=0, repeats=1)
    result = run(opts)
    assert result["config"]["fast_precision"] == "bf16"
    assert len(result["losses_fp32"]) == len(result["losses_fast"]) == 3
    assert result["losses_fp32"] != result["losses_fast"]  # bf16 really ran
    assert result["max_relative_deviation"] <= MAX_REL_TOL and result["mean_relative_deviation"] <= MEAN_REL_TOL
    assert result["within_tolerance"]


def test_bench_without_a_gpu_is_a_one_line_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, "-m", "bsf.cli", "bench", "--device", "cuda", "--out", str(tmp_path / "o")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --device cuda") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_reference_rotation_and_corruption_follow_the_public_loop():
    rng = np.random.RandomState(0)
    x = torch.rand(3, 2, 64, 64, 64)
    views, k = reference_rot_rand(x, rng)
    assert k.dtype == torch.long and k.shape == (3,)
    for i in range(3):  # rotating back restores each crop
        assert torch.equal(torch.rot90(views[i], -int(k[i]), dims=(1, 2)), x[i])

    before = views.clone()
    corrupted = reference_aug_rand(views, rng)
    assert corrupted.shape == views.shape and not torch.equal(corrupted, views)
    assert torch.equal(views, before)  # works on a copy, like the public code
