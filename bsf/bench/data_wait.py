"""Does the loader keep up? The share of each training step spent waiting for the next batch.

The real training path: an :class:`bsf.engine.Engine` (Stage 1 SSL at the bench size) reading synthetic
UKB volumes through ``SampleStream`` and the training ``DataLoader``; the engine's fetch of each
micro-batch (``Engine._next_micro_batch``: loader + host-to-device copy) is timed inside its own
``train_steps``. Rows: no worker processes, and the documented settings (``cache: memory`` with
``num_workers`` workers). Goal: waiting < 5 % of step time with the documented settings.
"""

from __future__ import annotations

import os
import time

from bsf.bench.harness import Options, sync
from bsf.bench.synthetic import stage1_config
from bsf.engine import Engine

GOAL = 0.05


def documented_workers() -> int:
    """The documented loader setting (benchmarks/README.md): 4 workers per training process, fewer on small machines."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def measure(opts: Options, workers: int) -> dict:
    """Wait and step seconds over ``opts.steps * opts.repeats`` steps after ``opts.warmup`` (min 1) untimed ones."""
    config = stage1_config(opts, f"data.num_workers={workers}", "data.cache=memory",
                           f"train.precision={opts.precision}", f"train.compile={str(opts.compile).lower()}")
    engine = Engine(config)
    waits: list[float] = []
    fetch = engine._next_micro_batch

    def timed_fetch():
        start = time.perf_counter()
        batch = fetch()
        sync(opts.device)  # the host-to-device copy is non-blocking
        waits.append(time.perf_counter() - start)
        return batch

    engine._next_micro_batch = timed_fetch
    engine.train_steps(max(opts.warmup, 1))  # worker start-up and compilation
    waits.clear()
    n = opts.steps * opts.repeats
    sync(opts.device)
    start = time.perf_counter()
    engine.train_steps(n)
    sync(opts.device)
    total = time.perf_counter() - start
    crops = opts.size.ssl_batch * opts.size.ssl_crops
    return {
        "name": f"workers={workers}", "label": f"SSL engine step, cache memory, {workers} loader workers",
        "steps_per_s": n / total, "samples_per_s": n * crops / total, "step_s_median": total / n,
        "data_wait_s": sum(waits), "step_total_s": total, "data_wait_fraction": sum(waits) / total,
        "info": {"num_workers": workers},
    }


def run(opts: Options) -> dict:
    rows = [measure(opts, workers) for workers in sorted({0, documented_workers()})]
    for row in rows:
        row["speedup"] = None
    documented = rows[-1]
    summary = [f"{r['label']}: waiting {100 * r['data_wait_fraction']:.1f} % of step time" for r in rows]
    summary.append(f"goal < {100 * GOAL:.0f} % with {documented['info']['num_workers']} workers: "
                   f"{'met' if documented['data_wait_fraction'] < GOAL else 'NOT met'}")
    return {"config": {"dataset": "ukb (synthetic)", "spacing_mm": opts.size.synth_spacing, "subjects": opts.size.synth_subjects,
                       "cpu_count": os.cpu_count()}, "rows": rows, "summary": summary, "goal": GOAL,
            "met": documented["data_wait_fraction"] < GOAL}
