"""The SSL model: MONAI's Swin encoder plus rotation, contrastive and reconstruction heads.

Follows the SSLHead of Tang et al. 2022 (used by BrainSegFounder), so the state-dict keys
(``swinViT.*``, ``rotation_head.*``, ``contrastive_head.*``, ``conv.*``) match the public
checkpoints once a DDP ``module.`` prefix is stripped.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from monai.networks.nets.swin_unetr import MERGING_MODE, SwinTransformer
from monai.utils import ensure_tuple_rep, look_up_option
from torch import nn

from bsf.errors import ConfigError
from bsf.model.shapes import check_input_shape
from bsf.model.sizes import ModelSize, get_size

__all__ = ["SSLOutput", "SSLModel", "build_swin_encoder", "build_reconstruction_decoder"]

_SPATIAL_DIMS = 3
_PATCH_SIZE = 2


class SSLOutput(NamedTuple):
    """Outputs of :class:`SSLModel` for an input ``x: (B, C, D, H, W)``.

    Attributes:
        rotation_logits: ``(B, 4)`` logits of the rotation class k (k * 90 degrees).
        contrastive: ``(B, contrastive_dim)`` vector for the NT-Xent loss.
        reconstruction: ``(B, C, D, H, W)`` reconstruction of the uncorrupted view.
    """

    rotation_logits: torch.Tensor
    contrastive: torch.Tensor
    reconstruction: torch.Tensor


def build_swin_encoder(spec: ModelSize, in_channels: int, *, use_checkpoint: bool = False) -> SwinTransformer:
    """Build the Swin encoder exactly as ``SwinUNETR(use_v2=False)`` builds its ``swinViT``.

    The same arguments (and MONAI defaults for the rest) make the keys and shapes of this
    module identical to ``SwinUNETR(...).swinViT`` for the same size and ``in_channels``.
    """
    return SwinTransformer(
        in_chans=in_channels,
        embed_dim=spec.feature_size,
        window_size=ensure_tuple_rep(spec.window_size, _SPATIAL_DIMS),
        patch_size=ensure_tuple_rep(_PATCH_SIZE, _SPATIAL_DIMS),
        depths=spec.depths,
        num_heads=spec.num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        norm_layer=nn.LayerNorm,
        patch_norm=False,
        use_checkpoint=use_checkpoint,
        spatial_dims=_SPATIAL_DIMS,
        downsample=look_up_option("merging", MERGING_MODE),
        use_v2=False,
    )


def build_reconstruction_decoder(dim: int, out_channels: int) -> nn.Sequential:
    """Decoder from the bottleneck ``(B, dim, d, h, w)`` to ``(B, out_channels, 32d, 32h, 32w)``.

    Five blocks of [Conv3d 3x3x3, InstanceNorm3d, LeakyReLU, trilinear upsample x2] with
    channels dim -> dim/2 -> dim/4 -> dim/8 -> dim/16 -> dim/16, then a 1x1x1 Conv3d.
    Kept as one flat ``nn.Sequential`` so its keys (``conv.0``, ``conv.4``, ..., ``conv.20``)
    match Tang et al.'s SSLHead and the public BrainSegFounder checkpoints.
    """
    if dim % 16:
        raise ConfigError(f"bottleneck channels must be divisible by 16, got {dim}")
    widths = [dim, dim // 2, dim // 4, dim // 8, dim // 16, dim // 16]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        layers += [
            nn.Conv3d(c_in, c_out, kernel_size=3, stride=1, padding=1),
            nn.InstanceNorm3d(c_out),
            nn.LeakyReLU(),
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
        ]
    layers.append(nn.Conv3d(widths[-1], out_channels, kernel_size=1, stride=1))
    return nn.Sequential(*layers)


class SSLModel(nn.Module):
    """Swin encoder with the three SSL heads (rotation, contrastive, reconstruction).

    Args:
        size: a key of :data:`bsf.model.sizes.MODEL_SIZES`.
        in_channels: input modalities C.
        use_checkpoint: gradient checkpointing in the Swin blocks.
        contrastive_dim: length of the contrastive vector.

    Attributes:
        swinViT: MONAI ``SwinTransformer``, key-compatible with ``SwinUNETR.swinViT``.
        rotation_head: ``Linear(16 * feature_size, 4)`` on bottleneck token 0.
        contrastive_head: ``Linear(16 * feature_size, contrastive_dim)`` on bottleneck token 1.
        conv: reconstruction decoder (see :func:`build_reconstruction_decoder`).
    """

    def __init__(
        self,
        size: str,
        in_channels: int,
        *,
        use_checkpoint: bool = False,
        contrastive_dim: int = 512,
    ) -> None:
        super().__init__()
        spec = get_size(size)
        for name, value in (("in_channels", in_channels), ("contrastive_dim", contrastive_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self.size = size
        self.in_channels = in_channels
        dim = spec.bottleneck_channels
        self.swinViT = build_swin_encoder(spec, in_channels, use_checkpoint=use_checkpoint)
        self.rotation_head = nn.Linear(dim, 4)
        self.contrastive_head = nn.Linear(dim, contrastive_dim)
        self.conv = build_reconstruction_decoder(dim, in_channels)

    def forward(self, x: torch.Tensor) -> SSLOutput:
        """Run the encoder and the three heads.

        Args:
            x: ``(B, C, D, H, W)`` with ``C == in_channels``; D, H, W divisible by 32 and >= 64.

        Returns:
            :class:`SSLOutput` with ``(B, 4)``, ``(B, contrastive_dim)`` and ``(B, C, D, H, W)``.

        Raises:
            InputShapeError: (a ``ValueError`` and ``BSFError``) for a bad input shape.
        """
        check_input_shape(x.shape, self.in_channels)
        bottleneck = self.swinViT(x.contiguous(), normalize=True)[4]  # (B, 16fs, D/32, H/32, W/32)
        tokens = bottleneck.flatten(start_dim=2).transpose(1, 2)  # (B, N, 16fs)
        return SSLOutput(
            rotation_logits=self.rotation_head(tokens[:, 0]),
            contrastive=self.contrastive_head(tokens[:, 1]),
            reconstruction=self.conv(bottleneck),
        )
