"""The initial global model, from the engine's own seeded model construction (no data needed).

This is the one place in ``bsf.fl`` that touches torch modules directly; everything else goes
through the :class:`bsf.engine.Engine` API.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _to_numpy(state: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v.detach().cpu().float().numpy()) for k, v in state.items()}


def initial_weights(config: Any, scope: str = "encoder") -> dict[str, np.ndarray]:
    """The ``scope`` weights an :class:`~bsf.engine.Engine` built from ``config`` starts with.

    Bit-identical to ``Engine(config).get_weights(scope)`` (a test checks it), but without
    loading any data, so the server can create the global model.
    """
    from bsf import engine as engine_pkg
    from bsf.model import select_weights

    build = getattr(engine_pkg, "build_model", None)
    if build is not None:  # the engine's public model factory, when it has one
        model = build(config)
    else:
        import torch

        from bsf.data.pipeline import seed_for
        from bsf.engine.engine import _INIT_STREAM
        from bsf.engine.tasks import build_task

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for(config.seed, _INIT_STREAM))
            model = build_task(config).build_model()
    return _to_numpy(select_weights(model.state_dict(), scope))


def checkpoint_weights(config: Any, path: str, scope: str = "encoder") -> dict[str, np.ndarray]:
    """The ``scope`` weights of a checkpoint file, checked against the model ``config`` builds."""
    from bsf.model import normalize_checkpoint_keys, select_weights
    from bsf.errors import CheckpointError

    reference = initial_weights(config, scope)
    state = select_weights(normalize_checkpoint_keys(path), scope)
    missing = sorted(set(reference) - set(state))
    mismatched = sorted(k for k in reference if k in state and tuple(state[k].shape) != reference[k].shape)
    if missing or mismatched:
        raise CheckpointError(
            f"{path}: does not fit the '{scope}' part of model size {config.model.size!r}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), shape mismatches {mismatched[:3]}"
        )
    extra = sorted(set(state) - set(reference))
    if extra:
        log.warning("%s: %d keys outside the model's '%s' part are ignored (e.g. %s)", path, len(extra), scope, extra[:3])
    return _to_numpy({k: state[k] for k in reference})
