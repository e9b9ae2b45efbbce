"""Synthetic data sets and run configs at the bench size, shared by the engine-level benchmarks."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from bsf.bench.harness import Options
from bsf.config import RunConfig, load_config


@functools.lru_cache(maxsize=None)
def synthetic_root(dataset: str, subjects: int, spacing: float, seed: int = 0) -> Path:
    """A temporary synthetic ``dataset`` (ukb, brats) in its real layout (made once per process, removed at exit)."""
    from bsf.data.synth import synthesize

    root = Path(tempfile.mkdtemp(prefix=f"bsf_bench_{dataset}_"))
    atexit.register(shutil.rmtree, root, True)
    synthesize(dataset, subjects, root, spacing=spacing, seed=seed)
    return root


def _bench_config(preset: str, dataset: str, opts: Options, overrides: tuple[str, ...]) -> RunConfig:
    """``preset`` on the bench size's synthetic ``dataset``: the bench model size, no validation, no progress bar."""
    s = opts.size
    base = [
        f"data.root={synthetic_root(dataset, s.synth_subjects, s.synth_spacing, opts.seed)}", f"model.size={s.model}",
        "data.val_cases=0", "data.check=header", f"train.device={opts.device}", "train.progress=false", f"seed={opts.seed}",
    ]
    return load_config(preset, [*base, *overrides])


def stage1_config(opts: Options, *overrides: str) -> RunConfig:
    """Stage 1 SSL: ``ssl_batch`` volumes x ``ssl_crops`` crops of ``ssl_roi``^3 per step, as in ``ssl_step``."""
    s = opts.size
    crops = [f"data.roi=[{s.ssl_roi}, {s.ssl_roi}, {s.ssl_roi}]", f"data.crops_per_volume={s.ssl_crops}", f"data.batch_size={s.ssl_batch}"]
    return _bench_config("stage1_test", "ukb", opts, (*crops, *overrides))


def stage3_config(opts: Options, *overrides: str) -> RunConfig:
    """Stage 3 BraTS fine-tuning: ``ft_batch`` crops of ``ft_roi``^3 per step (one per volume), as in ``finetune_step``."""
    s = opts.size
    crops = [f"data.roi=[{s.ft_roi}, {s.ft_roi}, {s.ft_roi}]", "data.crops_per_volume=1", f"data.batch_size={s.ft_batch}"]
    return _bench_config("stage3_brats_test", "brats", opts, (*crops, *overrides))


def fast_train_overrides(opts: Options, *, sdpa: bool, compiled: bool) -> list[str]:
    """A fast variant's ``train`` settings: the fast precision, the attention, compilation, and a learning-rate
    schedule as long as :func:`bsf.bench.harness.compare` steps it (warm-up, timed rounds, the peak-memory step)."""
    steps = opts.warmup + opts.repeats * opts.steps + 1
    return [f"train.precision={opts.precision}", f"train.attention={'sdpa' if sdpa else 'monai'}",
            f"train.compile={str(compiled).lower()}", f"train.steps={steps}"]
