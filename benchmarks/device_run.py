"""What a lent GPU machine measures, in one command that ends by itself in under 9 minutes.

    bash benchmarks/device_run.sh --out $OUT/device           # on the lent machine (one H100), from the repo root
    bash benchmarks/device_run.sh --out /tmp/dry --dry-run    # the same script on a CPU, tiny plan (tests/test_device_run.py)

Parts, in order, each with its own time budget (:data:`BUDGETS`; the evidence gets what the others leave):

1. ``check``: the device (``nvidia-smi``, ``torch.cuda``), the packages, what was found. No GPU and no ``--dry-run``:
   the run stops here.
2. ``probe``: the synthetic data sets (in parallel, in their real layouts: :mod:`bsf.data.synth`), then one step of
   every variant of the step benchmarks, an engine step reading its data, and the evidence protocol's steps at each
   size it could run. :func:`plan_run` turns these step times into the plan it prints.
3. ``ssl_step``, ``finetune_step``, ``sliding_window``, ``data_wait``, ``numerics``: ``bsf bench --size small`` one
   benchmark at a time, with the planned steps, warm-up and rounds (compile off).
4. ``ssl_compiled``, ``finetune_compiled``: the reference step against ``fast+sdpa+compile`` (``train.attention: sdpa``,
   ``train.compile: true``), when compiling (assumed ``--compile-estimate-s``) fits the budget.
5. ``evidence``: ``benchmarks/pretraining_evidence.py`` (scratch vs central vs federated Stage 1, few-shot Stage 3 on
   1 and 2 labelled cases x seeded subsets, paired differences with 95 % intervals) at the largest size and step
   counts that fit the time left (:func:`plan_evidence`).

A driver process runs the parts in a worker process and stops (kills) a part that outruns its budget; the next part
starts in a fresh worker. Every finished part is written as it goes, atomically (:mod:`bsf.io`), under ``--out``:
``results.json`` (the device, the step times, the plan and every part's numbers), ``summary.txt`` (the table printed at
the end), ``bench.txt`` (the benchmark tables), ``evidence.md`` and ``evidence.png`` (the evidence report), ``run.log``
(everything printed). Six files, one folder: what the device tool brings back. Everything else (synthetic data,
checkpoints) goes to ``--work`` (default: a new folder under the system's temporary folder).

Nothing is fetched: the data are made on the spot; packages come from the machine or from wheels carried with the
working tree (see ``benchmarks/device_run.sh`` and benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT / "benchmarks", ROOT):  # the working tree's bsf, no install needed
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bsf.io import atomic_write_json, atomic_write_text  # noqa: E402  (needs no torch)

# --------------------------------------------------------------------------- budgets and limits
#: the whole command ends within this (9 minutes); the device tool allows 10 per command
TOTAL_LIMIT_S = 540.0
#: what the parts may use together by default; the rest is start-up, kills and the summary
DEFAULT_BUDGET_S = 510.0
PARTS = ("check", "probe", "ssl_step", "finetune_step", "sliding_window", "data_wait", "numerics",
         "ssl_compiled", "finetune_compiled", "evidence")
BENCH_PARTS = ("ssl_step", "finetune_step", "sliding_window", "data_wait", "numerics")
COMPILED_PARTS = {"ssl_compiled": "ssl_step", "finetune_compiled": "finetune_step"}
#: seconds per part; ``evidence`` gets what the others leave of the total (105 s of the default 510 s), and the time
#: parts leave unused. The compiled parts need about compile estimate + 20 s each to run at all.
BUDGETS: dict[str, float] = {"check": 15, "probe": 95, "ssl_step": 40, "finetune_step": 35, "sliding_window": 25,
                             "data_wait": 25, "numerics": 35, "ssl_compiled": 70, "finetune_compiled": 65}
#: a dry run (CPU, tiny plan) only checks that every part runs: room for a slow, shared CPU
DRY_BUDGETS: dict[str, float] = {"check": 120, "probe": 600, "ssl_step": 300, "finetune_step": 300, "sliding_window": 300,
                                 "data_wait": 300, "numerics": 300, "ssl_compiled": 300, "finetune_compiled": 300}
DRY_BUDGET_S = 3600.0
#: a plan fills at most this share of its budget (its times are estimates)
SAFETY = 0.85
#: the evidence part is skipped with less time than this
MIN_EVIDENCE_S = 30.0
#: after a part's deadline the driver waits this long before stopping the worker
GRACE_S = 3.0
#: the step benchmarks' variants that the compiled parts time (the reference, and what compiling is compared with)
COMPILED_BASE = ("reference", "fast+sdpa")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a plan may ask for.

    Attributes:
        warmup: untimed steps per variant before timing (first-call costs, cudnn autotuning, compiling).
        max_steps, max_repeats: at most this many timed steps per variant and round, and rounds.
        numerics_steps: (fewest, most) steps of the fp32 vs fast loss comparison.
        evidence_sizes: the evidence protocol's sizes to try, largest first (``pretraining_evidence.SIZES``).
        compile_s: assumed seconds to compile one step variant (measured as ``first_step_s`` when it runs).
        compiled: whether the compiled parts compile (a dry run times their variants uncompiled).
        force_smallest: run the smallest evidence plan even where none fits (a dry run must run every part).
        evidence_shots: labelled cases per few-shot subset (a dry run: 1 only; the loops are the same).
    """

    warmup: int = 3
    max_steps: int = 20
    max_repeats: int = 3
    numerics_steps: tuple[int, int] = (5, 50)
    evidence_sizes: tuple[str, ...] = ("gpu", "cpu")
    compile_s: float = 45.0
    compiled: bool = True
    force_smallest: bool = False
    evidence_shots: tuple[int, ...] = (1, 2)


GPU_LIMITS = Limits()
DRY_LIMITS = Limits(warmup=0, max_steps=1, max_repeats=1, numerics_steps=(2, 2), evidence_sizes=("tiny",),
                    compile_s=0.0, compiled=False, force_smallest=True, evidence_shots=(1,))
#: the probe's plan for the step benchmarks: one warm-up (none in a dry run), one timed step
PROBE_PLAN = {"steps": 1, "repeats": 1}

#: the evidence protocol's ladder per size: subsets and Stage 3 steps to try (in order), Stage 1 steps (fewest, most)
EVIDENCE_LADDER: dict[str, dict[str, Any]] = {
    "gpu": {"subsets": (5, 4, 3), "stage3_steps": (60, 30, 20), "stage1_steps": (300, 6000)},
    "cpu": {"subsets": (5, 4, 3), "stage3_steps": (30, 20, 10), "stage1_steps": (150, 3000)},
    "tiny": {"subsets": (2,), "stage3_steps": (1,), "stage1_steps": (3, 3)},
}
EVIDENCE_SITES = 3
EVIDENCE_ARMS = 3
MAX_ROUNDS = 10  # federated Stage 1 rounds at most (each writes every site's checkpoint)
STAGE1_POINTS = 5  # held-out SSL loss points per Stage 1 run
STAGE3_POINTS = 3  # held-out Dice points per Stage 3 run
REPORT_S = 5.0  # statistics, figure and report

