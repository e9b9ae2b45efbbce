"""What a training step computes for each stage. The engine is generic; a task knows its model and loss."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from bsf.config import RunConfig
from bsf.model import SSLModel
from bsf.ssl import CorruptionConfig, SSLLoss, make_ssl_views


class Task(Protocol):
    #: name of the validation metric that selects the best checkpoint, and whether lower is better
    best_metric: str
    lower_is_better: bool

    def build_model(self) -> nn.Module: ...

    def loss(self, model: nn.Module, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def validate(self, model: nn.Module, images: torch.Tensor, generator: torch.Generator) -> dict[str, float]: ...


class SSLTask:
    """Stage 1/2 self-supervision: two rotated, corrupted views per crop -> rotation CE + NT-Xent + L1."""

    best_metric = "val_reconstruction_l1"
    lower_is_better = True

    def __init__(self, config: RunConfig):
        self.config = config
        self.corruption = CorruptionConfig(
            max_box_fraction=config.ssl.max_box_fraction,
            max_corrupted_fraction=config.ssl.max_corrupted_fraction,
        )
        self.criterion = SSLLoss(
            rotation_weight=config.ssl.rotation_weight,
            contrastive_weight=config.ssl.contrastive_weight,
            reconstruction_weight=config.ssl.reconstruction_weight,
            temperature=config.ssl.temperature,
        )

    def build_model(self) -> nn.Module:
        return SSLModel(self.config.model.size, self.config.model.in_channels, use_checkpoint=self.config.model.use_checkpoint)

    def loss(self, model: nn.Module, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``images``: (N, C, *roi) crops -> total loss and its unweighted parts."""
        views = make_ssl_views(images, generator, self.corruption)
        out = model(views.inputs)
        return self.criterion(out.rotation_logits, views.rotation_labels, out.contrastive, out.reconstruction, views.targets)

    @torch.no_grad()
    def validate(self, model: nn.Module, images: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        """``images``: (N, C, *roi) validation crops -> ``val_loss`` and ``val_<part>`` (reconstruction L1 selects the best)."""
        total, parts = self.loss(model, images, generator)
        metrics = {"val_loss": float(total)}
        metrics.update({f"val_{name}": float(value) for name, value in parts.items()})
        metrics["val_reconstruction_l1"] = metrics.pop("val_reconstruction")
        return metrics


def build_task(config: RunConfig) -> Task:
    tasks = {"ssl": SSLTask}
    return tasks[config.stage](config)
