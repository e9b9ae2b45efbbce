"""The lent-GPU script (``benchmarks/device_run.sh`` / ``device_run.py``): its planner fits the 9-minute budget
(pure functions, numbers worked out by hand below), a part that outruns its budget is stopped and the next one
runs, and the whole script runs on the CPU with a tiny plan (``--dry-run``), every part writing its results, so the
call on a lent machine cannot fail on a typo. Timings are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import device_run as dr  # noqa: E402

#: step times a probe might report (seconds), chosen so every plan below is a short hand calculation
TIMES = {
    "ssl_step": {"overhead_s": 10.0, "step_s": {"reference": 0.4, "fast": 0.2, "fast+sdpa": 0.2}, "aug_s": {}},
    "finetune_step": {"overhead_s": 10.0, "step_s": {"reference": 0.3, "fast": 0.2, "fast+sdpa": 0.2, "fast+ckpt x2": 0.3}},
    "sliding_window": {"overhead_s": 5.0, "step_s": {"reference": 2.0, "fast": 1.0, "fast kernels": 1.0}},
    "engine": {"build_s": 4.0, "step_s": 0.5},
    "evidence": {
        # the paper-size protocol: its Stage 3 alone (18 runs x (3 + 20 x 0.1 + 4 x 1) s = 162 s) is over the room
        "gpu": {"stage1_build_s": 3.0, "stage1_step_s": 0.1, "stage1_validate_s": 1.0, "checkpoint_s": 0.5,
                "stage3_build_s": 3.0, "stage3_step_s": 0.1, "stage3_validate_s": 1.0},
        "cpu": {"stage1_build_s": 1.0, "stage1_step_s": 0.02, "stage1_validate_s": 0.2, "checkpoint_s": 0.1,
                "stage3_build_s": 0.5, "stage3_step_s": 0.02, "stage3_validate_s": 0.1},
    },
}


def test_the_planner_fits_every_part_into_the_nine_minute_budget():
    plan = dr.plan_run(TIMES, dr.BUDGETS, dr.DEFAULT_BUDGET_S, dataclasses_replace(compile_s=45.0))
    parts, budgets = plan["parts"], plan["budgets"]
    assert sum(dr.BUDGETS.values()) == 405 and budgets["evidence"] == 510 - 405 == 105
    # room = 0.85 x budget. ssl_step (40 s, room 34): 10 + 0.8 x (3 warm-up + r*s + 1 peak) <= 34 -> r*s <= 26: 3 x 8
    assert parts["ssl_step"] == {"steps": 8, "warmup": 3, "repeats": 3, "expected_s": 32.4, "fits": True}
    # finetune_step (35 s, room 29.75): 10 + 1.0 x (4 + r*s) -> r*s <= 15.75: 3 x 5, 10 + 19 = 29 s
    assert parts["finetune_step"] == {"steps": 5, "warmup": 3, "repeats": 3, "expected_s": 29.0, "fits": True}
    # sliding_window (25 s, room 21.25): with 3 warm-ups not even 1 step fits (5 + 4 x 5 = 25); with 1 warm-up
    # 5 + 4 x (2 + r*s) -> r*s <= 2.06, too few for 2 rounds of 3: 1 round of 2 steps, 5 + 4 x 4 = 21 s
    assert parts["sliding_window"] == {"steps": 2, "warmup": 1, "repeats": 1, "expected_s": 21.0, "fits": True}
    # data_wait (25 s, room 21.25): 2 engines of 4 s, 2 rows of 0.5 s steps, no peak step: 8 + 1.0 x (3 + r*s) -> r*s <= 10.25
    assert parts["data_wait"] == {"steps": 3, "warmup": 3, "repeats": 3, "expected_s": 20.0, "fits": True}
    # numerics (35 s, room 29.75): 3 engines x (4 + N x 0.5) <= 29.75 -> N = floor((9.917 - 4) / 0.5) = 11
    assert parts["numerics"] == {"numerics_steps": 11, "expected_s": 28.5, "fits": True}
    # ssl_compiled (70 s, room 59.5): reference + fast+sdpa (0.6 s), 2/3 of the overhead (6.67 s) + 45 s compiling:
    # 51.67 + 0.6 x (4 + r*s) <= 59.5 -> r*s <= 9.06: 3 x 3, 59.47 s
    assert parts["ssl_compiled"] == {"steps": 3, "warmup": 3, "repeats": 3, "expected_s": 59.5, "fits": True}
    # finetune_compiled (65 s, room 55.25): 0.5 s of steps, 2/4 x 10 + 45 = 50 s: 50 + 0.5 x (4 + r*s) -> r*s <= 6.5: 2 x 3
    assert parts["finetune_compiled"] == {"steps": 3, "warmup": 3, "repeats": 2, "expected_s": 55.0, "fits": True}
    # evidence (105 s, room 89.25): gpu does not fit; cpu with 5 subsets x 30 Stage 3 steps: 30 runs x
    # (0.5 + 30 x 0.02 + 3 scorings x 0.1) = 42 s; Stage 1 in 10 rounds, 5 held-out points: central 1 + 5 x 0.3 + 0.02 S1,
    # federated 3 + 10 x 3 x 0.1 + 5 x 0.2 + 0.02 S1; + 5 s report: 56.5 + 0.04 S1 <= 89.25 -> S1 <= 818 -> 810 (27 x 10 x 3)
    evidence = parts["evidence"]
    assert {k: evidence[k] for k in ("size", "stage1_steps", "local_steps", "rounds", "stage1_curve", "subsets", "stage3_steps",
                                     "curve_every", "shots")} == {
        "size": "cpu", "stage1_steps": 810, "local_steps": 27, "rounds": 10, "stage1_curve": 162, "subsets": 5,
        "stage3_steps": 30, "curve_every": 10, "shots": "1,2"}
    assert evidence["expected_s"] == pytest.approx(88.9) and evidence["fits"]
    # the whole: check and probe at their budgets (15 + 95) + the plans above
    assert plan["expected_s"] == pytest.approx(15 + 95 + 32.4 + 29 + 21 + 20 + 28.5 + 59.5 + 55 + 88.9)
    assert plan["expected_s"] <= dr.DEFAULT_BUDGET_S < dr.TOTAL_LIMIT_S == 540
    assert all(p["fits"] and p["expected_s"] <= budgets[n] for n, p in parts.items())


def dataclasses_replace(**changes):
    import dataclasses

    return dataclasses.replace(dr.GPU_LIMITS, **changes)


def test_the_planner_says_what_does_not_fit():
    slow = dataclasses_replace(compile_s=120.0)
    plan = dr.plan_part("ssl_compiled", TIMES, 70, slow)
    assert plan["skip"] and "compiling (assumed 120 s)" in plan["reason"]
    assert dr.plan_part("evidence", TIMES, 20, dr.GPU_LIMITS)["skip"]  # 20 s: no evidence size fits
    # the assumed times (no probe) plan within the budget too
    assert dr.plan_run(dr.ASSUMED_TIMES)["expected_s"] <= dr.DEFAULT_BUDGET_S
    # a dry run runs the smallest evidence even where it does not fit
    tiny = dr.plan_part("evidence", {"evidence": {"tiny": TIMES["evidence"]["gpu"]}}, 1, dr.DRY_LIMITS)
    assert (tiny["size"], tiny["stage1_steps"], tiny["local_steps"], tiny["subsets"], tiny["stage3_steps"], tiny["shots"], tiny["fits"]) == (
        "tiny", 3, 1, 2, 1, "1", False)
    assert dr.evidence_shape(3) == {"stage1_steps": 3, "local_steps": 1, "rounds": 1, "stage1_curve": 3, "points": 1}


def test_the_evidence_sizes_load_as_valid_configs(tmp_path):
    """Every size of the evidence protocol, with the plan's step counts, passes the script's checks and the config loader
    (the GPU size cannot train on a CPU: bf16)."""
    import pretraining_evidence as pe
    from bsf.config import load_config

    for size in ("cpu", "gpu", "tiny"):
        plan = dr.plan_part("evidence", {"evidence": {size: TIMES["evidence"]["cpu"]}}, 400,
                            dataclasses_replace(evidence_sizes=(size,), force_smallest=True))
        argv = ["--out", str(tmp_path / size), "--size", size, "--stage1-steps", str(plan["stage1_steps"]), "--local-steps",
                str(plan["local_steps"]), "--subsets", str(plan["subsets"]), "--stage3-steps", str(plan["stage3_steps"])]
        args = pe.resolve_args(argv)
        assert args.size == size and args.shots == [1, 2]
        load_config(args.stage1_preset, ["data.root=''", "data.datalist=null", *args.stage1_set])
        load_config(args.stage3_preset, ["data.root=''", *args.stage3_set])
    assert pe.resolve_args(["--out", "x", "--tiny"]).size == "tiny"


def test_parallel_synthesis_writes_the_files_of_serial_synthesis(tmp_path):
    import nibabel as nib

    from bsf.data.synth import synthesize
    from pretraining_evidence import synthesize_parallel

    synthesize("brats", 2, tmp_path / "serial", spacing=8.0, seed=3)
    synthesize_parallel("brats", 2, tmp_path / "parallel", spacing=8.0, seed=3, workers=2)
    serial = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*.nii.gz"))
    assert serial and serial == sorted(p.relative_to(tmp_path / "parallel") for p in (tmp_path / "parallel").rglob("*.nii.gz"))
    for path in serial:
        a, b = nib.load(tmp_path / "serial" / path), nib.load(tmp_path / "parallel" / path)
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.array_equal(a.affine, b.affine)


def test_the_summary_reads_partial_results():
    """A run cut short: the summary names what ran, what did not, and the goals it has numbers for."""
    row = lambda name, passes, speedup, ref=False: {"name": name, "reference": ref, "encoder_passes_per_s": passes,  # noqa: E731
                                                     "samples_per_s": passes / 2, "steps_per_s": passes / 8, "speedup": speedup}
    results = {"run": {"budget_s": 510, "dry_run": False},
               "parts": {"check": {"status": "ok", "seconds": 5, "budget_s": 15, "result": {"device_name": "NVIDIA H100", "torch": "2.11"}},
                         "ssl_step": {"status": "ok", "seconds": 30, "budget_s": 40, "plan": {"steps": 8, "warmup": 3, "repeats": 3, "expected_s": 32, "fits": True},
                                      "result": {"results": {"ssl_step": {"rows": [row("reference", 24.0, 1.0, True), row("fast+sdpa", 110.0, 4.6)]}}}},
                         "finetune_step": {"status": "timed out", "seconds": 38, "budget_s": 35, "reason": "stopped after 38 s (budget 35 s)"}}}
    text = dr.summary_text(results)
    assert "NVIDIA H100" in text and "stopped after 38 s" in text and "not run" in text
    assert "SSL step" in text and "110.0 encoder passes/s, 4.60x" in text and "met" in text


def _script(args: list[str], tmp_path: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "BSF_PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "device_run.sh"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_part_past_its_budget_is_stopped_and_the_next_part_runs(tmp_path):
    out = tmp_path / "out"
    done = _script(["--out", str(out), "--work", str(tmp_path / "work"), "--dry-run", "--parts", "check,sliding_window,numerics",
                    "--test-hang", "sliding_window", "--budget", "sliding_window=2"], tmp_path, 300)
    results = json.loads((out / "results.json").read_text())
    parts = results["parts"]
    assert parts["check"]["status"] == "ok"
    assert parts["sliding_window"]["status"] == "timed out", done.stdout[-3000:]
    assert parts["numerics"]["status"] == "ok"  # in a fresh worker (skipped by the benchmark itself on a CPU)
    assert set(parts) == {"check", "sliding_window", "numerics"}
    assert done.returncode == 1  # not every part ran
    assert "timed out" in (out / "summary.txt").read_text() and "timed out" in done.stdout


@pytest.mark.slow
def test_the_dry_run_runs_every_part_and_writes_its_results(tmp_path):
    out = tmp_path / "out"
    done = _script(["--out", str(out), "--work", str(tmp_path / "work"), "--dry-run"], tmp_path, 1500)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["bench.txt", "evidence.md", "evidence.png", "results.json", "run.log", "summary.txt"]
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["dry_run"] and set(results["parts"]) == set(dr.PARTS)
    for name, entry in results["parts"].items():
        assert entry["status"] == "ok", (name, entry)
        assert entry["seconds"] <= entry["budget_s"] + dr.GRACE_S
    times, plan = results["times"], results["plan"]
    assert {"ssl_step", "finetune_step", "sliding_window", "engine", "evidence"} <= set(times)
    assert all(v > 0 for v in times["ssl_step"]["step_s"].values())
    assert set(plan["parts"]) == set(dr.PARTS) and plan["parts"]["evidence"]["size"] == "tiny"
    parts = results["parts"]
    assert [r["name"] for r in parts["ssl_step"]["result"]["results"]["ssl_step"]["rows"]] == ["reference", "fast", "fast+sdpa"]
    assert [r["name"] for r in parts["ssl_compiled"]["result"]["results"]["ssl_step"]["rows"]] == ["reference", "fast+sdpa"]
    assert [r["name"] for r in parts["finetune_compiled"]["result"]["results"]["finetune_step"]["rows"]] == ["reference", "fast+sdpa"]
    assert parts["numerics"]["result"]["results"]["numerics"]["skipped"]  # CPU: fp32 only
    assert len(parts["data_wait"]["result"]["results"]["data_wait"]["rows"]) == 2
    evidence = parts["evidence"]["result"]
    assert set(evidence["stage3"]) == {"1"}  # a dry run: 1 labelled case (the GPU plan: 1 and 2)
    for entry in evidence["stage3"].values():
        assert set(entry["paired"]) == {"central - scratch", "federated - scratch", "federated - central"}
        assert all(len(d["ci95"]) == 2 and d["n"] == 2 for d in entry["paired"].values())
    assert len(evidence["per_run_dice"]) == 1 * 2 * 3  # shots x subsets x arms
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary and summary.strip() in done.stdout
    for name in dr.PARTS:
        assert name in summary
    for table in ("== ssl_step", "== finetune_step", "== sliding_window", "== data_wait", "== numerics", "== ssl_compiled"):
        assert table in (out / "bench.txt").read_text()
    assert "Paired differences" in (out / "evidence.md").read_text()
