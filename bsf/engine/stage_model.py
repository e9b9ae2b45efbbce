"""What every stage's model shares: its input channels by modality name, and the previous stage's encoder loaded into it."""

from __future__ import annotations

from torch import nn

from bsf.config import RunConfig
from bsf.data.transforms import held_modalities
from bsf.model.pretrained import load_pretrained_encoder


def input_modalities(config: RunConfig) -> list[str]:
    """The model's input channels by modality name: ``model.modalities`` (a modality-aware model), else
    ``data.modalities`` or the data set's full set."""
    return list(config.model.modalities) or held_modalities(config.data)


def load_pretrained_if_configured(model: nn.Module, config: RunConfig) -> None:
    """Load ``model.pretrained``'s encoder into ``model``, adapting channels by modality name (seeded)."""
    if config.model.pretrained:
        load_pretrained_encoder(model, config.model.pretrained, config.model.pretrained_modalities, input_modalities(config), seed=config.seed)
