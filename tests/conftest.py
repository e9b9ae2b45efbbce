"""Shared fixtures: small synthetic data sets made on the fly, once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

#: 2.5 mm keeps a UKB-like volume at 73 x 87 x 73 voxels: 64^3 crops still hold brain anatomy.
TEST_SPACING_MM = 2.5


@pytest.fixture(scope="session")
def ukb_root(tmp_path_factory) -> Path:
    """Four UKB-like subjects in the real UK Biobank layout."""
    from bsf.data.synth import synthesize

    root = tmp_path_factory.mktemp("ukb")
    synthesize("ukb", 4, root, spacing=TEST_SPACING_MM, seed=0)
    return root


@pytest.fixture
def stage1_config(ukb_root, tmp_path):
    """A factory for the test-size Stage 1 config on ``ukb_root``; extra ``key=value`` overrides win."""
    from bsf.config import load_config

    def make(*overrides: str):
        base = [f"data.root={ukb_root}", f"train.output_dir={tmp_path / 'run'}", "train.progress=false"]
        return load_config("stage1_test", [*base, *overrides])

    return make
