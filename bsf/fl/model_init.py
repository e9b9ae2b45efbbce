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


def build_initial_model(config: Any):
    """The model an :class:`~bsf.engine.Engine` built from ``config`` starts with (same seed stream)."""
    from bsf.engine import build_model

    return build_model(config)


def initial_weights(config: Any, scope: str = "encoder") -> dict[str, np.ndarray]:
    """The ``scope`` weights an :class:`~bsf.engine.Engine` built from ``config`` starts with.

    Bit-identical to ``Engine(config).get_weights(scope)`` (a test checks it), but without
    loading any data, so the server can create the global model.
    """
    from bsf.model import select_weights

    return _to_numpy(select_weights(build_initial_model(config).state_dict(), scope))


def checkpoint_weights(config: Any, path: str, scope: str = "encoder") -> dict[str, np.ndarray]:
    """The ``scope`` weights of a checkpoint (any layout ``bsf.model.import_weights`` reads), checked
    strictly against the model ``config`` builds; every unmatched key is reported."""
    from bsf.model import import_weights, select_weights

    model = build_initial_model(config)
    report = import_weights(model, path, scope=scope, strict=True)
    log.info("initial global model from %s: %s", path, report.summary().splitlines()[0])
    return _to_numpy(select_weights(model.state_dict(), scope))
