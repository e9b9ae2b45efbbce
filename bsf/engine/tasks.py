"""What a training step computes for each stage. The engine is generic; a task knows its model, data and loss."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Protocol

import torch
from monai.transforms import Compose, Transform
from torch import nn

from bsf.config import RunConfig
from bsf.data.pipeline import validation_crops
from bsf.data.transforms import model_channels, random_transforms
from bsf.engine.segmentation import SegmentationTask
from bsf.engine.stage_model import input_modalities, load_pretrained_if_configured
from bsf.model import SSLModel
from bsf.ssl import CorruptionConfig, SSLLoss, make_ssl_views

log = logging.getLogger(__name__)


class Task(Protocol):
    #: name of the validation metric that selects the best checkpoint, and whether lower is better
    best_metric: str
    lower_is_better: bool
    #: converts a case's label right after loading (None: the task uses images only)
    label_transform: Transform | None

    def build_model(self) -> nn.Module: ...

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]: ...

    def random_transforms(self) -> Compose: ...

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def validation_items(self, cases: list[dict[str, Any]]) -> list[Any]: ...

    def validate(self, model: nn.Module, items: list[Any], generator: torch.Generator, device: torch.device) -> dict[str, float]: ...


class SSLTask:
    """Stage 1/2 self-supervision: two rotated, corrupted views per crop -> rotation CE + NT-Xent + L1."""

    best_metric = "val_reconstruction_l1"
    lower_is_better = True
    label_transform = None

    def __init__(self, config: RunConfig):
        self.config = config
        self.corruption = CorruptionConfig(
            max_box_fraction=config.ssl.max_box_fraction,
            max_drop_fraction=config.ssl.max_drop_fraction,
            noise_range=config.ssl.noise_range,
        )
        #: a modality-aware model at a site holding some of its modalities: the channels its data fills (else None)
        self.held = _held_channels(config)
        self.criterion = SSLLoss(
            rotation_weight=config.ssl.rotation_weight,
            contrastive_weight=config.ssl.contrastive_weight,
            reconstruction_weight=config.ssl.reconstruction_weight,
            temperature=config.ssl.temperature,
            scored_channels=self.held,
        )

    def build_model(self) -> nn.Module:
        model = SSLModel(self.config.model.size, self.config.model.in_channels, use_checkpoint=self.config.model.use_checkpoint)
        load_pretrained_if_configured(model, self.config)
        return model

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": list(model.parameters())}]

    def random_transforms(self) -> Compose:
        """``data.crops_per_volume`` crops of ``data.roi`` per volume (``data.transforms.crop``), no augmentation."""
        return random_transforms(self.config.data, with_label=False, channels=input_modalities(self.config))

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``batch["image"]``: (N, C, *roi) crops -> total loss and its unweighted parts.

        With a modality-aware model the channels the site does not hold stay empty in the corrupted views too (the
        noise boxes span all channels), as they are at prediction; the reconstruction scores the held ones only.
        """
        views = make_ssl_views(batch["image"], generator, self.corruption)
        if self.held is not None:
            absent = [c for c in range(views.inputs.shape[1]) if c not in self.held]
            views.inputs[:, absent] = 0
        out = model(views.inputs)
        return self.criterion(out.rotation_logits, views.rotation_labels, out.contrastive, out.reconstruction, views.targets)

    def validation_items(self, cases: list[dict[str, Any]]) -> list[torch.Tensor]:
        """One centre crop (C, *roi) per validation case."""
        return validation_crops(cases, self.config.data, input_modalities(self.config))

    @torch.no_grad()
    def validate(self, model: nn.Module, items: list[torch.Tensor], generator: torch.Generator, device: torch.device) -> dict[str, float]:
        """Loss parts on the crops in batches (fixed corruption seed), averaged; reconstruction L1 selects the best.

        ``val_contrastive`` is left out when a batch holds a single crop (NT-Xent has no negatives then).
        """
        per_batch = max(2, self.config.data.batch_size * self.config.data.crops_per_volume)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for first in range(0, len(items), per_batch):
            chunk = items[first : first + per_batch]
            total, parts = self.loss(model, {"image": torch.stack(chunk).to(device)}, generator)
            metrics = {"val_loss": float(total), "val_rotation": float(parts["rotation"]), "val_reconstruction_l1": float(parts["reconstruction"])}
            if len(chunk) > 1:
                metrics["val_contrastive"] = float(parts["contrastive"])
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value * len(chunk)
                counts[name] = counts.get(name, 0) + len(chunk)
        return {name: sums[name] / counts[name] for name in sums}


def _held_channels(config: RunConfig) -> list[int] | None:
    """The model channels this site's data fills (a modality-aware model), in order; None: it fills them all."""
    layout = model_channels(config.data, config.model.modalities)
    return None if layout is None or not layout.missing() else sorted(layout.index)


def build_task(config: RunConfig) -> Task:
    tasks = {"ssl": SSLTask, "finetune": SegmentationTask}
    return tasks[config.stage](config)
