"""Synthetic UKB-like data and Stage 1 engines on it, shared by the engine-level benchmarks."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from bsf.bench.harness import Options
from bsf.config import RunConfig, load_config


@functools.lru_cache(maxsize=None)
def ukb_root(subjects: int, spacing: float, seed: int = 0) -> Path:
    """A temporary synthetic UKB data set in the real layout (made once per process, removed at exit)."""
    from bsf.data.synth import synthesize

    root = Path(tempfile.mkdtemp(prefix="bsf_bench_ukb_"))
    atexit.register(shutil.rmtree, root, True)
    synthesize("ukb", subjects, root, spacing=spacing, seed=seed)
    return root


def stage1_config(opts: Options, *overrides: str) -> RunConfig:
    """Stage 1 at the bench size on :func:`ukb_root`: SSL crops as in ``ssl_step``, no validation, no files written."""
    s = opts.size
    base = [
        f"data.root={ukb_root(s.synth_subjects, s.synth_spacing, opts.seed)}", f"model.size={s.model}",
        f"data.roi=[{s.ssl_roi}, {s.ssl_roi}, {s.ssl_roi}]", f"data.crops_per_volume={s.ssl_crops}",
        f"data.batch_size={s.ssl_batch}", "data.val_cases=0", "data.check=header", f"train.device={opts.device}",
        "train.progress=false", f"seed={opts.seed}",
    ]
    return load_config("stage1_test", [*base, *overrides])
