"""``bsf demo`` / ``make demo``: Stage 1 SSL centrally, then the whole Stage 1 -> 2 -> 3 pipeline federated.

Part 1 trains the test-size SSL model on synthetic UKB-like brains in this process (the ``bsf train``
path) and plots it. Part 2 is :mod:`bsf.pipeline.chain` at its CPU-demo size: five simulated sites (2 UKB-,
2 BraTS-, 1 ATLAS-like), every stage an NVFlare job in ``nvflare simulator``, each started from the
previous stage's global model, and a report with loss curves, Dice per round and a prediction overlay.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from bsf.config import load_config
from bsf.data.synth import synthesize
from bsf.engine import Engine
from bsf.report import middle_slice, plot_ssl_run
from bsf.ssl import make_ssl_views
from bsf.train import train

log = logging.getLogger(__name__)

DEMO_SPACING_MM = 2.0  # 91 x 109 x 91 volumes: 64^3 crops still hold real anatomy


def run_demo(out: Path, *, subjects: int = 4, steps: int = 60, pipeline: bool = True) -> dict:
    """Centralized Stage 1 (``steps`` steps, a PNG of the run), then (``pipeline``) the federated three-stage chain."""
    summary = {"stage1_central": run_centralized(out, subjects=subjects, steps=steps)}
    if pipeline:
        summary["pipeline"] = run_pipeline(out / "pipeline")
    return summary


def run_pipeline(out: Path) -> dict:
    """:func:`bsf.pipeline.chain.run_chain` at demo size; prints each stage's time and the Stage 3 Dice."""
    from bsf.pipeline.chain import ChainConfig, run_chain

    print("Stage 1 -> 2 -> 3 federated in the NVFlare simulator (2 UKB-, 2 BraTS-, 1 ATLAS-like site) ...", flush=True)
    summary = run_chain(ChainConfig.demo(out))
    for job, stage in summary["stages"].items():
        line = f"  {job:13s} {stage['seconds']:5.0f} s  {len(stage['sites'])} site(s), {stage['rounds']} x {stage['local_steps']} steps"
        for overlay in stage.get("overlays", []):
            line += f"; validation Dice at {overlay['site']}: " + ", ".join(f"{k} {v:.3f}" for k, v in overlay["dice"].items())
        print(line)
    print(f"report: {summary['report']['markdown']}")
    print(f"global models: {out / 'models'}")
    return summary


def run_centralized(out: Path, *, subjects: int, steps: int) -> dict:
    data_root = out / "data" / "ukb"
    if not data_root.is_dir() or not any(data_root.iterdir()):
        synthesize("ukb", subjects, data_root, spacing=DEMO_SPACING_MM, seed=0, progress=True)
    config = load_config("stage1_test", [f"data.root={data_root}", f"train.output_dir={out / 'stage1'}", f"train.steps={steps}"])
    summary = train(config)
    losses = [r["loss"] for r in summary["train"]]
    png = plot_ssl_run(summary["train"], summary["validation"], _slice_triple(config, Path(summary["checkpoints"]["last"])), out / "stage1" / "stage1_ssl.png")
    window = max(1, min(10, len(losses) // 3))
    first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    print(f"Stage 1 SSL: {len(losses)} steps in {summary['seconds']:.0f} s; mean loss of the first {window} steps {first:.3f} -> last {window} {last:.3f}")
    print(f"plot: {png}")
    print(f"checkpoints: {summary['checkpoints']}")
    print(f"TensorBoard: tensorboard --logdir {out / 'stage1' / 'tb'}")
    return summary


def _slice_triple(config, checkpoint: Path) -> dict[str, np.ndarray]:
    """Input, corrupted view and reconstruction of the first validation crop under the trained model."""
    engine = Engine(config)
    engine.load_checkpoint(checkpoint)
    crop = engine.validation_inputs()[0].unsqueeze(0)
    generator = torch.Generator().manual_seed(config.seed)
    views = make_ssl_views(crop, generator, engine.task.corruption)
    engine.model.eval()
    with torch.no_grad():
        reconstruction = engine.model(views.inputs).reconstruction
    return {
        "input (rotated view)": middle_slice(views.targets[0]),
        "corrupted view": middle_slice(views.inputs[0]),
        "reconstruction": middle_slice(reconstruction[0]),
    }