#: step times assumed where the probe did not measure them (a guess for one H100; the plan says when it used them)
ASSUMED_TIMES: dict[str, Any] = {
    "ssl_step": {"overhead_s": 15.0, "step_s": {"reference": 0.35, "fast": 0.15, "fast+sdpa": 0.15}, "aug_s": {}},
    "finetune_step": {"overhead_s": 15.0, "step_s": {"reference": 0.3, "fast": 0.25, "fast+sdpa": 0.22, "fast+ckpt x2": 0.6}},
    "sliding_window": {"overhead_s": 8.0, "step_s": {"reference": 2.0, "fast": 0.8, "fast kernels": 1.2}},
    "engine": {"build_s": 4.0, "step_s": 0.6},
    "evidence": {
        "gpu": {"stage1_build_s": 3.0, "stage1_step_s": 0.12, "stage1_validate_s": 1.0, "checkpoint_s": 0.5,
                "stage3_build_s": 3.0, "stage3_step_s": 0.1, "stage3_validate_s": 1.5},
        "cpu": {"stage1_build_s": 1.5, "stage1_step_s": 0.05, "stage1_validate_s": 0.3, "checkpoint_s": 0.1,
                "stage3_build_s": 1.5, "stage3_step_s": 0.04, "stage3_validate_s": 0.5},
        "tiny": {"stage1_build_s": 2.0, "stage1_step_s": 2.0, "stage1_validate_s": 1.0, "checkpoint_s": 0.1,
                 "stage3_build_s": 1.0, "stage3_step_s": 1.5, "stage3_validate_s": 0.5},
    },
}


def say(message: str) -> None:
    print(f"[device] {message}", flush=True)


# --------------------------------------------------------------------------- the planner (pure functions)
def compare_cost(times: Mapping[str, Any], *, warmup: int, steps: int, repeats: int, tail: int = 1, min_warmup: int = 0) -> float:
    """Seconds of a ``bsf.bench.harness.compare``-style benchmark: its overhead, then per variant ``warmup`` (at least
    ``min_warmup``) + ``repeats * steps`` + ``tail`` calls (the peak-memory step), plus ``max(steps, 2) + 1`` timed
    augmentations per variant where ``times["aug_s"]`` has them (the SSL step)."""
    calls = max(warmup, min_warmup) + repeats * steps + tail
    augmentation = sum(times.get("aug_s", {}).values()) * (max(steps, 2) + 1)
    return float(times["overhead_s"]) + sum(times["step_s"].values()) * calls + augmentation


def plan_compare(times: Mapping[str, Any], budget_s: float, limits: Limits, *, tail: int = 1, min_warmup: int = 0) -> dict[str, Any]:
    """With ``limits.warmup`` warm-up steps (else 1): the most rounds (up to ``limits.max_repeats``) that still allow 3
    timed steps each, then the most steps (up to ``limits.max_steps``), that fit ``SAFETY * budget_s``; 1 warm-up
    and 1 round of 1 step, marked ``fits: False``, when nothing does."""
    room = SAFETY * budget_s
    want = min(3, limits.max_steps)
    for warmup in sorted({limits.warmup, min(1, limits.warmup)}, reverse=True):
        for repeats in range(limits.max_repeats, 0, -1):
            for steps in range(limits.max_steps, 0, -1):
                cost = compare_cost(times, warmup=warmup, steps=steps, repeats=repeats, tail=tail, min_warmup=min_warmup)
                if cost <= room and (steps >= want or repeats == 1):
                    return {"steps": steps, "warmup": warmup, "repeats": repeats, "expected_s": round(cost, 1), "fits": True}
    warmup = min(1, limits.warmup)
    cost = compare_cost(times, warmup=warmup, steps=1, repeats=1, tail=tail, min_warmup=min_warmup)
    return {"steps": 1, "warmup": warmup, "repeats": 1, "expected_s": round(cost, 1), "fits": False}


def plan_data_wait(engine: Mapping[str, float], budget_s: float, limits: Limits) -> dict[str, Any]:
    """``data_wait``: two engines (0 loader workers, the documented workers), each built, warmed (at least 1 step) and
    stepped ``steps * repeats`` times; an engine step reading its data (``engine["step_s"]``) bounds both rows."""
    times = {"overhead_s": 2 * engine["build_s"], "step_s": {"workers=0": engine["step_s"], "workers=N": engine["step_s"]}}
    return plan_compare(times, budget_s, limits, tail=0, min_warmup=1)


def plan_numerics(engine: Mapping[str, float], budget_s: float, limits: Limits) -> dict[str, Any]:
    """``numerics``: three engines (fp32, the fast precision with MONAI's and with SDPA attention) of N steps each."""
    low, high = limits.numerics_steps
    room = SAFETY * budget_s
    steps = math.floor((room / 3 - engine["build_s"]) / engine["step_s"]) if engine["step_s"] > 0 else high
    fits = steps >= low
    steps = min(high, max(low, steps))
    return {"numerics_steps": steps, "expected_s": round(3 * (engine["build_s"] + steps * engine["step_s"]), 1), "fits": fits}


def plan_compiled(base: Mapping[str, Any], budget_s: float, limits: Limits) -> dict[str, Any]:
    """A compiled part: the reference and ``fast+sdpa+compile`` (timed like ``fast+sdpa``, a bound), built like two of
    the base benchmark's variants, plus ``limits.compile_s`` of compiling. Skipped when even 1 step does not fit."""
    kept = {k: v for k, v in base["step_s"].items() if k in COMPILED_BASE}
    times = {"overhead_s": base["overhead_s"] * len(kept) / max(1, len(base["step_s"])) + (limits.compile_s if limits.compiled else 0.0),
             "step_s": kept, "aug_s": {k: v for k, v in base.get("aug_s", {}).items() if k in COMPILED_BASE}}
    plan = plan_compare(times, budget_s, limits)
    if not plan["fits"] and not limits.force_smallest:
        return {"skip": True, "fits": False, "expected_s": plan["expected_s"],
                "reason": f"compiling (assumed {limits.compile_s:.0f} s) and 1 step ({plan['expected_s']:.0f} s) do not fit {budget_s:.0f} s"}
    return plan


