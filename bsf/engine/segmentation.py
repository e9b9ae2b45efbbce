"""Stage 3: fine-tune a SwinUNETR (pretrained encoder + new decoder) on BraTS tumours or ATLAS stroke lesions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss, DiceLoss
from monai.transforms import Compose, MapTransform
from torch import nn

from bsf.config import RunConfig
from bsf.data.labels import check_label_values, label_rule
from bsf.data.pipeline import validation_volumes
from bsf.data.transforms import random_transforms
from bsf.engine.stage_model import input_modalities, load_pretrained_if_configured
from bsf.inference import build_network, segment
from bsf.metrics import BRATS_REGIONS, brats_dice, brats_regions, dice_score

log = logging.getLogger(__name__)


class LabelsToRegionsd(MapTransform):
    """BraTS label map (1, X, Y, Z) -> overlapping regions (3, X, Y, Z) TC, WT, ET; ATLAS mask -> (1, X, Y, Z) {0, 1}.

    Each map is checked on its own by the one label rule (:func:`bsf.data.labels.label_rule` from the data set, the
    file's name and ``label_format``, the run config's ``finetune.label_format``): values it does not allow raise
    :class:`DataError` naming that file and the setting that would accept them. A BraTS map that may use either
    convention takes 3 as enhancing tumour when it holds 3 (with a warning), else 4.
    """

    def __init__(self, dataset: str, label_format: str = "auto", keys: Hashable = "label"):
        super().__init__(keys)
        self.dataset, self.label_format = dataset, label_format

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            label = np.asarray(out[key])
            values = set(np.unique(label).astype(int).tolist())
            source = getattr(out[key], "meta", {}).get("filename_or_obj", key)
            rule = label_rule(self.dataset, Path(str(source)).name, label_format=self.label_format)
            check_label_values(values, rule, source)
            if self.dataset == "atlas":
                out[key] = _like(out[key], torch.as_tensor(label > 0, dtype=torch.float32).reshape(1, *label.shape[-3:]))
                continue
            et = rule.et_label(values)
            if et == 3 and 4 in (rule.allowed or ()):
                log.warning("%s: labels %s look like BraTS 2023+ (enhancing tumour = 3); scoring ET as 3", source, sorted(values))
            regions = brats_regions(label.reshape(label.shape[-3:]), et_label=et)
            out[key] = _like(out[key], torch.as_tensor(regions, dtype=torch.float32))
        return out


def set_output_prior(model: nn.Module, prior: float | None) -> None:
    """Set the SwinUNETR output layer's bias to ``logit(prior)``, so every voxel starts with foreground probability ``prior``.

    Lesions fill about 1 % of a crop. From PyTorch's default init (probability near 0.5 everywhere) Dice loss
    must first pull ~99 % of the voxels down, one AdamW step of size ``lr`` at a time; from the prior it learns
    the lesion from the first steps (measured in tests/test_finetune.py). ``None`` keeps the default init.
    """
    if prior is None:
        return
    with torch.no_grad():
        model.out.conv.conv.bias.fill_(float(np.log(prior / (1.0 - prior))))


def _like(original: Any, converted: torch.Tensor) -> torch.Tensor:
    """``converted`` carrying ``original``'s affine and metadata when it is a MONAI MetaTensor."""
    if isinstance(original, MetaTensor):
        return MetaTensor(converted, meta=original.meta)
    return converted


class SegmentationTask:
    """Dice loss on sigmoid outputs; validation by sliding-window inference on whole volumes."""

    best_metric = "val_dice_mean"
    lower_is_better = False

    def __init__(self, config: RunConfig):
        self.config = config
        self.dataset = config.data.dataset
        if config.finetune.loss == "dice_ce":
            self.criterion = DiceCELoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5)
        else:
            self.criterion = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5)
        self.label_transform = LabelsToRegionsd(self.dataset, label_format=config.finetune.label_format)
        self.region_names = list(BRATS_REGIONS) if self.dataset == "brats" else ["lesion"]

    def build_model(self) -> nn.Module:
        model = build_network(self.config, use_checkpoint=self.config.model.use_checkpoint)
        set_output_prior(model, self.config.finetune.output_prior)
        load_pretrained_if_configured(model, self.config)
        if self.config.finetune.freeze_encoder:
            for parameter in model.swinViT.parameters():
                parameter.requires_grad_(False)
        return model

    def parameter_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Encoder and decoder as two AdamW groups; the encoder's lr is scaled by ``finetune.encoder_lr_scale``."""
        lr = self.config.optim.lr
        encoder = [p for n, p in model.named_parameters() if n.startswith("swinViT.") and p.requires_grad]
        decoder = [p for n, p in model.named_parameters() if not n.startswith("swinViT.") and p.requires_grad]
        groups = [{"params": decoder, "lr": lr}]
        if encoder:
            groups.append({"params": encoder, "lr": lr * self.config.finetune.encoder_lr_scale})
        return groups

    def random_transforms(self) -> Compose:
        """Crops of ``data.roi`` (``data.transforms.crop``: random, or centred on lesion voxels) and the
        ``data.transforms.augment`` flips, rotations and intensity jitter, on image and label."""
        return random_transforms(self.config.data, with_label=True, channels=input_modalities(self.config))

    def loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``batch["image"]`` (N, C, *roi), ``batch["label"]`` (N, K, *roi) -> Dice loss.

        Nothing here draws from ``generator``: the network's dropout (``model.dropout``) draws from torch's global
        generator, which the engine seeds for each micro-batch from ``(seed, step, micro-batch)``, so a step's dropout
        masks are the same whatever ran before it in the process (a federated site's rounds, a resumed run).
        """
        loss = self.criterion(model(batch["image"]), batch["label"])
        return loss, {"dice_loss": loss.detach()}

    def validation_items(self, cases: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """Whole preprocessed volumes: ``{"image": (C, X, Y, Z), "label": (K, X, Y, Z)}`` per validation case."""
        return validation_volumes(cases, self.config.data, self.label_transform, input_modalities(self.config))

    @torch.no_grad()
    def validate(self, model: nn.Module, items: list[Mapping[str, torch.Tensor]], generator: torch.Generator, device: torch.device) -> dict[str, float]:
        """Whole-volume sliding-window inference (overlap ``finetune.sw_overlap``), threshold, Dice per region and mean."""
        per_case = [self._case_dice(model, item, device) for item in items]
        return {f"val_dice_{name}": float(np.mean([d[name] for d in per_case])) for name in per_case[0]}

    def _case_dice(self, model: nn.Module, item: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, float]:
        prediction, truth = self.segment(model, item, device)
        return self.dice(prediction, truth)

    def segment(self, model: nn.Module, item: Mapping[str, torch.Tensor], device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """A validation item -> thresholded prediction (:func:`bsf.inference.segment`) and truth, boolean (K, X, Y, Z) each."""
        prediction = segment(model, item["image"].unsqueeze(0).to(device), self.config)[0]
        return prediction.cpu().numpy(), item["label"].numpy() > 0.5

    def dice(self, prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        """Dice per region (``tc``, ``wt``, ``et`` or ``lesion``) and ``mean``."""
        if self.dataset == "brats":
            return {name.lower(): value for name, value in brats_dice(prediction, truth).items()}
        dice = dice_score(prediction[0], truth[0])
        return {"lesion": dice, "mean": dice}
