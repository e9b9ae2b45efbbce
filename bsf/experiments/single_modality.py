"""T1-only BraTS (paper Table 5): cross-validation with both input channels carrying T1.

The runs are the cross-validation plan (:mod:`bsf.experiments.cv`) with ``data.modalities=[t1, t1]`` and
``model.in_channels=2``. A pretrained encoder is adapted by modality name (:mod:`bsf.model.adapt`): from a T1-only
encoder (``--pretrained-modalities t1``, the default here) its T1 filters go to both channels, each halved, so the
first layer's response to [T1, T1] equals the encoder's to T1; from a (T1, FLAIR) Stage 1 encoder
(``--pretrained-modalities t1,flair``) the FLAIR filters are dropped the same way.

T1-only through all stages: train Stage 1 on UKB and Stage 2 on BraTS with ``data.modalities=[t1]
model.in_channels=1`` (``docs/protocols.md`` gives the commands), then pass that encoder here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from bsf.experiments import paper
from bsf.experiments.cv import fold_report
from bsf.experiments.cv import plan as cv_plan
from bsf.experiments.report import markdown_table
from bsf.experiments.runner import Experiment, RunSpec

#: every run: two input channels, both T1
T1_CHANNELS = ["data.modalities=[t1, t1]", "model.in_channels=2"]


def plan(experiment: Experiment, folds: Sequence[int], seeds: Sequence[int]) -> list[RunSpec]:
    return cv_plan(experiment, folds, seeds, extra=T1_CHANNELS)


def report(experiment: Experiment, records: list[dict]) -> dict[str, Path]:
    reference = "## The paper (real BraTS 2021, T1 only, 5-fold mean Dice)\n\n" + markdown_table(
        ["model", "mean Dice"], [[name, f"{v:.3f}"] for name, v in paper.T1_ONLY.items()]
    )
    return fold_report(experiment, records, "T1-only BraTS cross-validation (paper Table 5)", reference)