def evidence_shape(stage1_steps: int, sites: int = EVIDENCE_SITES) -> dict[str, int]:
    """Whole rounds for ``stage1_steps`` total Stage 1 steps: at most :data:`MAX_ROUNDS` rounds of ``local_steps`` per
    site, held-out points every ``stage1_curve`` total steps (a whole number of rounds, about :data:`STAGE1_POINTS`)."""
    per_site = max(1, stage1_steps // sites)
    rounds = min(MAX_ROUNDS, per_site)
    local = per_site // rounds
    every = math.ceil(rounds / min(STAGE1_POINTS, rounds))  # rounds between held-out points
    return {"stage1_steps": sites * local * rounds, "local_steps": local, "rounds": rounds,
            "stage1_curve": every * sites * local, "points": math.ceil(rounds / every)}


def evidence_cost(t: Mapping[str, float], stage1_steps: int, stage3_steps: int, subsets: int, sites: int = EVIDENCE_SITES,
                  shots: Sequence[int] = (1, 2)) -> float:
    """Seconds of the evidence protocol from its step times (data already made):

    central Stage 1 = build + S1 steps + points x (held-out SSL loss + checkpoint);
    federated Stage 1 = sites x build + S1 steps + rounds x sites x checkpoint + points x held-out SSL loss;
    Stage 3 = shots x subsets x arms runs of (build + S3 steps + S3 points x held-out Dice); then the report.
    """
    shape = evidence_shape(stage1_steps, sites)
    s1, points, rounds = shape["stage1_steps"], shape["points"], shape["rounds"]
    curve_every = max(1, stage3_steps // STAGE3_POINTS)
    scorings = math.ceil(stage3_steps / curve_every)
    runs = len(shots) * subsets * EVIDENCE_ARMS
    central = t["stage1_build_s"] + s1 * t["stage1_step_s"] + points * (t["stage1_validate_s"] + t["checkpoint_s"])
    federated = sites * t["stage1_build_s"] + s1 * t["stage1_step_s"] + rounds * sites * t["checkpoint_s"] + points * t["stage1_validate_s"]
    stage3 = runs * (t["stage3_build_s"] + stage3_steps * t["stage3_step_s"] + scorings * t["stage3_validate_s"])
    return central + federated + stage3 + REPORT_S


def _evidence_plan(size: str, t: Mapping[str, float], stage1_steps: int, stage3_steps: int, subsets: int, fits: bool,
                   shots: Sequence[int]) -> dict[str, Any]:
    shape = evidence_shape(stage1_steps)
    return {"size": size, "stage1_steps": shape["stage1_steps"], "local_steps": shape["local_steps"], "rounds": shape["rounds"],
            "stage1_curve": shape["stage1_curve"], "subsets": subsets, "stage3_steps": stage3_steps,
            "curve_every": max(1, stage3_steps // STAGE3_POINTS), "shots": ",".join(map(str, shots)),
            "expected_s": round(evidence_cost(t, shape["stage1_steps"], stage3_steps, subsets, shots=shots), 1), "fits": fits}


def plan_evidence(times: Mapping[str, Mapping[str, float]], budget_s: float, limits: Limits) -> dict[str, Any]:
    """The largest evidence run that fits ``SAFETY * budget_s``: the first size of ``limits.evidence_sizes`` (largest
    first) with times in ``times`` where some (subsets, Stage 3 steps) of its ladder leaves room for at least its
    fewest Stage 1 steps; then the most Stage 1 steps (up to its most, in whole rounds) that fit."""
    room = SAFETY * budget_s
    for size in limits.evidence_sizes:
        if size not in times:
            continue
        t, ladder = times[size], EVIDENCE_LADDER[size]
        low, high = ladder["stage1_steps"]
        grain = EVIDENCE_SITES * MAX_ROUNDS
        candidates = sorted({evidence_shape(s)["stage1_steps"] for s in (low, high, *range(grain, high + 1, grain))
                             if low <= s <= high}, reverse=True)
        for subsets in ladder["subsets"]:
            for stage3_steps in ladder["stage3_steps"]:
                for s1 in candidates:
                    if s1 >= low and evidence_cost(t, s1, stage3_steps, subsets, shots=limits.evidence_shots) <= room:
                        return _evidence_plan(size, t, s1, stage3_steps, subsets, True, limits.evidence_shots)
    if limits.force_smallest:
        size = next((s for s in reversed(limits.evidence_sizes) if s in times), None)
        if size is not None:
            ladder = EVIDENCE_LADDER[size]
            return _evidence_plan(size, times[size], ladder["stage1_steps"][0], ladder["stage3_steps"][-1], ladder["subsets"][-1], False,
                                  limits.evidence_shots)
    return {"skip": True, "fits": False, "reason": f"no evidence size of {', '.join(limits.evidence_sizes)} fits {budget_s:.0f} s"}


def evidence_budget(budgets: Mapping[str, float], total_s: float) -> float:
    return total_s - sum(v for k, v in budgets.items() if k != "evidence")


def plan_part(name: str, times: Mapping[str, Any], budget_s: float, limits: Limits) -> dict[str, Any]:
    """The plan of one part for ``budget_s`` seconds from the step times ``times`` (see :data:`ASSUMED_TIMES`)."""
    if name in ("ssl_step", "finetune_step", "sliding_window"):
        return plan_compare(times[name], budget_s, limits)
    if name == "data_wait":
        return plan_data_wait(times["engine"], budget_s, limits)
    if name == "numerics":
        return plan_numerics(times["engine"], budget_s, limits)
    if name in COMPILED_PARTS:
        return plan_compiled(times[COMPILED_PARTS[name]], budget_s, limits)
    if name == "evidence":
        return plan_evidence(times["evidence"], budget_s, limits)
    return {"expected_s": budget_s, "fits": True}  # check, probe: not planned, bounded by their budgets


def plan_run(times: Mapping[str, Any], budgets: Mapping[str, float] = BUDGETS, total_s: float = DEFAULT_BUDGET_S,
             limits: Limits = GPU_LIMITS) -> dict[str, Any]:
    """Every part's plan for its budget (the evidence: what the others leave of ``total_s``).

    Returns ``{"parts": {name: plan}, "budgets": {name: seconds}, "expected_s": total}``; each plan holds its
    ``expected_s`` and whether it ``fits``; ``expected_s`` counts check and probe at their budgets.
    """
    budgets = {**{k: float(v) for k, v in budgets.items() if k != "evidence"}}
    budgets["evidence"] = evidence_budget(budgets, total_s)
    parts = {name: plan_part(name, times, budgets[name], limits) for name in PARTS}
    expected = sum(min(p["expected_s"], budgets[n]) for n, p in parts.items() if not p.get("skip"))
    return {"parts": parts, "budgets": budgets, "expected_s": round(expected, 1), "total_s": total_s}


def describe_plan(name: str, plan: Mapping[str, Any]) -> str:
    """One line: what a part will do."""
    if plan.get("skip"):
        return f"skip ({plan['reason']})"
    if "numerics_steps" in plan:
        text = f"{plan['numerics_steps']} steps x 3 engines"
    elif "steps" in plan:
        text = f"{plan['warmup']} warm-up + {plan['repeats']} rounds x {plan['steps']} timed steps per variant"
    elif "stage1_steps" in plan:
        text = (f"size {plan['size']}: Stage 1 {plan['stage1_steps']} steps ({plan['rounds']} rounds x {plan['local_steps']} x "
                f"{EVIDENCE_SITES} sites), Stage 3 {plan['stage3_steps']} steps x {plan['subsets']} subsets x shots {plan['shots']}")
    else:
        return "bounded by its budget"
    return text + f", about {plan['expected_s']:.0f} s" + ("" if plan["fits"] else " (does NOT fit: the smallest)")


# --------------------------------------------------------------------------- the summary (pure)
GOALS = {
    "ssl": ">= 100 encoder passes/s and >= 4x the reference step",
    "finetune": ">= 2x the reference step",
    "sliding_window": ">= 3x the reference",
    "numerics": "bf16 loss within 2 % of fp32 (mean; max 5 %)",
    "data_wait": "< 5 % of step time waiting for data",
}


def _rows(results: Mapping[str, Any], part: str, bench: str) -> list[dict[str, Any]]:
    entry = results.get("parts", {}).get(part, {})
    if entry.get("status") != "ok":
        return []
    return entry.get("result", {}).get("results", {}).get(bench, {}).get("rows", [])


def _best(rows: Sequence[Mapping[str, Any]], key: str, exclude: str = "") -> dict[str, Any] | None:
    fast = [r for r in rows if not r.get("reference") and r.get(key) and not (exclude and exclude in r["name"])]
    return max(fast, key=lambda r: r[key]) if fast else None


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


def goal_lines(results: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, measured, goal, verdict) for each goal that has numbers."""
    lines = []
    ssl = [(p, r) for p in ("ssl_step", "ssl_compiled") for r in _rows(results, p, "ssl_step")]
    best = _best([r for _, r in ssl], "encoder_passes_per_s")
    if best:
        part = next(p for p, r in ssl if r is best)
        reference = next((r for p, r in ssl if r.get("reference") and p == part), None)
        ok = best["encoder_passes_per_s"] >= 100 and (best.get("speedup") or 0) >= 4
        lines.append(("SSL step", f"{best['name']}: {best['encoder_passes_per_s']:.1f} encoder passes/s, {best.get('speedup') or 0:.2f}x "
                      f"the reference ({reference['encoder_passes_per_s'] if reference else float('nan'):.1f}/s, same part)",
                      GOALS["ssl"], _verdict(ok)))
    ft = [r for p in ("finetune_step", "finetune_compiled") for r in _rows(results, p, "finetune_step")]
    best = _best(ft, "speedup", exclude="ckpt")
    if best:
        lines.append(("fine-tuning step", f"{best['name']}: {best['samples_per_s']:.2f} samples/s, {best['speedup']:.2f}x",
                      GOALS["finetune"], _verdict(best["speedup"] >= 2)))
    sw = {r["name"]: r for r in _rows(results, "sliding_window", "sliding_window")}
    if "fast" in sw:
        kernels = sw.get("fast kernels", {})
        lines.append(("sliding window", f"fast: {sw['fast']['speedup']:.2f}x ({sw['fast']['steps_per_s']:.3g} volumes/s); "
                      f"fast kernels {kernels.get('speedup') or 0:.2f}x, max |p diff| {kernels.get('info', {}).get('max_abs_prob_diff', float('nan')):.2g}",
                      GOALS["sliding_window"], _verdict(sw["fast"]["speedup"] >= 3)))
    numerics = results.get("parts", {}).get("numerics", {})
    if numerics.get("status") == "ok":
        result = numerics["result"]["results"]["numerics"]
        if result.get("skipped"):
            lines.append(("numerics", "skipped on the CPU (the engine trains in fp32 there)", GOALS["numerics"], "-"))
        else:
            paths = result["fast_paths"]
            worst_mean = max(p["mean_relative_deviation"] for p in paths.values())
            worst_max = max(p["max_relative_deviation"] for p in paths.values())
            ok = all(p["mean_relative_deviation"] <= 0.02 and p["max_relative_deviation"] <= 0.05 for p in paths.values())
            lines.append(("numerics", f"{result['config']['steps']} steps, {len(paths)} fast paths: worst mean {100 * worst_mean:.2f} %, "
                          f"worst max {100 * worst_max:.2f} %", GOALS["numerics"], _verdict(ok)))
    wait = results.get("parts", {}).get("data_wait", {})
    if wait.get("status") == "ok":
        result = wait["result"]["results"]["data_wait"]
        row = result["rows"][-1]
        lines.append(("data wait", f"{row['info']['num_workers']} workers: {100 * row['data_wait_fraction']:.1f} % waiting",
                      GOALS["data_wait"], _verdict(result.get("met"))))
    return lines


def part_line(name: str, entry: Mapping[str, Any]) -> str:
    """What a part measured, in a few words."""
    status = entry.get("status")
    if status != "ok":
        if entry.get("reason"):
            return entry["reason"]
        error = (entry.get("error") or "").strip().splitlines()
        return error[0][:160] if error else ""
    result = entry.get("result", {})
    if name == "check":
        return result.get("device_name", "")
    if name == "probe":
        return f"step times {result.get('source', 'measured')}; plan: {result.get('plan_expected_s', 0):.0f} s expected"
    if name == "evidence":
        parts = [f"size {result.get('size')}"]
        for shots, entry3 in result.get("stage3", {}).items():
            d = entry3["paired"]["central - scratch"], entry3["paired"]["federated - scratch"]
            parts.append(f"{shots} case(s): central-scratch {d[0]['mean']:+.4f} [{d[0]['ci95'][0]:+.3f}, {d[0]['ci95'][1]:+.3f}], "
                         f"federated-scratch {d[1]['mean']:+.4f} [{d[1]['ci95'][0]:+.3f}, {d[1]['ci95'][1]:+.3f}]")
        return "; ".join(parts)
    bench = COMPILED_PARTS.get(name, name)
    rows = result.get("results", {}).get(bench, {}).get("rows", [])
    if rows and name != "data_wait":
        shown = [f"{r['name']} {r['speedup']:.2f}x" for r in rows if not r.get("reference") and r.get("speedup")]
        compiled = [r for r in rows if "compile" in r["name"] and r.get("first_step_s")]
        text = ", ".join(shown)
        if compiled:
            text += f"; first (compiling) step {compiled[0]['first_step_s']:.0f} s"
        return text
    return "; ".join(result.get("results", {}).get(bench, {}).get("summary", []))[:150]


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def summary_text(results: Mapping[str, Any]) -> str:
    """The table printed at the end (and written as ``summary.txt`` after every part)."""
    run, parts = results.get("run", {}), results.get("parts", {})
    check = parts.get("check", {}).get("result", {})
    head = (f"device run: {check.get('device_name', '?')}, torch {check.get('torch', '?')}"
            f"{', CUDA ' + str(check['cuda_build']) if check.get('cuda_build') else ''}; budget {run.get('budget_s', 0):.0f} s"
            + (f", took {run['seconds']:.0f} s" if "seconds" in run else ""))
    if run.get("dry_run"):
        head += "\nDRY RUN on the CPU with a tiny plan: it checks that every part runs; its figures say nothing about a GPU"
    rows = [("part", "status", "s / budget", "plan", "measured")]
    for name in PARTS:
        entry = parts.get(name)
        if entry is None:
            rows.append((name, "not run", "", "", ""))
            continue
        plan = entry.get("plan") or {}
        rows.append((name, entry.get("status", "?"), f"{entry.get('seconds', 0):.0f} / {entry.get('budget_s', 0):.0f}",
                     describe_plan(name, plan) if plan else "", _clip(part_line(name, entry), 170)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [head, ""]
    for j, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].rjust(widths[2]), r[3], "|", r[4]]).rstrip())
        if j == 0:
            lines.append("-" * (sum(widths) + 30))
    goals = goal_lines(results)
    if goals:
        lines += ["", "goals (one H100; speed-ups against the reference-style step timed in the same process):"]
        w = [max(len(g[i]) for g in goals) for i in range(4)]
        lines += [f"  {g[0].ljust(w[0])}  {g[3].ljust(w[3])}  {g[1]}   (goal {g[2]})" for g in goals]
    total = sum(e.get("seconds", 0) for e in parts.values())
    lines += ["", f"parts took {total:.0f} s; files: results.json, summary.txt, bench.txt, evidence.md, evidence.png, run.log"]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, results: Mapping[str, Any]) -> None:
    """``results.json`` and ``summary.txt``, atomically."""
    atomic_write_json(results, out / "results.json")
    atomic_write_text(summary_text(results), out / "summary.txt")


def read_results(out: Path) -> dict[str, Any]:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------- the worker: the parts themselves
DRY_SIZE_FIELDS = dict(model="test", ssl_roi=64, ssl_batch=1, ssl_crops=1, ft_roi=64, ft_batch=1, volume=(4, 64, 64, 64),
                       synth_spacing=4.0, synth_subjects=2, numerics_steps=2, fl_rounds=0, fl_local_steps=1,
                       steps=1, warmup=0, repeats=1)


class Worker:
    """Runs the parts not yet recorded in ``OUT/results.json``, one after another, recording each as it ends."""

    def __init__(self, state: Mapping[str, Any]):
        self.state = dict(state)
        self.out, self.work = Path(state["out"]), Path(state["work"])
        self.dry_run = bool(state["dry_run"])
        self.limits = DRY_LIMITS if self.dry_run else dataclasses.replace(GPU_LIMITS, compile_s=float(state["compile_estimate_s"]))
        self.budgets: dict[str, float] = dict(state["budgets"])
        self.end = float(state["end"])
        self.results = read_results(self.out)
        self._pool = None
        self.device = "cpu" if self.dry_run else "cuda"

    # ---- helpers
    def pool(self):
        """One pool of spawned processes for the synthetic data (spawned: the worker holds a CUDA context)."""
        if self._pool is None:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            workers = max(1, min(16, os.cpu_count() or 1, int(self.state.get("synth_workers") or 16)))
            self._pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
        return self._pool

    def _pool_for(self, spacing: float):
        """The pool where it pays: volumes of 1-2 mm take seconds each; coarse ones less than starting a process."""
        return self.pool() if spacing < 3.0 else None

    @property
    def size(self):
        from bsf.bench.sizes import SIZES, BenchSize

        return BenchSize(**DRY_SIZE_FIELDS) if self.dry_run else SIZES["small"]

    def record(self, name: str, entry: Mapping[str, Any]) -> None:
        self.results.setdefault("parts", {})[name] = dict(entry)
        write_outputs(self.out, self.results)

    def times(self) -> dict[str, Any]:
        """The step times the plan uses: measured ones over the assumed ones."""
        measured = self.results.get("times", {})
        merged = {k: v for k, v in ASSUMED_TIMES.items()}
        merged["evidence"] = {**ASSUMED_TIMES["evidence"], **measured.get("evidence", {})}
        merged.update({k: v for k, v in measured.items() if k != "evidence"})
        return merged

    def save_times(self, key: str, value: Any, evidence_size: str | None = None) -> None:
        times = self.results.setdefault("times", {})
        if evidence_size:
            times.setdefault("evidence", {})[evidence_size] = value
        else:
            times[key] = value
        write_outputs(self.out, self.results)

    def bench_data(self, dataset: str, subjects: int, spacing: float, seed: int = 0) -> Path:
        """The bench's synthetic data set, made once in the work folder (in parallel) and shared by every part and
        worker; replaces :func:`bsf.bench.synthetic.synthetic_root`, which makes one per process, serially."""
        from pretraining_evidence import synthesize_parallel

        root = self.work / "bench_data" / f"{dataset}_{subjects}_{spacing:g}mm_seed{seed}"
        marker = root / ".complete"
        if not marker.is_file():
            started = time.perf_counter()
            synthesize_parallel(dataset, subjects, root, spacing=spacing, seed=seed, pool=self._pool_for(spacing))
            marker.write_text("ok\n")
            say(f"synthetic {dataset}: {subjects} subjects at {spacing:g} mm in {time.perf_counter() - started:.1f} s")
        return root

    def options(self, plan: Mapping[str, Any]):
        import torch

        from bsf.bench.harness import Options

        device = torch.device(self.device)
        precision = "fp32"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as `bsf bench` does
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        size = self.size
        if "numerics_steps" in plan:
            size = dataclasses.replace(size, numerics_steps=int(plan["numerics_steps"]))
        warmup = plan.get("warmup", self.limits.warmup)
        return Options(size=size, device=device, precision=precision, compile=False, steps=int(plan.get("steps", 1)),
                       warmup=int(warmup), repeats=int(plan.get("repeats", 1)), seed=0)

    def bench(self, name: str, plan: Mapping[str, Any]) -> dict[str, Any]:
        """``bsf bench --only NAME`` with the plan's steps: the report of :func:`bsf.bench.cli.run_benchmarks`."""
        from bsf.bench.cli import run_benchmarks

        return run_benchmarks([name], self.options(plan))

    def compiled(self, base: str, plan: Mapping[str, Any]) -> dict[str, Any]:
        """The reference step against ``fast+sdpa+compile``: the variants of ``bsf bench``'s own modules (their
        builders), without the other variants' compiling. A dry run times the variant uncompiled."""
        import torch

        from bsf.bench import finetune_step, ssl_step
        from bsf.bench.harness import compare, machine_info

        opts = self.options(plan)
        s, compile_it = opts.size, self.limits.compiled
        started = time.perf_counter()
        if base == "ssl_step":
            crops = s.ssl_batch * s.ssl_crops
            gen = torch.Generator(opts.device).manual_seed(opts.seed)
            x = torch.rand((crops, ssl_step.IN_CHANNELS, s.ssl_roi, s.ssl_roi, s.ssl_roi), generator=gen, device=opts.device)
            variants = [ssl_step._reference(x, opts), ssl_step._fast(x, opts, compiled=compile_it, sdpa=True)]
            for variant in variants:
                augment = variant.info.pop("augment")
                variant.info["augmentation_s_median"] = ssl_step._augmentation_s(augment, opts.device, max(opts.steps, 2))
            rows = compare(variants, opts)
            for row in rows:
                row["encoder_passes_per_s"] = 2 * row["samples_per_s"]
            config = {"model": s.model, "roi": s.ssl_roi, "crops": crops, "encoder_passes_per_step": 2 * crops}
        else:
            b = s.ft_batch
            variants = [finetune_step._reference(opts, b),
                        finetune_step._fast("fast+sdpa+compile" if compile_it else "fast+sdpa", opts, batch=b, compiled=compile_it, sdpa=True)]
            rows = compare(variants, opts)
            config = {"model": s.model, "roi": s.ft_roi, "batch": b}
        for row, variant in zip(rows, variants):
            row["info"]["final_loss"] = float(variant.step.last_loss)
            if not compile_it and not row["reference"]:
                row["info"]["note"] = "dry run: not compiled"
        return {"machine": machine_info(opts.device),
                "options": {"size": dataclasses.asdict(s), "device": str(opts.device), "precision": opts.precision, "compile": compile_it,
                            "steps": opts.steps, "warmup": opts.warmup, "repeats": opts.repeats, "seed": opts.seed},
                "results": {base: {"config": config, "rows": rows, "seconds": time.perf_counter() - started}}}

    def bench_table(self) -> None:
        """``bench.txt``: every finished benchmark's table (``bsf bench``'s format)."""
        from bsf.bench.cli import format_table

        tables = []
        for name in (*BENCH_PARTS, *COMPILED_PARTS):
            entry = self.results.get("parts", {}).get(name, {})
            if entry.get("status") == "ok":
                tables.append(f"== {name}\n{format_table(entry['result'])}")
        atomic_write_text("\n\n".join(tables) + "\n", self.out / "bench.txt")

    # ---- the evidence protocol
    def evidence_argv(self, size: str, folder: Path, plan: Mapping[str, Any] | None) -> list[str]:
        import pretraining_evidence as pe

        argv = ["--out", str(folder), "--size", size, "--synth-workers", "1"]
        if plan:
            argv += ["--stage1-steps", str(plan["stage1_steps"]), "--local-steps", str(plan["local_steps"]),
                     "--stage1-curve", str(plan["stage1_curve"]), "--subsets", str(plan["subsets"]),
                     "--stage3-steps", str(plan["stage3_steps"]), "--curve-every", str(plan["curve_every"]), "--shots", plan["shots"]]
        device = [f"train.device={self.device}"]  # the CPU presets name the CPU; the GPU one says auto
        argv += ["--stage1-set", *pe.SIZES[size]["stage1_set"], *device, "--stage3-set", *pe.SIZES[size]["stage3_set"], *device]
        return argv

    def evidence_times(self, size: str) -> dict[str, float]:
        """One size's evidence steps: build, step, held-out score and checkpoint of a Stage 1 and a Stage 3 engine, on
        the data the evidence run will use (made here)."""
        import pretraining_evidence as pe

        from bsf.engine import Engine

        folder = self.work / f"evidence_{size}"
        args = pe.resolve_args(self.evidence_argv(size, folder, None))
        started = time.perf_counter()
        data = pe.make_data(folder, args, pool=self._pool_for(args.spacing))
        data_s = time.perf_counter() - started
        probe = self.work / f"probe_evidence_{size}"
        k = 1 if self.dry_run else 3
        times = {"data_s": round(data_s, 2)}

        started = time.perf_counter()
        engine = Engine(pe.stage1_config(args, data.ukb_central, k + 1, probe / "stage1"))
        times["stage1_build_s"] = time.perf_counter() - started
        engine.train_steps(1)
        times["stage1_step_s"] = _timed(lambda: engine.train_steps(k), engine) / k
        times["stage1_validate_s"] = _timed(engine.validate, engine)
        times["checkpoint_s"] = _timed(lambda: engine.save_checkpoint(probe / "checkpoint.pt"), engine)
        del engine
        _free()
        datalist = probe / "stage3.json"
        atomic_write_json({**data.brats_header, "training": pe.few_shot(data.brats_pool, max(args.shots), 0),
                           "validation": data.brats_held_out}, datalist)
        started = time.perf_counter()
        engine = Engine(pe.stage3_config(args, datalist, None, 0, probe / "stage3", steps=k + 1))
        times["stage3_build_s"] = time.perf_counter() - started
        engine.train_steps(1)
        times["stage3_step_s"] = _timed(lambda: engine.train_steps(k), engine) / k
        times["stage3_validate_s"] = _timed(engine.validate, engine)
        del engine
        _free()
        shutil.rmtree(probe, ignore_errors=True)
        return {key: round(value, 4) for key, value in times.items()}

    def evidence(self, plan: Mapping[str, Any]) -> dict[str, Any]:
        import pretraining_evidence as pe

        size = plan["size"]
        folder = self.work / f"evidence_{size}"
        argv = self.evidence_argv(size, folder, plan)
        say("evidence: pretraining_evidence.py " + " ".join(argv))
        try:
            pe.main(argv)
        except SystemExit as stop:  # the script's own refusals (bad combination, data made otherwise)
            raise RuntimeError(f"pretraining_evidence.py stopped: {stop}") from None
        result = json.loads((folder / "evidence.json").read_text())
        shutil.copyfile(folder / "report.md", self.out / ".evidence.md.tmp")
        os.replace(self.out / ".evidence.md.tmp", self.out / "evidence.md")
        shutil.copyfile(folder / "evidence.png", self.out / ".evidence.png.tmp")
        os.replace(self.out / ".evidence.png.tmp", self.out / "evidence.png")
        return {"size": size, "argv": argv, "setting": result["setting"], "stage1": result["stage1"], "stage3": result["stage3"],
                "cost": result["cost"], "per_run_dice": [{k: r[k] for k in ("arm", "shots", "subset", "dice")} for r in result["runs"]]}

    # ---- the parts
    def part_check(self) -> dict[str, Any]:
        import importlib.metadata as metadata

        import torch

        info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
                                "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count()}
        info["packages"] = {}
        for name in ("monai", "nibabel", "nilearn", "numpy", "scipy", "einops", "matplotlib", "PyYAML", "nvflare"):
            try:
                info["packages"][name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                info["packages"][name] = None
        import bsf.bench.cli  # noqa: F401  (everything the parts import, before any time is spent)
        import bsf.bench.data_wait  # noqa: F401
        import bsf.bench.finetune_step  # noqa: F401
        import bsf.bench.numerics  # noqa: F401
        import bsf.bench.sliding_window  # noqa: F401
        import bsf.bench.ssl_step  # noqa: F401
        import pretraining_evidence  # noqa: F401

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(device_name=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                        capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                        bf16=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
            a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
            (a @ a).sum().item()
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(10):
                a @ a
            torch.cuda.synchronize()
            info["bf16_matmul_tflops"] = round(10 * 2 * 4096**3 / (time.perf_counter() - started) / 1e12, 1)
        if self.dry_run:
            info["device_name"] = f"CPU ({os.cpu_count()} cores; dry run)" + ("; a GPU is present but a dry run uses the CPU" if torch.cuda.is_available() else "")
            info["device"] = "cpu"
        elif not torch.cuda.is_available():
            raise NoDevice(f"no CUDA device: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees none. This command is "
                           "for a lent GPU machine; pass --dry-run to try it on the CPU")
        else:
            info["device"] = "cuda"
        say(f"check: {info['device_name']}, torch {info['torch']}, packages {info['packages']}")
        return info

    def part_probe(self) -> dict[str, Any]:
        s = self.size
        self.bench_data("ukb", s.synth_subjects, s.synth_spacing)
        self.bench_data("brats", s.synth_subjects, s.synth_spacing)
        plan = {**PROBE_PLAN, "warmup": min(1, self.limits.warmup)}
        reports, failed = {}, {}
        for name in ("ssl_step", "finetune_step", "sliding_window"):
            try:
                started = time.perf_counter()
                report = self.bench(name, plan)
                self.save_times(name, compare_times(report["results"][name], plan, time.perf_counter() - started))
                reports[name] = report
                steps = ", ".join(f"{k} {v:.3g} s" for k, v in self.results["times"][name]["step_s"].items())
                say(f"probe {name}: {time.perf_counter() - started:.1f} s; one step: {steps}")
            except Exception as error:  # noqa: BLE001 - the plan falls back to assumed times for this one
                failed[name] = f"{type(error).__name__}: {error}"
                say(f"probe {name} failed: {failed[name]}")
            _free()
        try:
            started = time.perf_counter()
            self.save_times("engine", self.engine_times())
            say(f"probe engine: {time.perf_counter() - started:.1f} s; {self.results['times']['engine']}")
        except Exception as error:  # noqa: BLE001
            failed["engine"] = f"{type(error).__name__}: {error}"
        nominal = evidence_budget(self.budgets, float(self.state["budget_s"]))
        for size in self.limits.evidence_sizes:  # largest first, until one fits the evidence's budget
            try:
                started = time.perf_counter()
                self.save_times(size, self.evidence_times(size), evidence_size=size)
                say(f"probe evidence {size}: {time.perf_counter() - started:.1f} s; {self.results['times']['evidence'][size]}")
            except Exception as error:  # noqa: BLE001
                failed[f"evidence {size}"] = f"{type(error).__name__}: {error}"
                say(f"probe evidence {size} failed: {failed[f'evidence {size}']}")
            _free()
            measured = self.results.get("times", {}).get("evidence", {})
            if size in measured and not plan_evidence({size: measured[size]}, nominal, dataclasses.replace(self.limits, evidence_sizes=(size,))).get("skip"):
                break
        plan_all = plan_run(self.times(), self.budgets, float(self.state["budget_s"]), self.limits)
        self.results["plan"] = plan_all
        say(f"plan (from step times {'measured' if not failed else 'measured, assumed for ' + ', '.join(failed)}; "
            f"{plan_all['expected_s']:.0f} s expected of {plan_all['total_s']:.0f} s):")
        for name, part_plan in plan_all["parts"].items():
            if name not in ("check", "probe"):
                say(f"  {name:<18} {plan_all['budgets'][name]:>4.0f} s: {describe_plan(name, part_plan)}")
        return {"times": self.results.get("times", {}), "failed": failed, "reports": reports,
                "source": "measured" if not failed else "partly assumed", "plan_expected_s": plan_all["expected_s"],
                "probe_plan": plan}

    def engine_times(self) -> dict[str, float]:
        """A Stage 1 engine at the bench size reading its synthetic data with no loader workers, memory cache (as
        ``numerics``): building and filling the cache (``build_s``), then a step (``step_s``)."""
        from bsf.bench.synthetic import stage1_config
        from bsf.engine import Engine

        opts = self.options({})
        s = opts.size
        # first steps until every subject was read once (the memory cache filled: counted as building), then k steps
        fill = 1 if self.dry_run else max(1, math.ceil(s.synth_subjects / s.ssl_batch))
        k = 1 if self.dry_run else 3
        started = time.perf_counter()
        engine = Engine(stage1_config(opts, f"train.precision={opts.precision}", f"train.steps={fill + k}"))
        engine.train_steps(fill)
        build = time.perf_counter() - started
        step = _timed(lambda: engine.train_steps(k), engine) / k
        del engine
        _free()
        return {"build_s": round(build, 3), "step_s": round(step, 4)}

    def run_part(self, name: str, plan: Mapping[str, Any]) -> dict[str, Any]:
        if name == "check":
            return self.part_check()
        if name == "probe":
            return self.part_probe()
        if plan.get("skip"):
            raise Skip(plan["reason"])
        if name in BENCH_PARTS:
            probe = self.results.get("parts", {}).get("probe", {}).get("result", {})
            probe_plan = probe.get("probe_plan", {})
            if name in probe.get("reports", {}) and all(plan.get(k) == probe_plan.get(k) for k in ("steps", "warmup", "repeats")):
                say(f"{name}: the plan is the probe's; its measurement is this part's")
                return {**probe["reports"][name], "from_probe": True}
            return self.bench(name, plan)
        if name in COMPILED_PARTS:
            return self.compiled(COMPILED_PARTS[name], plan)
        if name == "evidence":
            return self.evidence(plan)
        raise ValueError(name)

    def run(self) -> int:
        import bsf.bench.synthetic

        bsf.bench.synthetic.synthetic_root = self.bench_data  # one shared data set per size (see bench_data)
        todo = [p for p in PARTS if p in self.state["parts"] and p not in self.results.get("parts", {})]
        for i, name in enumerate(todo):
            now = time.time()
            later = sum(self.budgets.get(p, 0) for p in todo[i + 1:] if p != "evidence")
            room = self.end - now - later
            budget = (self.end - now) if name == "evidence" else min(self.budgets[name], room)
            if name in ("check", "probe"):
                plan: dict[str, Any] = {}
            else:
                plan = plan_part(name, self.times(), budget, self.limits)
                if name == "evidence" and "size" in plan:
                    measured = self.results.get("times", {}).get("evidence", {})
                    plan["times"] = "measured" if plan["size"] in measured else "assumed"
            minimum = MIN_EVIDENCE_S if name == "evidence" else min(8.0, 0.3 * self.budgets.get(name, 8.0))
            if self.dry_run and name == "evidence":
                minimum = 0.0
            if budget < minimum:
                self.record(name, {"status": "skipped", "seconds": 0.0, "budget_s": round(budget, 1), "plan": plan,
                                   "reason": f"{budget:.0f} s left, less than the {minimum:.0f} s it needs"})
                continue
            atomic_write_json({"part": name, "started": now, "deadline": now + budget, "pid": os.getpid()}, self.work / "current.json")
            say(f"{name}: start, budget {budget:.0f} s" + (f"; plan: {describe_plan(name, plan)}" if plan else ""))
            started = time.perf_counter()
            try:
                if self.state.get("hang") == name:
                    time.sleep(3600)  # tests: a part that outruns its budget
                result = self.run_part(name, plan)
                entry = {"status": "ok", "result": result}
            except NoDevice as error:
                self.record(name, {"status": "failed", "seconds": round(time.perf_counter() - started, 1), "budget_s": round(budget, 1),
                                   "error": str(error)})
                say(f"check: {error}")
                return 3
            except Skip as reason:
                entry = {"status": "skipped", "reason": str(reason)}
            except Exception as error:  # noqa: BLE001 - a failed part is recorded; the next one runs
                entry = {"status": "failed", "error": f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}"}
                say(f"{name}: FAILED: {type(error).__name__}: {error}")
            entry.update(seconds=round(time.perf_counter() - started, 1), budget_s=round(budget, 1), plan=plan)
            self.record(name, entry)
            if name in BENCH_PARTS or name in COMPILED_PARTS:
                self.bench_table()
            say(f"{name}: {entry['status']} in {entry['seconds']:.0f} s")
            _free()
        if self._pool is not None:
            self._pool.shutdown()
        return 0


class NoDevice(Exception):
    """No GPU where one is needed."""


class Skip(Exception):
    """A part whose plan says it does not fit."""


def _timed(fn, engine) -> float:
    from bsf.bench.harness import sync

    sync(engine.device)
    started = time.perf_counter()
    fn()
    sync(engine.device)
    return time.perf_counter() - started


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def compare_times(result: Mapping[str, Any], plan: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """Step times of a benchmark run with ``plan`` (``result``: its ``{"rows"}``): each variant's median step, the
    SSL augmentation, and the overhead = the run's seconds less its calls (``compare_cost``'s model)."""
    step_s = {r["name"]: float(r["step_s_median"]) for r in result["rows"]}
    aug_s = {r["name"]: float(r["info"]["augmentation_s_median"]) for r in result["rows"] if "augmentation_s_median" in r.get("info", {})}
    model = {"overhead_s": 0.0, "step_s": step_s, "aug_s": aug_s}
    calls = compare_cost(model, warmup=int(plan.get("warmup", 0)), steps=int(plan["steps"]), repeats=int(plan["repeats"]))
    return {"overhead_s": round(max(0.0, seconds - calls), 3), "step_s": step_s, "aug_s": aug_s}


# --------------------------------------------------------------------------- the driver
def nvidia_smi() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return (done.stdout or done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nvidia-smi: {error}"


def _tee(stream, log_path: Path) -> None:
    with open(log_path, "a", encoding="utf-8") as log:
        for line in iter(stream.readline, ""):
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()


def _stop(process: subprocess.Popen) -> None:
    """Stop the worker and what it started (its own process group): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def drive(args: argparse.Namespace) -> int:
    started = time.time()
    out = Path(args.out).resolve()
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="bsf_device_"))
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("results.json", "summary.txt", "bench.txt", "evidence.md", "evidence.png", "run.log"):
        (out / stale).unlink(missing_ok=True)
    budgets = dict(DRY_BUDGETS if args.dry_run else BUDGETS)
    for item in args.budget or []:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not seconds:
            raise SystemExit(f"--budget {item}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        budgets[name] = float(seconds)
    budget_s = float(args.budget_s or (DRY_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S))
    parts = [p for p in PARTS if p in (args.parts.split(",") if args.parts else PARTS)]
    unknown = set(args.parts.split(",")) - set(PARTS) if args.parts else set()
    if unknown:
        raise SystemExit(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if "check" not in parts:
        parts.insert(0, "check")
    state = {"out": str(out), "work": str(work), "dry_run": args.dry_run, "budgets": budgets, "budget_s": budget_s,
             "end": started + budget_s, "parts": parts, "compile_estimate_s": args.compile_estimate_s,
             "synth_workers": args.synth_workers, "hang": args.test_hang}
    command = "device_run.py " + " ".join(sys.argv[1:])
    results = {"run": {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
                       "budget_s": budget_s, "budgets": budgets, "dry_run": args.dry_run, "out": str(out), "work": str(work),
                       "parts": parts, "limits": dataclasses.asdict(DRY_LIMITS if args.dry_run else
                                                                   dataclasses.replace(GPU_LIMITS, compile_s=args.compile_estimate_s))},
               "nvidia_smi": nvidia_smi()}
    write_outputs(out, results)
    atomic_write_json(state, work / "state.json")
    say(f"{'DRY RUN (CPU, tiny plan)' if args.dry_run else 'GPU run'}: parts {', '.join(parts)}; budget {budget_s:.0f} s; "
        f"out {out}; work {work}")
    say(f"nvidia-smi: {results['nvidia_smi']}")
    log_path = out / "run.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    exit_code = 0
    while True:
        done = set(read_results(out).get("parts", {}))
        if all(p in done for p in parts) or time.time() > started + budget_s:
            break
        (work / "current.json").unlink(missing_ok=True)
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(work / "state.json")],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        tee = threading.Thread(target=_tee, args=(process.stdout, log_path), daemon=True)
        tee.start()
        killed = None
        while process.poll() is None:
            time.sleep(0.25)
            current = _read_json(work / "current.json")
            now = time.time()
            if current and now > current["deadline"] + GRACE_S and current["part"] not in read_results(out).get("parts", {}):
                killed = current
            elif now > started + budget_s + GRACE_S:
                killed = current or {"part": None, "started": now}
            if killed:
                _stop(process)
                break
        tee.join(10)
        code = process.wait()
        if code == 3:  # no device: nothing else can run
            exit_code = 2
            break
        current = killed or _read_json(work / "current.json")
        if current and current.get("part") and current["part"] not in read_results(out).get("parts", {}):
            results = read_results(out)
            seconds = round(time.time() - current["started"], 1)
            if killed:
                entry = {"status": "timed out", "reason": f"stopped after {seconds:.0f} s (budget {current['deadline'] - current['started']:.0f} s)"}
            else:
                entry = {"status": "failed", "reason": f"the worker exited with code {code} during this part", "error": f"exit code {code}"}
            entry.update(seconds=seconds, budget_s=round(current["deadline"] - current["started"], 1))
            results.setdefault("parts", {})[current["part"]] = entry
            write_outputs(out, results)
            say(f"{current['part']}: {entry['status']}: {entry['reason']}")
            if current["part"] == "check":
                exit_code = 2
                break
        elif code != 0:
            say(f"the worker exited with code {code} outside a part")
            break
    results = read_results(out)
    for name in parts:  # what never started
        if name not in results.get("parts", {}):
            results.setdefault("parts", {})[name] = {"status": "skipped", "seconds": 0.0, "budget_s": 0.0,
                                                    "reason": "no time left" if exit_code == 0 else "the check failed"}
    results["run"]["seconds"] = round(time.time() - started, 1)
    write_outputs(out, results)
    text = summary_text(results)
    print("\n" + text, flush=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("\n" + text)
    if not args.keep_work and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    if exit_code:
        return exit_code
    return 0 if all(results["parts"][p]["status"] == "ok" for p in parts) else 1


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Parts: " + ", ".join(PARTS))
    p.add_argument("--out", help="folder for the six result files (the device tool: $OUT/device)")
    p.add_argument("--work", help="folder for data and checkpoints (default: a new temporary folder, removed at the end)")
    p.add_argument("--keep-work", action="store_true", help="keep the default work folder")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, with a tiny plan: that every part runs (no GPU needed)")
    p.add_argument("--budget-s", type=float, default=None,
                   help=f"seconds for all parts (default {DEFAULT_BUDGET_S:.0f}, the command ending within {TOTAL_LIMIT_S:.0f} s; "
                        f"dry run {DRY_BUDGET_S:.0f})")
    p.add_argument("--budget", action="append", metavar="PART=SECONDS", help="one part's budget (repeatable); default: " +
                   ", ".join(f"{k}={v:g}" for k, v in BUDGETS.items()) + "; evidence: the rest")
    p.add_argument("--parts", help="comma-separated subset of the parts (check always runs)")
    p.add_argument("--compile-estimate-s", type=float, default=GPU_LIMITS.compile_s,
                   help="assumed seconds to compile one step variant, for the plan (the run measures it)")
    p.add_argument("--synth-workers", type=int, default=16, help="processes that write the synthetic data")
    p.add_argument("--worker", metavar="STATE", help=argparse.SUPPRESS)
    p.add_argument("--test-hang", metavar="PART", help=argparse.SUPPRESS)  # tests: this part sleeps past its budget
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return Worker(json.loads(Path(args.worker).read_text())).run()
    if not args.out:
        raise SystemExit("--out is required")
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
