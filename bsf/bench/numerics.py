"""Does the fast path train like fp32? The loss of N engine steps on fast paths vs in fp32.

:class:`bsf.engine.Engine` s from the same config and seed (so the same initial weights, data and SSL
views): one in fp32 with MONAI's attention, and one per fast path: the fast precision (bf16 where the
fast path is fp32, e.g. on a CPU: the precision the GPU fast path uses) with MONAI's attention, and the
same with SDPA window attention (``train.attention: sdpa``); with ``--compile`` both also compiled.
Reported per fast path: the per-step relative deviation |fast - fp32| / fp32 of the total loss, its
maximum and mean, the final losses.

Tolerance (stated before measuring, checked here): max relative deviation <= 5 % over the steps and
mean <= 2 %. bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2 % per operation); the SSL loss
is a sum of means over ~10^6 values, so its per-step error stays well under 1 %, but training
trajectories drift apart as the weights diverge, which the 5 % bound allows for.

On a CPU there is nothing to compare and the benchmark says so: the engine trains in fp32 only there
(with torch 2.13.0+cpu the bf16 Conv3d backward of the reconstruction decoder's first layer returns
non-deterministic garbage, gradients ~1e35 in some runs of the same batch), so the CPU fast path is fp32.
"""

from __future__ import annotations

import numpy as np

from bsf.bench.harness import Options
from bsf.bench.synthetic import stage1_config
from bsf.engine import Engine

MAX_REL_TOL, MEAN_REL_TOL = 0.05, 0.02
ATTENTIONS = ("monai", "sdpa")


def losses(opts: Options, steps: int, precision: str, attention: str = "monai", compile: bool = False) -> list[float]:
    """Total loss of each of ``steps`` Stage 1 engine steps."""
    config = stage1_config(opts, f"train.precision={precision}", f"train.attention={attention}",
                           f"train.compile={str(compile).lower()}", f"train.steps={steps}")
    return [r["loss"] for r in Engine(config).train_steps(steps)]


def deviation(fast: list[float], reference: list[float]) -> dict:
    """Per-step relative deviation of ``fast`` from ``reference``, its max and mean, and the tolerance verdict."""
    rel = np.abs(np.asarray(fast) - np.asarray(reference)) / np.abs(np.asarray(reference))
    return {"relative_deviation": rel.tolist(), "max_relative_deviation": float(rel.max()),
            "mean_relative_deviation": float(rel.mean()),
            "within_tolerance": bool(rel.max() <= MAX_REL_TOL and rel.mean() <= MEAN_REL_TOL)}


def run(opts: Options) -> dict:
    steps = opts.size.numerics_steps
    if opts.device.type == "cpu":
        return {"config": {"steps": steps, "fast_precision": "fp32"}, "skipped": True,
                "summary": ["skipped on the CPU: the engine trains in fp32 there (mixed precision is for GPUs), so the fast path is fp32 itself"]}
    precision = opts.precision if opts.precision != "fp32" else "bf16"
    reference = losses(opts, steps, "fp32")
    paths, summary = {}, []
    for attention in ATTENTIONS:
        label = f"{precision} + {attention} attention{' + compile' if opts.compile else ''}"
        fast = losses(opts, steps, precision, attention, opts.compile)
        paths[label] = {"attention": attention, "losses": fast, **deviation(fast, reference)}
        p = paths[label]
        summary.append(f"{label} vs fp32 over {steps} steps: loss max relative deviation {100 * p['max_relative_deviation']:.2f} %"
                       f" (tolerance {100 * MAX_REL_TOL:.0f} %), mean {100 * p['mean_relative_deviation']:.2f} % (tolerance"
                       f" {100 * MEAN_REL_TOL:.0f} %): {'within' if p['within_tolerance'] else 'OUTSIDE'};"
                       f" final loss {fast[-1]:.4f} vs {reference[-1]:.4f}")
    return {
        "config": {"steps": steps, "fast_precision": precision, "compile": opts.compile,
                   "tolerance": {"max_relative": MAX_REL_TOL, "mean_relative": MEAN_REL_TOL}},
        "losses_fp32": reference, "fast_paths": paths, "summary": summary,
    }
