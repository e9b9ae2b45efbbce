"""Smoke test of the first command a new user runs: ``bsf demo --no-pipeline`` at its smallest size.

Part 1 of the demo only (centralized Stage 1 on synthetic brains, its plot and checkpoints); the
federated chain of part 2 is covered by the simulator tests.
"""

from __future__ import annotations

import json

import pytest
import torch

from bsf.cli import main

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_without_the_pipeline_trains_plots_and_says_where(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--no-pipeline", "--out", str(out), "--subjects", "2", "--steps", "1"]) == 0
    printed = capsys.readouterr().out

    stage1 = out / "stage1"
    summary = json.loads((stage1 / "summary.json").read_text())
    assert [r["step"] for r in summary["train"]] == [1] and torch.isfinite(torch.tensor(summary["train"][0]["loss"]))
    assert summary["validation"] and summary["validation"][0]["step"] == 1
    assert (stage1 / "stage1_ssl.png").read_bytes()[:8] == PNG_MAGIC
    assert torch.load(stage1 / "checkpoint_last.pt", weights_only=True)["step"] == 1
    assert "Stage 1 SSL: 1 steps" in printed and str(stage1 / "stage1_ssl.png") in printed
    assert not (out / "pipeline").exists()  # --no-pipeline: no federated chain
