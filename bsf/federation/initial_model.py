"""The initial global model, from the engine's own seeded model construction (no data needed).

This is the one place in ``bsf.fl`` that touches torch modules directly; everything else goes
through the :class:`bsf.engine.Engine` API.

Stage 3 across tasks (``federation.tasks``): the global model is one seeded build per task (the same shared
tensors, and the previous stage's encoder adapted alike) merged into the shared tensors plus every task's head
(:func:`bsf.federation.task_heads.merge_task_models`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

import numpy as np

from bsf.federation.task_heads import for_task, merge_task_models, to_local

log = logging.getLogger(__name__)


def _to_numpy(state: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v.detach().cpu().float().numpy()) for k, v in state.items()}


def build_initial_model(config: Any):
    """The model an :class:`~bsf.engine.Engine` built from ``config`` starts with (same seed stream)."""
    from bsf.engine import build_model

    return build_model(config)


def _tasks(config: Any) -> list[str]:
    """``federation.tasks`` of a run config (empty: one task)."""
    return list(config.federation.tasks) if getattr(config, "federation", None) is not None else []


def _task_config(config: Any, task: str) -> Any:
    """``config`` for ``task``'s plain model (its data set and head channels), without the federation section."""
    config = for_task(config, task)
    config.federation = None
    return config


def initial_weights(config: Any, scope: str = "encoder") -> dict[str, np.ndarray]:
    """The ``scope`` weights an :class:`~bsf.engine.Engine` built from ``config`` starts with.

    Bit-identical to ``Engine(config).get_weights(scope)`` (a test checks it), but without
    loading any data, so the server can create the global model. Across tasks: the global model of
    every task's build (a site's engine starts with its task's part of it).
    """
    from bsf.model import select_weights

    if _tasks(config):
        return merge_task_models({t: initial_weights(_task_config(config, t), scope) for t in _tasks(config)})
    return _to_numpy(select_weights(build_initial_model(config).state_dict(), scope))


def checkpoint_weights(config: Any, path: Any, scope: str = "encoder") -> dict[str, np.ndarray]:
    """The ``scope`` weights of a checkpoint (any layout ``bsf.model.import_weights`` reads), checked
    strictly against the model ``config`` builds; every unmatched key is reported."""
    from bsf.model import import_weights, normalize_checkpoint_keys, select_weights

    if _tasks(config):  # a global model across tasks: each task's part checked against its plain model
        state = normalize_checkpoint_keys(path)
        return merge_task_models({t: checkpoint_weights(_task_config(config, t), to_local(state, t), scope)
                                  for t in _tasks(config)})
    model = build_initial_model(config)
    report = import_weights(model, path, scope=scope, strict=True)
    log.info("initial global model from %s: %s", path if isinstance(path, (str, os.PathLike)) else "a task's part",
             report.summary().splitlines()[0])
    return _to_numpy(select_weights(model.state_dict(), scope))


#: The server-side environment variable naming the previous stage's model (e.g. for simulator runs).
ENV_PRETRAINED = "BSF_PRETRAINED"


def _previous_model_setting(
    config: Any, pretrained: str | None, environ: Mapping[str, str], require_pretrained: bool
) -> tuple[str | None, str]:
    """Where the previous stage's model comes from, first match wins: the job, ``$BSF_PRETRAINED`` (only for a
    job that requires one: a committed Stage 2/3 job run by hand), the run config."""
    env_value = (environ.get(ENV_PRETRAINED) or None) if require_pretrained else None
    if pretrained:
        if env_value and env_value != pretrained:
            log.warning("the job names the previous stage's model %s; ignoring $%s=%s", pretrained, ENV_PRETRAINED, env_value)
        return pretrained, "the job's persistor setting 'pretrained'"
    if env_value:
        return env_value, f"${ENV_PRETRAINED}"
    if getattr(config.model, "pretrained", None):
        return config.model.pretrained, "the run config's model.pretrained"
    return None, ""


