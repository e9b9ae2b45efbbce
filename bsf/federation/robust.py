"""Robust aggregation rules on weight differences, in plain NumPy (no NVFlare, no torch).

An *update* is one site's weight difference: a mapping key -> array (any shape). Every rule takes the
round's accepted updates as ``[(site, params, weight), ...]`` and returns the aggregate (key -> float32
array, the same shapes) plus a report of what the rule did, which the server writes into the round record.

Every rule runs after the server's norm bound (:class:`bsf.federation.update_checks.NormBound`, on by default),
which *refuses* an update far outside the round's others; a rule here works on the updates it kept.

* ``clip``: each update whose L2 norm (:func:`~bsf.federation.update_checks.update_norm`, over all its tensors
  together) exceeds the round's bound is scaled down to the bound (:func:`~bsf.federation.update_checks.clip_to_norm`);
  then the usual weighted mean. The bound is fixed (``clip_bound``) or a multiple of the median of the round's
  update norms (``clip_multiple``): a site can stretch the median only by being the majority, so one wild update
  is cut down to ``clip_multiple`` times what a typical site sent.
* ``trimmed_mean``: coordinate-wise, the ``floor(trim_fraction * n)`` largest and smallest values of each
  coordinate are dropped and the rest averaged (unweighted: a weight claim could otherwise undo the trim).
* ``median``: the coordinate-wise median (unweighted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from bsf.config import FederationConfig
from bsf.federation.update_checks import clip_to_norm, update_norm

__all__ = ["RobustRule", "Update", "clip_bound_for", "coordinate_median", "robust_aggregate", "trimmed_mean",
           "update_norm", "weighted_mean"]

Update = tuple[str, Mapping[str, Any], float]  # (site, key -> array, weight)


@dataclass(frozen=True)
class RobustRule:
    """One robust rule and its settings (see the module docstring; validated as ``federation.*`` keys).

    Args:
        rule: one of :data:`bsf.config.ROBUST_RULES`.
        clip_bound: ``clip`` with a fixed L2 bound (> 0); 0: use ``clip_multiple``.
        clip_multiple: ``clip`` with the bound ``clip_multiple * median norm`` of the round (>= 1).
        trim_fraction: ``trimmed_mean``: the fraction of values dropped at *each* end, in [0, 0.5).
    """

    rule: str = "none"
    clip_bound: float = 0.0
    clip_multiple: float = 0.0
    trim_fraction: float = 0.2

    @classmethod
    def from_config(cls, fed: FederationConfig) -> "RobustRule":
        """The rule a job's (validated) federation section chooses."""
        return cls(fed.robust, fed.clip_bound, fed.clip_multiple, fed.trim_fraction)

    @property
    def needs_all_updates(self) -> bool:
        """Whether the rule needs the round's updates together (everything but ``none``)."""
        return self.rule != "none"


def clip_bound_for(norms: Sequence[float], rule: RobustRule) -> float:
    """The round's L2 bound: ``clip_bound``, or ``clip_multiple`` times the median of ``norms``."""
    if rule.clip_bound > 0:
        return float(rule.clip_bound)
    return float(rule.clip_multiple * np.median(np.asarray(norms, dtype=np.float64)))


def _stack(updates: Sequence[Update], key: str) -> np.ndarray:
    """``(n_sites, *shape)`` float64 stack of one key's tensors."""
    return np.stack([np.asarray(params[key], dtype=np.float64) for _, params, _ in updates])


def weighted_mean(updates: Sequence[Update]) -> dict[str, np.ndarray]:
    """Key -> float32 weighted mean of the updates (accumulated in float64)."""
    total = sum(weight for _, _, weight in updates)
    weights = np.asarray([weight for _, _, weight in updates], dtype=np.float64)
    out = {}
    for key in updates[0][1]:
        stack = _stack(updates, key)
        out[key] = (np.tensordot(weights, stack, axes=1) / total).astype(np.float32)
    return out


def trimmed_mean(updates: Sequence[Update], trim_fraction: float) -> tuple[dict[str, np.ndarray], int]:
    """Coordinate-wise mean after dropping ``k = floor(trim_fraction * n)`` values at each end; returns (mean, k)."""
    n = len(updates)
    k = int(math.floor(trim_fraction * n))
    out = {}
    for key in updates[0][1]:
        ordered = np.sort(_stack(updates, key), axis=0)
        out[key] = ordered[k:n - k].mean(axis=0).astype(np.float32)
    return out, k


def coordinate_median(updates: Sequence[Update]) -> dict[str, np.ndarray]:
    """Coordinate-wise median of the updates (float32)."""
    return {key: np.median(_stack(updates, key), axis=0).astype(np.float32) for key in updates[0][1]}


def robust_aggregate(updates: Sequence[Update], rule: RobustRule) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The round's aggregate under ``rule`` and a JSON-ready report (rule, norms, bound, clipped sites).

    ``report["clipped"]`` maps each clipped site to its norm and the factor its update was scaled by.
    """
    if not updates:
        raise ValueError("robust_aggregate needs at least one update")
    norms = {site: update_norm(params) for site, params, _ in updates}
    report: dict[str, Any] = {"rule": rule.rule, "norms": {s: round(v, 6) for s, v in norms.items()}}
    if rule.rule == "none":
        return weighted_mean(updates), report
    if rule.rule == "clip":
        bound = clip_bound_for(list(norms.values()), rule)
        clipped: dict[str, dict[str, float]] = {}
        scaled = []
        for site, params, weight in updates:
            norm = norms[site]
            if norm > bound:
                params, factor = clip_to_norm(params, bound, norm)
                clipped[site] = {"norm": round(norm, 6), "scale": round(factor, 6)}
            scaled.append((site, params, weight))
        report.update(bound=round(bound, 6), clipped=clipped)
        return weighted_mean(scaled), report
    if rule.rule == "trimmed_mean":
        result, k = trimmed_mean(updates, rule.trim_fraction)
        report["trimmed_per_end"] = k
        return result, report
    return coordinate_median(updates), report
