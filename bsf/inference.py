"""The one inference path of a fine-tuned (Stage 3) segmentation model: the network a config describes, and
whole-volume sliding-window inference with the config's windows.

Used by validation during training (:class:`bsf.engine.segmentation.SegmentationTask`), ``bsf predict`` and
``bsf evaluate`` (:mod:`bsf.predict`, :mod:`bsf.evaluate`), the chain report's overlay
(:func:`bsf.evaluate.predict_validation_case`) and the MONAI bundle's ``inference.json`` (:mod:`bsf.bundle`
writes the same :class:`WindowSettings`), so a change of windows, blending or threshold reaches all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.inferers import sliding_window_inference
from torch import nn

from bsf.config import RunConfig
from bsf.model import build_swin_unetr

__all__ = ["BLEND_MODE", "WindowSettings", "build_network", "segment", "sliding_window_probabilities"]

#: how overlapping windows are blended (MONAI ``sliding_window_inference(mode=...)``)
BLEND_MODE = "gaussian"


@dataclass(frozen=True)
class WindowSettings:
    """Sliding windows of a config: ``data.roi``, ``finetune.sw_batch_size``, ``finetune.sw_overlap``,
    :data:`BLEND_MODE`, and the sigmoid-probability threshold ``finetune.threshold``."""

    roi: tuple[int, int, int]
    sw_batch_size: int
    overlap: float
    threshold: float
    mode: str = BLEND_MODE

    @classmethod
    def from_config(cls, config: RunConfig) -> "WindowSettings":
        f = config.finetune
        return cls(tuple(int(v) for v in config.data.roi), int(f.sw_batch_size), float(f.sw_overlap), float(f.threshold))


def build_network(config: RunConfig, *, use_checkpoint: bool = False) -> nn.Module:
    """The bare SwinUNETR of a fine-tuning config (``model.size``, channels, dropout); nothing is loaded into it.

    ``use_checkpoint`` (gradient checkpointing) only matters for training; it does not change the weights' keys,
    shapes or initial values, nor any output.
    """
    m = config.model
    return build_swin_unetr(m.size, m.in_channels, m.out_channels, dropout=m.dropout, use_checkpoint=use_checkpoint)


def sliding_window_probabilities(model: nn.Module, image: torch.Tensor, config: RunConfig, *, progress: bool = False) -> torch.Tensor:
    """Whole volumes ``image`` (N, C, X, Y, Z) -> sigmoid probabilities (N, K, X, Y, Z), without gradients.

    Windows of ``data.roi`` (each side of ``image`` must be at least the ROI side; the preprocessing pads to it),
    ``finetune.sw_batch_size`` windows per forward pass, ``finetune.sw_overlap`` overlap, Gaussian blending.
    """
    s = WindowSettings.from_config(config)
    with torch.no_grad():
        logits = sliding_window_inference(image, list(s.roi), s.sw_batch_size, model, overlap=s.overlap, mode=s.mode, progress=progress)
    return torch.sigmoid(logits)


def segment(model: nn.Module, image: torch.Tensor, config: RunConfig, *, progress: bool = False) -> torch.Tensor:
    """Whole volumes ``image`` (N, C, X, Y, Z) -> binary regions (N, K, X, Y, Z), bool: probability > ``finetune.threshold``."""
    return sliding_window_probabilities(model, image, config, progress=progress) > config.finetune.threshold
