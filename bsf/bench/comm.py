"""What a federated round sends, and whether float16 weight differences cost convergence.

Bytes per round per site = the global part down (float32) + the site's update up (float32 or
float16), for encoder-only (``swinViT.*``, Stages 1/2 aggregate this) vs the whole model, for every
model size; NVFlare's message overhead is not included. Counted are state-dict *elements* as the site
code sends them (every entry as float32), which since issue 14 leaves out the Swin blocks' constant
``relative_position_index`` buffers (:mod:`bsf.federation.payload`); ``*_with_buffers`` columns give the
rounds as they were before, with them.

Convergence: a 2-site FedAvg on the synthetic benchmark data through the real site code
(:class:`bsf.federation.site_trainer.SiteTrainer` around an :class:`bsf.engine.Engine`, weight differences of the
encoder, step-weighted :class:`bsf.fl.aggregation.WeightedMean`), once with float32 and once with
float16 differences, same seeds. Reported: each round's mean training loss for both, the largest
loss difference, and the final global encoders' relative difference ||a - b|| / ||a||.
"""

from __future__ import annotations

import numpy as np
import torch

from bsf.bench.harness import Options
from bsf.bench.synthetic import stage1_config
from bsf.config import FederationConfig
from bsf.engine import Engine
from bsf.errors import BSFError
from bsf.fl.aggregation import WeightedMean, check_update
from bsf.federation.payload import exchanged
from bsf.federation.site_trainer import SiteTrainer
from bsf.model import MODEL_SIZES, SSLModel, build_swin_unetr

SITES = 2


def _bytes(state: dict[str, torch.Tensor], prefix: str = "") -> int:
    """float32 bytes of the keys starting with ``prefix``."""
    return 4 * sum(v.numel() for k, v in state.items() if k.startswith(prefix))


def payload_rows() -> list[dict]:
    """Per size: state-dict elements and bytes per round per site, SSL model (Stages 1/2) and SwinUNETR (Stage 3),
    as sent (constant buffers left out) and as sent before issue 14 (``*_with_buffers``)."""
    rows = []
    for size in MODEL_SIZES:
        ssl_all, seg_all = SSLModel(size, 2).state_dict(), build_swin_unetr(size, 4, 3).state_dict()
        ssl, seg = exchanged(ssl_all), exchanged(seg_all)
        encoder, encoder_all = _bytes(ssl, "swinViT."), _bytes(ssl_all, "swinViT.")
        rows.append({
            "size": size, "encoder_elements": encoder // 4, "constant_buffer_elements": (encoder_all - encoder) // 4,
            "ssl_model_elements": _bytes(ssl) // 4, "swin_unetr_elements": _bytes(seg) // 4,
            "round_bytes": {
                "encoder_f32": 2 * encoder, "encoder_f32_down_f16_up": encoder + encoder // 2,
                "ssl_model_f32": 2 * _bytes(ssl), "swin_unetr_f32": 2 * _bytes(seg),
                "swin_unetr_f32_down_f16_up": _bytes(seg) + _bytes(seg) // 2,
                "encoder_f32_with_buffers": 2 * encoder_all, "swin_unetr_f32_with_buffers": 2 * _bytes(seg_all),
            },
        })
    return rows


def fedavg(opts: Options, transfer_dtype: str, rounds: int) -> tuple[list[float], dict[str, np.ndarray]]:
    """``rounds`` of 2-site FedAvg on encoder differences; per-round mean training loss and the final global encoder."""
    settings = FederationConfig(local_steps=opts.size.fl_local_steps, scope="encoder", transfer="diff",
                          transfer_dtype=transfer_dtype, validate_global=False, resume=False)
    sites = [SiteTrainer(Engine(stage1_config(opts, f"seed={opts.seed + i}")), settings, site=f"site-{i + 1}")
             for i in range(SITES)]
    global_weights = exchanged(sites[0].engine.get_weights("encoder"))  # what the server sends
    shapes = {k: v.shape for k, v in global_weights.items()}
    losses = []
    for current_round in range(rounds):
        mean, round_losses = WeightedMean(), []
        for site in sites:
            result = site.train(global_weights, current_round)
            problems = check_update(result.params, shapes)
            if problems:
                raise BSFError(f"{site.site}: unusable update: {'; '.join(problems)}")
            mean.add(result.params, result.meta["NUM_STEPS_CURRENT_ROUND"], site.site)
            round_losses.append(result.metrics["train_loss"])
        global_weights = {k: global_weights[k] + v for k, v in mean.result().items()}
        losses.append(float(np.mean(round_losses)))
    return losses, global_weights


def run(opts: Options) -> dict:
    rows = payload_rows()
    small = next(r for r in rows if r["size"] == "small")["round_bytes"]
    summary = [f"Small, bytes per round per site: encoder f32 {small['encoder_f32'] / 1e6:.1f} MB (with the constant"
               f" buffers {small['encoder_f32_with_buffers'] / 1e6:.1f} MB), encoder f32 down + f16 up"
               f" {small['encoder_f32_down_f16_up'] / 1e6:.1f} MB, whole SwinUNETR f32 {small['swin_unetr_f32'] / 1e6:.1f} MB"
               f" (with the buffers {small['swin_unetr_f32_with_buffers'] / 1e6:.1f} MB)"]
    result: dict = {"config": {"sites": SITES, "rounds": opts.size.fl_rounds, "local_steps": opts.size.fl_local_steps},
                    "payload": rows, "summary": summary}
    if opts.size.fl_rounds:
        f32, g32 = fedavg(opts, "float32", opts.size.fl_rounds)
        f16, g16 = fedavg(opts, "float16", opts.size.fl_rounds)
        num = sum(float(np.sum((g32[k] - g16[k]) ** 2)) for k in g32)
        den = sum(float(np.sum(g32[k] ** 2)) for k in g32)
        result["convergence"] = {
            "round_loss_float32": f32, "round_loss_float16": f16,
            "max_abs_round_loss_diff": max(abs(a - b) for a, b in zip(f32, f16)),
            "final_encoder_relative_diff": (num / den) ** 0.5,
        }
        c = result["convergence"]
        summary.append(f"FedAvg {SITES} sites x {opts.size.fl_rounds} rounds x {opts.size.fl_local_steps} steps: round losses"
                       f" f32 {', '.join(f'{x:.4f}' for x in f32)} vs f16 diffs {', '.join(f'{x:.4f}' for x in f16)};"
                       f" max |diff| {c['max_abs_round_loss_diff']:.2g}, final encoder relative diff {c['final_encoder_relative_diff']:.2g}")
    return result
