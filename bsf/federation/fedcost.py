"""FedCostWAvg weights (Mächler et al. 2021, the FeTS 2021 challenge winner) in plain Python (no NVFlare, no torch).

Site ``k``'s weight in the round's mean::

    w_k = alpha * n_k / sum(n) + (1 - alpha) * c_k / sum(c),     c_k = loss_before_k / loss_after_k

with ``n_k`` the site's training cases (meta ``num_cases``, bounded like a ``cases`` claim) and ``c_k`` its loss
improvement over its local round. The weights sum to 1. The site reports, as metrics of its train result,
:data:`LOSS_BEFORE` = the loss of its first local step (computed on the received global model's weights) and
:data:`LOSS_AFTER` = the loss of its last local step (the weights after ``local_steps - 1`` updates), each on that
step's own batch (:class:`bsf.federation.site_trainer.SiteTrainer`). With ``local_steps: 1`` both are the same loss
and every ``c_k`` is 1 (weights by cases and an even share).

Both losses are the site's word, so the ratio is checked: a missing, non-finite or non-positive loss gives
``c_k = 1`` (no claimed improvement) and a ratio above :data:`MAX_COST_RATIO` is clipped to it, with a note that
the round record keeps. Whatever a site claims, its weight stays below ``alpha * n_k / sum(n) + (1 - alpha)``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

#: the metric names of a site's loss before and after its local round (in the result guard's allow-list)
LOSS_BEFORE, LOSS_AFTER = "loss_before", "loss_after"
#: the largest loss improvement (before / after) a site's claim counts for
MAX_COST_RATIO = 10.0


def _positive(value: Any) -> float | None:
    """``value`` as a float when it is a positive finite real number (no bool, string, ...), else ``None``."""
    if not (type(value) in (int, float) or isinstance(value, (np.integer, np.floating))):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        return None
    return value if math.isfinite(value) and value > 0 else None


def cost_ratio(metrics: Mapping[str, Any] | None) -> tuple[float, str]:
    """``(c_k, note)`` from a result's metrics (see the module docstring; an empty note: the claim as is)."""
    before, after = (_positive((metrics or {}).get(name)) for name in (LOSS_BEFORE, LOSS_AFTER))
    if before is None or after is None:
        return 1.0, f"no valid {LOSS_BEFORE}/{LOSS_AFTER} metrics; loss improvement 1"
    ratio = before / after
    if ratio > MAX_COST_RATIO:
        return MAX_COST_RATIO, f"loss improvement {ratio:.6g} is above the bound {MAX_COST_RATIO:g}; clipped to it"
    return ratio, ""


def fedcost_weights(cases: Mapping[str, float], ratios: Mapping[str, float], alpha: float) -> dict[str, float]:
    """Site -> ``alpha * n_k / sum(n) + (1 - alpha) * c_k / sum(c)`` for the sites of ``cases`` (same keys in ``ratios``).

    Raises:
        ValueError: no sites, different site sets, or a non-positive count or ratio.
    """
    if not cases or set(cases) != set(ratios):
        raise ValueError(f"fedcost_weights needs the same non-empty sites, got {sorted(cases)} and {sorted(ratios)}")
    if min(cases.values()) <= 0 or min(ratios.values()) <= 0:
        raise ValueError("fedcost_weights needs positive case counts and loss improvements")
    total_n, total_c = float(sum(cases.values())), float(sum(ratios.values()))
    return {site: alpha * cases[site] / total_n + (1 - alpha) * ratios[site] / total_c for site in cases}
