"""The shapes behind ``bsf bench --size`` (no torch import: the ``bsf`` parser reads these)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchSize:
    """The shapes one ``--size`` stands for.

    Attributes:
        model: a :data:`bsf.model.MODEL_SIZES` key.
        ssl_roi, ssl_batch, ssl_crops: SSL crop side, volumes and crops per volume (2 views per crop).
        ft_roi, ft_batch: fine-tuning crop side and batch.
        volume: whole-volume shape (C, X, Y, Z) for sliding-window inference.
        synth_spacing, synth_subjects: synthetic UKB data for the loader and numerics benchmarks.
        numerics_steps: steps of the fp32 vs fast-path loss comparison.
        fl_rounds, fl_local_steps: the fp16-difference convergence run (2 sites).
        steps, warmup, repeats: default timing per variant.
    """

    model: str
    ssl_roi: int
    ssl_batch: int
    ssl_crops: int
    ft_roi: int
    ft_batch: int
    volume: tuple[int, int, int, int]
    synth_spacing: float
    synth_subjects: int
    numerics_steps: int
    fl_rounds: int
    fl_local_steps: int
    steps: int
    warmup: int
    repeats: int


SIZES = {
    # CPU-sized: what CI runs (minutes on 2 cores; tests pass fewer steps)
    "test": BenchSize("test", 64, 1, 2, 64, 1, (4, 96, 96, 64), 2.5, 2, 6, 3, 2, 3, 1, 2),
    # the paper: Small, SSL 2 x 2 crops of 96^3, fine-tuning 128^3 x 2, one BraTS volume 240 x 240 x 155
    "small": BenchSize("small", 96, 2, 2, 128, 2, (4, 240, 240, 155), 1.0, 8, 50, 5, 10, 20, 5, 3),
}
