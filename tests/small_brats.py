"""Two synthetic BraTS cases at 8 mm and a random test-size Stage 3 model that carries its config: the smallest
set-up on which ``bsf predict`` and ``bsf evaluate`` run for real."""

from __future__ import annotations

from pathlib import Path

import torch

from bsf.config import load_config
from bsf.data.synth import synthesize
from bsf.engine import build_model


def brats_and_model(base: Path, seed: int) -> tuple[Path, Path]:
    """``(data root, model checkpoint)`` under ``base``: cases BraTS2021_00000/1, ``run/checkpoint_last.pt``."""
    root = base / "brats"
    synthesize("brats", 2, root, spacing=8.0, seed=seed)
    config = load_config("stage3_brats_test", [f"data.root={root}", f"train.output_dir={base / 'run'}"])
    model = base / "run" / "checkpoint_last.pt"
    model.parent.mkdir()
    torch.save({"model": build_model(config).state_dict(), "config": config.to_dict()}, model)
    return root, model
