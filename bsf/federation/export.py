"""Turn a federated global model into an encoder checkpoint for the next stage, or (Stage 3 across tasks) into
one task's ordinary SwinUNETR checkpoint (``bsf export`` calls this)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from bsf.errors import BSFError, CheckpointError
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
    from bsf.engine.stage_model import describe_checkpoint
    from bsf.model import normalize_checkpoint_keys, read_checkpoint, save_encoder

    source = find_global_model(global_model_path)
    out = check_output_file(out_path, what="encoder checkpoint", inputs=[source], force=force)
    checkpoint = read_checkpoint(source, "model")
    description, where = describe_checkpoint(source, checkpoint)
    if description is None:
        log.warning("model %s: no run config says which modalities its channels are; the next stage needs "
                    "model.pretrained_modalities set to them", source)
    with reported_write(out, what="encoder checkpoint"):
        written = save_encoder(normalize_checkpoint_keys(checkpoint, origin=str(source)), out, description=description)
    log.info("exported the encoder of %s to %s%s", source, written, f" ({description.summary()}, from {where})" if description else "")
    return Path(written)


def task_weights(global_model: str | os.PathLike, task: str) -> dict:
    """One task's model of a global model across tasks (``federation.tasks``): the shared tensors plus ``task``'s
    head as ``out.*`` (:func:`bsf.federation.task_heads.to_local`), a plain SwinUNETR state dict.

    Raises:
        CheckpointError: the model has no head of ``task`` (names the file and the tasks it has).
    """
    from bsf.federation.task_heads import to_local
    from bsf.model import normalize_checkpoint_keys

    try:
        return to_local(normalize_checkpoint_keys(global_model), task)
    except BSFError as exc:
        raise CheckpointError(f"model {global_model}: {exc}") from None


def export_task_model(global_model_path: str | os.PathLike, task: str, out_path: str | os.PathLike, *,
                      config: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Write one task's model of a global model across tasks (``federation.tasks``) as an ordinary checkpoint.

    The shared tensors plus ``task``'s head as ``out.*`` (:func:`bsf.federation.task_heads.to_local`), with the job's
    run config for that task (``data.dataset``, ``model.out_channels``; no federation section), as
    ``{"model": state_dict, "config": ...}``: what ``bsf predict``, ``bsf evaluate`` and ``bsf bundle export`` read.

    Args:
        global_model_path: as for :func:`export_global_encoder`.
        task: the task (data set) whose head to take, e.g. ``brats``.
        out_path: destination, written atomically (never the model itself; existing only with ``force``).
        config: the job's run config; default the one the server keeps beside the model (``config/bsf_run.yaml``).

    Raises:
        CheckpointError: no global model, no run config, or the model has no head of ``task`` (names the tasks it has).
    """
    from bsf.config import load_config
    from bsf.federation.run_folders import run_config_beside
    from bsf.federation.task_heads import for_task
    from bsf.io import atomic_torch_save
    from bsf.model import build_swin_unetr, import_weights

    source = find_global_model(global_model_path)
    config_path = Path(config) if config is not None else run_config_beside(source)
    if config is None and not config_path.is_file():
        raise CheckpointError(f"model {source}: no run config beside it ({config_path}); pass the job's with --config")
    out = check_output_file(out_path, what=f"{task} model", inputs=[source], force=force)
    run_config = for_task(load_config(config_path), task)
    run_config.federation, run_config.model.pretrained = None, None
    state = task_weights(source, task)
    m = run_config.model
    import_weights(build_swin_unetr(m.size, m.in_channels, m.out_channels), state, scope="all", strict=True)  # it fits
    with reported_write(out, what=f"{task} model"):
        atomic_torch_save({"model": state, "config": run_config.to_dict()}, out)
    log.info("exported the %s model of %s to %s", task, source, out)
    return out
