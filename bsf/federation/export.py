"""Turn a federated global model into an encoder checkpoint for the next stage (``bsf export`` calls this)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from bsf.errors import CheckpointError
from bsf.outputs import check_output_file, reported_write

log = logging.getLogger(__name__)

#: Where the NVFlare server keeps the global models, relative to its run folder
#: (simulator: ``<workspace>/server/simulate_job``; deployment: ``<server workspace>/<job id>``).
GLOBAL_MODEL_FILES = ("app_server/FL_global_model.pt", "app_server/best_FL_global_model.pt")


def find_global_model(path: str | os.PathLike, best: bool = False) -> Path:
    """A global model file from a file path, a server run folder, or a simulator workspace."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"model {path}: no such file or folder")
    name = GLOBAL_MODEL_FILES[1] if best else GLOBAL_MODEL_FILES[0]
    for candidate in (path / name, path / "simulate_job" / name, path / "server" / "simulate_job" / name):
        if candidate.is_file():
            return candidate
    matches = sorted(path.rglob(Path(name).name)) if path.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    raise CheckpointError(f"no {Path(name).name} under {path}" + (f" (several: {matches[:3]})" if matches else ""))


def export_global_encoder(global_model_path: str | os.PathLike, out_path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the encoder (``swinViT.*``) of an NVFlare global model as ``{"state_dict": ...}``.

    Args:
        global_model_path: ``FL_global_model.pt`` / ``best_FL_global_model.pt`` (``{"model": state_dict}``),
            or a folder holding one (server run folder or simulator workspace).
        out_path: destination; written atomically. Never the model itself (also through a symbolic link or
            another spelling of its path); an existing file is replaced only with ``force``.

    Raises:
        CheckpointError: no global model found, or it holds no encoder weights.
        OutputError: ``out_path`` is the model, a folder, an existing file without ``force``, or cannot be written.
    """
    from bsf.model import normalize_checkpoint_keys, save_encoder

    source = find_global_model(global_model_path)
    out = check_output_file(out_path, what="encoder checkpoint", inputs=[source], force=force)
    state = normalize_checkpoint_keys(source)
    with reported_write(out, what="encoder checkpoint"):
        written = save_encoder(state, out)
    log.info("exported the encoder of %s to %s", source, written)
    return Path(written)
