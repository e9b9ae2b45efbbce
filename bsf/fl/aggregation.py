"""Server-side aggregation: a checked, weighted FedAvg over the aggregated part of the model.

Two layers:

* :func:`check_update` and :class:`WeightedMean` are plain NumPy (no NVFlare): what makes an
  update acceptable, and the weighted average itself. Unit tests drive them directly.
* :class:`CheckedFedAvgAggregator` plugs them into NVFlare's ``FedAvg`` controller as a
  ``ModelAggregator``. It rejects an update that contains NaN/Inf or whose keys/shapes differ
  from the global model, logs which site sent it, and aggregates the others. When fewer than
  ``min_accepted`` updates survive a round, the global model is left unchanged for that round
  (an empty weight difference) and the round is reported as skipped.

Weights: ``steps`` (``NUM_STEPS_CURRENT_ROUND``, NVFlare's FedAvg default), ``cases`` (the
site's number of training cases, sent in the result meta as ``num_cases``) or ``uniform``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

WEIGHTINGS = ("steps", "cases", "uniform")
META_NUM_CASES = "num_cases"
META_NUM_STEPS = "NUM_STEPS_CURRENT_ROUND"  # == nvflare.apis.fl_constant.FLMetaKey.NUM_STEPS_CURRENT_ROUND


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(np.shape(value))


def check_update(params: Mapping[str, Any] | None, reference: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Problems that make ``params`` unusable against a global model with ``reference`` shapes.

    Returns an empty list when the update is acceptable: exactly the reference keys, the same
    shapes, numeric and finite everywhere. Messages name keys (never values).
    """
    if not params:
        return ["the update is empty"]
    problems = []
    missing = sorted(set(reference) - set(params))
    unknown = sorted(set(params) - set(reference))
    if missing:
        problems.append(f"{len(missing)} global key(s) missing, e.g. {missing[:3]}")
    if unknown:
        problems.append(f"{len(unknown)} key(s) not in the global model, e.g. {unknown[:3]}")
    bad_shape = [k for k in params if k in reference and _shape(params[k]) != tuple(reference[k])]
    if bad_shape:
        k = bad_shape[0]
        problems.append(
            f"{len(bad_shape)} shape mismatch(es), e.g. {k}: {_shape(params[k])} vs global {tuple(reference[k])}"
        )
    non_finite = []
    for k, v in params.items():
        arr = np.asarray(v)
        if not np.issubdtype(arr.dtype, np.number):
            problems.append(f"{k} is not numeric ({arr.dtype})")
            continue
        if not np.isfinite(arr).all():
            non_finite.append(k)
    if non_finite:
        problems.append(f"{len(non_finite)} tensor(s) contain NaN/Inf, e.g. {non_finite[:3]}")
    return problems


def update_weight(meta: Mapping[str, Any] | None, weigh_by: str) -> float:
    """The aggregation weight of one result (``steps``, ``cases`` or ``uniform``); 1.0 if absent/invalid."""
    if weigh_by not in WEIGHTINGS:
        raise ValueError(f"weigh_by must be one of {WEIGHTINGS}, got {weigh_by!r}")
    if weigh_by == "uniform":
        return 1.0
    key = META_NUM_STEPS if weigh_by == "steps" else META_NUM_CASES
    value = (meta or {}).get(key)
    try:
        weight = float(value)
    except (TypeError, ValueError):
        return 1.0
    if isinstance(value, bool) or not math.isfinite(weight) or weight <= 0:
        return 1.0
    return weight