def initial_global_weights(
    config: Any,
    scope: str = "encoder",
    *,
    initial_ckpt: str | None = None,
    pretrained: str | None = None,
    require_pretrained: bool = False,
    job: str = "this job",
    environ: Mapping[str, str] | None = None,
    resolve: Callable[[str], str] = lambda path: path,
) -> tuple[dict[str, np.ndarray], str]:
    """The initial global model of a job and a one-line description of where it came from.

    First match wins:

    1. ``initial_ckpt``: the ``scope`` weights of a checkpoint of this very model (strict, no
       channel adaptation), e.g. to continue a job;
    2. the previous stage's model (``pretrained``, else ``$BSF_PRETRAINED`` if ``require_pretrained``, else the run config's
       ``model.pretrained``): its encoder loaded into the model ``config`` builds, channels adapted
       by modality name from ``model.pretrained_modalities`` (seeded, so identical everywhere);
    3. the seeded initialisation, unless ``require_pretrained`` (Stage 2 and 3 jobs): then a
       :class:`~bsf.errors.CheckpointError` says how to name the previous stage's model.

    A previous model that is missing, unreadable or does not fit (size, channels, layout) raises
    :class:`~bsf.errors.CheckpointError` naming the file, where the setting came from and why.
    ``resolve`` maps a configured path to a local one (the persistor: relative to the app's config folder).
    """
    import copy

    from bsf.errors import BSFError, CheckpointError

    environ = os.environ if environ is None else environ
    if initial_ckpt:
        path = resolve(initial_ckpt)
        if not os.path.isfile(path):
            raise CheckpointError(f"{job}: initial checkpoint {path} not found on the server")
        return checkpoint_weights(config, path, scope), f"checkpoint {path}"
    source, origin = _previous_model_setting(config, pretrained, environ, require_pretrained)
    if source is None:
        if require_pretrained:
            raise CheckpointError(
                f"{job} starts from the previous stage's model, but none is set: set ${ENV_PRETRAINED} on the server "
                f"(e.g. {ENV_PRETRAINED}=/abs/path/FL_global_model.pt nvflare simulator ...), or export the job with "
                f"`bsf jobs export --pretrained PATH`, or set model.pretrained in its run config"
            )
        return initial_weights(config, scope), f"seed {config.seed}"
    path = resolve(source)
    if not os.path.isfile(path):
        raise CheckpointError(f"{job}: the previous stage's model {path} (from {origin}) not found on the server")
    config = copy.deepcopy(config)
    config.model.pretrained = str(path)
    from bsf.engine.stage_model import input_modalities, pretrained_modalities

    target = input_modalities(config)
    try:
        source_channels = pretrained_modalities(config)  # for the log line; read once more, once per job
        weights = initial_weights(config, scope)
    except BSFError as exc:
        raise CheckpointError(
            f"{job}: the previous stage's model {path} (from {origin}) does not fit this job's model "
            f"(size {config.model.size!r}, channels -> {target}): {exc}"
        ) from None
    return weights, f"the previous stage's model {path} (from {origin}), channels {source_channels} -> {target}"


def selection_metric(config: Any) -> tuple[str, bool]:
    """The validation metric that selects the best global model, and whether lower is better.

    The stage's own choice (:attr:`bsf.engine.tasks.Task.best_metric`): SSL
    ``val_reconstruction_l1`` (lower is better), fine-tuning ``val_dice_mean`` (higher is better).
    """
    from bsf.engine.tasks import build_task

    task = build_task(config)
    return task.best_metric, bool(task.lower_is_better)


def load_global_model(path: str) -> dict[str, np.ndarray]:
    """The tensors of a global model file (``{"model": state_dict}`` or any layout bsf reads) as float32 arrays."""
    from bsf.model import normalize_checkpoint_keys

    return _to_numpy(normalize_checkpoint_keys(path))


def change_from_initial(config: Any, scope: str, global_model: str, pretrained: str | None = None) -> float:
    """``max |global - initial|`` over the global model's tensors, the initial model rebuilt as the server built it."""
    initial, _ = initial_global_weights(config, scope, pretrained=pretrained, environ={})
    final = load_global_model(global_model)
    if set(initial) != set(final):
        from bsf.errors import CheckpointError

        raise CheckpointError(f"{global_model}: keys differ from the job's initial model ({len(final)} vs {len(initial)})")
    return max(float(np.abs(final[k].astype(np.float64) - initial[k]).max()) for k in final)
