"""SwinUNETR sizes (paper presets plus a CPU test size) and the segmentation model builder.

The paper's sizes differ only in the depth of encoder stage 3 (feature_size 48, patch 2,
window 7, heads (3, 6, 12, 24)). Parameter counts with 4 input and 3 output channels
(MONAI 1.6.1, ``use_v2=False``)::

    name   depths          SwinUNETR    encoder (swinViT)
    tiny   (2, 2, 2, 2)    62,191,941    8,063,154
    small  (2, 2, 6, 2)    64,076,853    9,948,066
    big    (2, 2, 18, 2)   69,731,589   15,602,802
"""

from __future__ import annotations

from dataclasses import dataclass

from monai.networks.nets import SwinUNETR
from torch import nn

from bsf.errors import ConfigError

__all__ = ["ModelSize", "MODEL_SIZES", "get_size", "build_swin_unetr", "count_parameters"]


@dataclass(frozen=True)
class ModelSize:
    """Architecture of one SwinUNETR size.

    Attributes:
        feature_size: channels after patch embedding; the bottleneck has ``16 * feature_size``.
            Must be divisible by 12 (MONAI).
        depths: number of Swin blocks in each of the 4 encoder stages.
        num_heads: attention heads in each of the 4 encoder stages.
        window_size: local attention window (cubic).
    """

    feature_size: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7

    @property
    def bottleneck_channels(self) -> int:
        """Channels of the encoder's last feature map (``16 * feature_size``)."""
        return 16 * self.feature_size


MODEL_SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(feature_size=48, depths=(2, 2, 2, 2)),
    "small": ModelSize(feature_size=48, depths=(2, 2, 6, 2)),
    "big": ModelSize(feature_size=48, depths=(2, 2, 18, 2)),
    # CPU test size: window 4 is about 10x faster than 7 at 64^3 on CPU. Not a paper size.
    "test": ModelSize(feature_size=12, depths=(2, 2, 2, 2), window_size=4),
}


def get_size(name: str) -> ModelSize:
    """Return the :class:`ModelSize` called ``name``.

    Raises:
        ConfigError: ``name`` is not one of :data:`MODEL_SIZES`; the message lists the valid names.
    """
    try:
        return MODEL_SIZES[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(MODEL_SIZES))
        raise ConfigError(f"unknown model size {name!r}; valid sizes: {valid}") from None


def _check_channels(**channels: int) -> None:
    for name, value in channels.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def build_swin_unetr(
    size: str,
    in_channels: int,
    out_channels: int,
    *,
    dropout: float = 0.0,
    use_checkpoint: bool = False,
) -> SwinUNETR:
    """Build MONAI's SwinUNETR (``use_v2=False``) for a named size.

    Args:
        size: a key of :data:`MODEL_SIZES`.
        in_channels: input modalities C of ``x: (B, C, D, H, W)``.
        out_channels: output channels K of the logits ``(B, K, D, H, W)``.
        dropout: MONAI's ``drop_rate`` (dropout in the Swin blocks), in [0, 1].
        use_checkpoint: gradient checkpointing in the Swin blocks (less memory, slower).

    Returns:
        The model; its encoder is ``model.swinViT`` (state-dict keys ``swinViT.*``).

    Raises:
        ConfigError: unknown size, non-positive channel counts or dropout outside [0, 1].
    """
    spec = get_size(size)
    _check_channels(in_channels=in_channels, out_channels=out_channels)
    if not 0.0 <= float(dropout) <= 1.0:
        raise ConfigError(f"dropout must be in [0, 1], got {dropout!r}")
    return SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=spec.feature_size,
        depths=spec.depths,
        num_heads=spec.num_heads,
        window_size=spec.window_size,
        drop_rate=float(dropout),
        use_checkpoint=use_checkpoint,
        spatial_dims=3,
        use_v2=False,
    )


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements in ``module`` (works on the meta device too).

    Args:
        module: any torch module.
        trainable_only: count only parameters with ``requires_grad``.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
