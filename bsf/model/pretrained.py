"""Start a model from a previous stage's encoder: read any layout, adapt channels by modality name, import strictly."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from bsf.errors import CheckpointError, ConfigError
from bsf.model.adapt import adapt_input_channels
from bsf.model.checkpoint import ImportReport, import_weights, normalize_checkpoint_keys, select_weights

log = logging.getLogger(__name__)


def load_pretrained_encoder(
    model: nn.Module,
    checkpoint: str | Path,
    source_modalities: Sequence[str],
    target_modalities: Sequence[str],
    *,
    seed: int = 0,
    loaded: Mapping[str, Any] | None = None,
) -> ImportReport:
    """Load the ``swinViT.*`` weights of ``checkpoint`` into ``model`` (``loaded``: the file as already read).

    The patch embedding is adapted from ``source_modalities`` (the previous stage's input
    channels, e.g. ``("t1", "flair")``) to ``target_modalities`` (this model's, e.g. BraTS
    ``("flair", "t1ce", "t1", "t2")``): pretrained filters are kept by name, new channels are
    Kaiming-initialised from ``seed``, so every caller with the same seed gets identical weights.
    Any other mismatch raises :class:`CheckpointError` listing every unmatched key.
    """
    path = Path(checkpoint)
    if loaded is None and not path.is_file():
        raise CheckpointError(f"pretrained encoder {path}: no such file (set model.pretrained to the previous stage's model)")
    encoder = select_weights(normalize_checkpoint_keys(path if loaded is None else loaded, origin=str(path)), "encoder")
    if not encoder:
        raise CheckpointError(f"pretrained encoder {path}: holds no swinViT.* weights")
    try:
        adapted = adapt_input_channels(encoder, source_modalities, target_modalities, seed=seed)
    except ConfigError as exc:
        raise ConfigError(
            f"pretrained encoder {path}: {exc}; the checkpoint does not say which modality each channel is, so set "
            f"model.pretrained_modalities to its channels (e.g. [t1, flair] for a Stage 1 model, [flair, t1ce, t1, t2] "
            f"for a BraTS one; a job: `bsf jobs export --pretrained-stage STAGE`), or export it again with `bsf export`"
        ) from None
    report = import_weights(model, adapted, scope="encoder", strict=True)
    log.info("loaded pretrained encoder %s (%d tensors, %s -> %s)", path, len(report.loaded), list(source_modalities), list(target_modalities))
    return report
