"""What every stage's model shares: its input channels by modality name, what a checkpoint says of its own channels,
and the previous stage's encoder loaded into it."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from bsf.config import RunConfig, load_config
from bsf.data.transforms import held_modalities
from bsf.errors import BSFError, CheckpointError
from bsf.federation.run_folders import run_config_beside
from bsf.model.checkpoint import read_checkpoint
from bsf.model.pretrained import load_pretrained_encoder
from bsf.model.provenance import ModelDescription, read_description

log = logging.getLogger(__name__)


def input_modalities(config: RunConfig) -> list[str]:
    """The model's input channels by modality name: ``model.modalities`` (a modality-aware model), else
    ``data.modalities`` or the data set's full set."""
    return list(config.model.modalities) or held_modalities(config.data)


def describe_config(config: RunConfig) -> ModelDescription:
    """The description of the model ``config`` trains (its channels, stage kind and data set)."""
    return ModelDescription(tuple(input_modalities(config)), config.stage, config.data.dataset)


def describe_checkpoint(path: str | os.PathLike, checkpoint: Mapping[str, Any] | None = None) -> tuple[ModelDescription | None, str]:
    """What the checkpoint at ``path`` says of itself, and where that was read (``None, ""``: nothing).

    First match wins: its own description (an exported encoder), its ``config`` (a training checkpoint, a task
    model), the run config beside it (``config/bsf_run.yaml`` next to a federated global model). ``checkpoint``:
    the file already loaded (saves reading it twice). A config that no longer loads is passed over with a warning.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path) if checkpoint is None else checkpoint
    if not isinstance(checkpoint, Mapping):
        return None, ""
    own = read_description(checkpoint, f"checkpoint {path}")
    if own is not None:
        return own, f"checkpoint {path}"
    sources = [(checkpoint.get("config"), f"the run config inside {path}")] if isinstance(checkpoint.get("config"), Mapping) else []
    beside = run_config_beside(path)
    if beside.is_file():
        sources.append((beside, f"the run config {beside}"))
    for source, where in sources:
        try:
            return describe_config(load_config(source)), where
        except BSFError as exc:
            log.warning("%s: cannot tell the model's channels from it (%s)", where, exc)
    return None, ""


def pretrained_modalities(config: RunConfig, checkpoint: Mapping[str, Any] | None = None) -> list[str]:
    """The modality of each input channel of ``model.pretrained`` (``checkpoint``: that file as already read): what
    the checkpoint says of itself, else ``model.pretrained_modalities``. A checkpoint that disagrees with a
    configured value wins, with a log line."""
    configured = list(config.model.pretrained_modalities)
    description, where = describe_checkpoint(config.model.pretrained, checkpoint)
    if description is None:
        return configured
    if list(description.modalities) != configured:
        log.info("model.pretrained %s: channels %s from %s (not model.pretrained_modalities %s)",
                 config.model.pretrained, list(description.modalities), where, configured)
    return list(description.modalities)


def load_pretrained_if_configured(model: nn.Module, config: RunConfig) -> None:
    """Load ``model.pretrained``'s encoder into ``model``, adapting channels by modality name (seeded)."""
    path = config.model.pretrained
    if path:
        if not Path(path).is_file():
            raise CheckpointError(f"pretrained encoder {path}: no such file (set model.pretrained to the previous stage's model)")
        checkpoint = read_checkpoint(path, "pretrained encoder")  # read once: its description and its weights
        load_pretrained_encoder(model, path, pretrained_modalities(config, checkpoint), input_modalities(config),
                                seed=config.seed, loaded=checkpoint)