class WeightedMean:
    """Running weighted mean of dicts of arrays, accumulated in float64, returned as float32."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self.total_weight = 0.0
        self.contributors: list[tuple[str, float]] = []

    def add(self, params: Mapping[str, Any], weight: float, name: str = "?") -> None:
        if weight <= 0 or not math.isfinite(weight):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        for k, v in params.items():
            contribution = np.asarray(v, dtype=np.float64) * weight
            if k in self._sums:
                self._sums[k] += contribution
            else:
                self._sums[k] = contribution
        self.total_weight += weight
        self.contributors.append((name, weight))

    def __len__(self) -> int:
        return len(self.contributors)

    def result(self) -> dict[str, np.ndarray]:
        if not self.contributors:
            return {}
        return {k: (s / self.total_weight).astype(np.float32) for k, s in self._sums.items()}


def weighted_average(updates: list[tuple[Mapping[str, Any], float]]) -> dict[str, np.ndarray]:
    """Weighted mean of ``[(params, weight), ...]`` (float32 result)."""
    mean = WeightedMean()
    for i, (params, weight) in enumerate(updates):
        mean.add(params, weight, str(i))
    return mean.result()


# ------------------------------------------------------------------------------- NVFlare side
try:  # the pure functions above must stay importable without NVFlare
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
except ImportError:  # pragma: no cover - exercised only without nvflare installed
    ModelAggregator = object  # type: ignore[assignment,misc]


class CheckedFedAvgAggregator(ModelAggregator):  # type: ignore[misc,valid-type]
    """FedAvg ``ModelAggregator`` that validates every result before it counts.

    Args:
        weigh_by: ``steps`` | ``cases`` | ``uniform``.
        min_accepted: fewest accepted updates for the round to change the global model.
    """

    def __init__(self, weigh_by: str = "steps", min_accepted: int = 1):
        super().__init__()
        if weigh_by not in WEIGHTINGS:
            raise ValueError(f"weigh_by must be one of {WEIGHTINGS}, got {weigh_by!r}")
        self.weigh_by = weigh_by
        self.min_accepted = max(1, int(min_accepted))
        self._mean = WeightedMean()
        self._params_type = None
        self._rejected: list[tuple[str, str]] = []
        self._metrics = WeightedMean()
        self._reference: dict[str, tuple[int, ...]] | None = None
        self._first_update: dict[str, np.ndarray] | None = None

    def set_reference(self, global_params: Mapping[str, Any]) -> None:
        """Record the global model's keys and shapes (the controller calls this once the model is loaded)."""
        self._reference = {k: _shape(v) for k, v in global_params.items()}

    @property
    def rejected(self) -> list[tuple[str, str]]:
        """``(site, reason)`` of the updates rejected in the current round."""
        return list(self._rejected)

    def _reject(self, site: str, reason: str) -> bool:
        self._rejected.append((site, reason))
        log.error("rejected the update from site %s: %s", site, reason)
        return False

    # -- ModelAggregator API
    def reset_stats(self) -> None:
        self._mean.reset()
        self._metrics.reset()
        self._params_type = None
        self._rejected = []
        self._first_update = None

    def accept_model(self, model: FLModel) -> bool:
        meta = model.meta or {}
        site = str(meta.get("client_name", "unknown"))
        if self._reference is None:
            return self._reject(site, "the server has no global model to check the update against")
        params_type = model.params_type
        if params_type not in (ParamsType.FULL, ParamsType.DIFF):
            return self._reject(site, f"unsupported params type {params_type}")
        if self._params_type is not None and params_type != self._params_type:
            return self._reject(site, f"params type {params_type} differs from this round's {self._params_type}")
        problems = check_update(model.params, self._reference)
        if problems:
            return self._reject(site, "; ".join(problems))
        weight = update_weight(meta, self.weigh_by)
        self._params_type = params_type
        self._mean.add(model.params, weight, site)
        if len(self._mean) == 1:
            self._first_update = {k: np.asarray(v, dtype=np.float32) for k, v in model.params.items()}
        else:
            self._first_update = None
        numeric = {
            k: float(v)
            for k, v in (model.metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        }
        if numeric:
            self._metrics.add(numeric, weight, site)
        log.info("accepted the update from site %s (weight %s, %s)", site, weight, params_type)
        return True

    def aggregate_model(self) -> FLModel:
        accepted = [name for name, _ in self._mean.contributors]
        rejected = [name for name, _ in self._rejected]
        meta = {"accepted_sites": accepted, "rejected_sites": rejected, "weigh_by": self.weigh_by}
        if len(accepted) < self.min_accepted:
            message = (
                f"only {len(accepted)} acceptable update(s) (need {self.min_accepted}); rejected: {rejected}. "
                "The global model stays unchanged this round."
            )
            log.error(message)
            # an empty difference leaves every global key as it is
            result = FLModel(params={}, params_type=ParamsType.DIFF, meta={**meta, "round_skipped": True})
        else:
            # one accepted update: use it bit for bit (a weighted mean of one can differ by an ulp)
            params = self._first_update if len(accepted) == 1 and self._first_update is not None else self._mean.result()
            result = FLModel(params=params, params_type=self._params_type, meta=meta)
            if rejected:
                log.warning("aggregated %d update(s) without the rejected site(s) %s", len(accepted), rejected)
        metrics = {k: float(v) for k, v in self._metrics.result().items()}
        result.metrics = metrics or None
        self.reset_stats()
        return result
