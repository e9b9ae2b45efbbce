"""Does the fast path train like fp32? The loss of N engine steps in the fast precision vs in fp32.

Two :class:`bsf.engine.Engine` s from the same config and seed (so the same initial weights, data and
SSL views), one in fp32 with MONAI's attention, one on the fast path: the fast precision (bf16 where
the fast path is fp32, e.g. on a CPU: the precision the GPU fast path uses), SDPA window attention
(``train.attention: sdpa``) and, with ``--compile``, ``train.compile``. Reported: the per-step
relative deviation |fast - fp32| / fp32 of the total loss, its maximum and mean, the final losses.

Tolerance (stated before measuring, checked here): max relative deviation <= 5 % over the steps and
mean <= 2 %. bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2 % per operation); the SSL loss
is a sum of means over ~10^6 values, so its per-step error stays well under 1 %, but training
trajectories drift apart as the weights diverge, which the 5 % bound allows for.
"""

from __future__ import annotations

import numpy as np

from bsf.bench.harness import Options
from bsf.bench.synthetic import stage1_config
from bsf.engine import Engine

MAX_REL_TOL, MEAN_REL_TOL = 0.05, 0.02


def losses(opts: Options, steps: int, precision: str, attention: str = "monai", compile: bool = False) -> list[float]:
    """Total loss of each of ``steps`` Stage 1 engine steps."""
    config = stage1_config(opts, f"train.precision={precision}", f"train.attention={attention}",
                           f"train.compile={str(compile).lower()}", f"train.steps={steps}")
    return [r["loss"] for r in Engine(config).train_steps(steps)]


def run(opts: Options) -> dict:
    steps = opts.size.numerics_steps
    fast_precision = opts.precision if opts.precision != "fp32" else "bf16"
    reference = losses(opts, steps, "fp32")
    fast = losses(opts, steps, fast_precision, "sdpa", opts.compile)
    rel = np.abs(np.asarray(fast) - np.asarray(reference)) / np.abs(np.asarray(reference))
    ok = bool(rel.max() <= MAX_REL_TOL and rel.mean() <= MEAN_REL_TOL)
    label = f"{fast_precision} + SDPA{' + compile' if opts.compile else ''} vs fp32"
    return {
        "config": {"steps": steps, "fast_precision": fast_precision, "attention": "sdpa", "compile": opts.compile,
                   "tolerance": {"max_relative": MAX_REL_TOL, "mean_relative": MEAN_REL_TOL}},
        "losses_fp32": reference, "losses_fast": fast, "relative_deviation": rel.tolist(),
        "max_relative_deviation": float(rel.max()), "mean_relative_deviation": float(rel.mean()), "within_tolerance": ok,
        "summary": [f"{label} over {steps} steps: loss max relative deviation {100 * rel.max():.2f} % (tolerance"
                    f" {100 * MAX_REL_TOL:.0f} %), mean {100 * rel.mean():.2f} % (tolerance {100 * MEAN_REL_TOL:.0f} %):"
                    f" {'within' if ok else 'OUTSIDE'}; final loss {fast[-1]:.4f} vs {reference[-1]:.4f}"],
    }
