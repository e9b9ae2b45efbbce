"""What a checkpoint says about itself: the modality of each input channel, the kind of stage and the data set
that trained it, so that the next stage adapts its channels without being told.

An exported encoder carries it under :data:`META_KEY`::

    {"state_dict": {"swinViT.*": tensor}, "bsf_model": {"modalities": ["t1", "flair"], "kind": "ssl", "dataset": "ukb"}}

Training checkpoints and task models carry their whole run config instead (``"config"``), and a federated global
model has its job's run config beside it (:func:`bsf.engine.stage_model.describe_checkpoint` reads all three).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from bsf.errors import CheckpointError

#: the key of a checkpoint's description, next to its ``state_dict`` / ``model``
META_KEY = "bsf_model"
KINDS = ("ssl", "finetune")


@dataclass(frozen=True)
class ModelDescription:
    """The input channels of a model by modality name, its stage kind (``ssl``/``finetune``) and data set."""

    modalities: tuple[str, ...]
    kind: str
    dataset: str

    def to_dict(self) -> dict[str, Any]:
        return {"modalities": list(self.modalities), "kind": self.kind, "dataset": self.dataset}

    def summary(self) -> str:
        """``ssl on ukb, channels t1, flair``."""
        return f"{self.kind} on {self.dataset}, channels {', '.join(self.modalities)}"


def read_description(checkpoint: Mapping[str, Any], origin: str) -> ModelDescription | None:
    """The :data:`META_KEY` description of a loaded checkpoint (``None``: it carries none).

    Raises :class:`CheckpointError` naming ``origin`` for a description that is not one (wrong types, empty
    modalities, unknown kind): a damaged description is refused rather than guessed around.
    """
    meta = checkpoint.get(META_KEY) if isinstance(checkpoint, Mapping) else None
    if meta is None:
        return None
    modalities = meta.get("modalities") if isinstance(meta, Mapping) else None
    kind = meta.get("kind") if isinstance(meta, Mapping) else None
    dataset = meta.get("dataset") if isinstance(meta, Mapping) else None
    if not (isinstance(modalities, list) and modalities and all(isinstance(m, str) and m for m in modalities)):
        raise CheckpointError(f"{origin}: its {META_KEY}.modalities must be a non-empty list of names, got {modalities!r}")
    if kind not in KINDS or not isinstance(dataset, str) or not dataset:
        raise CheckpointError(f"{origin}: its {META_KEY} needs kind (one of {', '.join(KINDS)}) and dataset, got {dict(meta)!r}")
    return ModelDescription(tuple(modalities), kind, dataset)
