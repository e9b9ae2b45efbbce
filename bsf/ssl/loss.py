"""The SSL loss: rotation cross-entropy + NT-Xent contrastive + L1 reconstruction."""

from __future__ import annotations

from typing import Sequence

import torch
from monai.losses import ContrastiveLoss
from torch import Tensor, nn


class SSLLoss(nn.Module):
    """Weighted sum of the three SSL losses of Tang et al. 2022.

    The contrastive part is NT-Xent (SimCLR): cosine similarity divided by the temperature, the
    positive of view-1 vector i is view-2 vector i (and back), the negatives are the other 2B - 2
    vectors; the denominator runs over all 2B - 1 other vectors. ``monai.losses.ContrastiveLoss``
    computes exactly this, averaged over the 2B vectors.

    ``scored_channels``: the reconstruction's input channels that count (a modality-aware model at a site
    holding only some of its modalities: the held ones; the absent ones are empty in input and target, and
    scoring them would reward the decoder for reproducing zeros). The L1 is then the mean over those channels'
    voxels only. ``None``: every channel.
    """

    def __init__(
        self,
        rotation_weight: float = 1.0,
        contrastive_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        temperature: float = 0.5,
        scored_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if scored_channels is not None and not list(scored_channels):
            raise ValueError("scored_channels must name at least one channel (None: all)")
        self.scored_channels = None if scored_channels is None else list(scored_channels)
        self.weights = {
            "rotation": rotation_weight,
            "contrastive": contrastive_weight,
            "reconstruction": reconstruction_weight,
        }
        self.rotation_loss = nn.CrossEntropyLoss()
        self.contrastive_loss = ContrastiveLoss(temperature=temperature)
        self.reconstruction_loss = nn.L1Loss()

    def forward(
        self,
        rotation_logits: Tensor,
        rotation_labels: Tensor,
        contrastive: Tensor,
        reconstruction: Tensor,
        target: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the total loss and its unweighted parts.

        Args:
            rotation_logits: (2B, 4).
            rotation_labels: (2B,) long in 0..3.
            contrastive: (2B, E), first B rows view 1, last B rows view 2 of the same crops.
            reconstruction: (2B, C, D, H, W).
            target: (2B, C, D, H, W), the uncorrupted rotated views.

        Returns:
            The scalar weighted total and {"rotation", "contrastive", "reconstruction"} scalars.
        """
        if contrastive.ndim != 2 or contrastive.shape[0] % 2:
            raise ValueError(f"contrastive must be (2B, E), got {tuple(contrastive.shape)}")
        half = contrastive.shape[0] // 2
        parts = {
            "rotation": self.rotation_loss(rotation_logits, rotation_labels),
            "contrastive": self.contrastive_loss(contrastive[:half], contrastive[half:]),
            "reconstruction": self._reconstruction(reconstruction, target),
        }
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, parts

    def _reconstruction(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        """Mean L1 over the scored channels of ``(2B, C, D, H, W)`` (all when ``scored_channels`` is None)."""
        if self.scored_channels is None:
            return self.reconstruction_loss(reconstruction, target)
        index = torch.tensor(self.scored_channels, device=reconstruction.device)
        return self.reconstruction_loss(reconstruction.index_select(1, index), target.index_select(1, index))
