"""Server-side aggregation: a checked, weighted FedAvg over the aggregated part of the model.

Two layers:

* :func:`~bsf.federation.update_checks.check_update`, :class:`~bsf.federation.update_checks.NormBound`,
  :func:`update_weight` and :class:`~bsf.federation.weighted_mean.WeightedMean` are plain NumPy (no NVFlare):
  what makes an update acceptable, which norms a round refuses, what an update weighs, and the weighted
  average itself. Unit tests drive them directly.
* :class:`CheckedFedAvgAggregator` plugs them into NVFlare's ``FedAvg`` controller as a
  ``ModelAggregator``. It rejects an update that is no mapping of NumPy arrays (a ragged or nested list, a
  string: named by key, with the shape expected), whose keys/shapes differ from the global model, whose
  tensors are not real floating point, or whose values are NaN/Inf in float32 (the dtype of the
  global model: a float64 1e300 is rejected, it would become Inf), logs which site sent it and why,
  and aggregates the others. When the round closes, the norm bound (``federation.norm_bound``, on by
  default) refuses, by name with its norm and the bound, every update above ``norm_bound_multiple`` (10) x
  the round's median update norm (rounds of three or more updates) or above the ceiling of
  ``norm_bound_rms`` (100) RMS per value (every round); a FULL update is measured by its difference to the
  round's global model. A round whose accepted updates are all zeros is named ``degenerate`` in its record
  and logged as a warning. When fewer than ``min_accepted`` updates survive a round, the global
  model is left unchanged for that round (an empty weight difference) and the round is reported as
  skipped. The results are kept until the round closes (the bound needs the round's median) and then
  averaged in their arrival order: the same mean, bit for bit, as the streaming mean gave.

Weights: ``steps`` (``NUM_STEPS_CURRENT_ROUND``, NVFlare's FedAvg default), ``cases`` (the
site's number of training cases, sent in the result meta as ``num_cases``) or ``uniform``. A claim
is the site's word, so it is bounded: a ``steps`` claim by the job's local steps (``expected_steps``:
an honest site runs exactly that many), a ``cases`` claim by ``max_cases``. A claim above its bound
is **clipped to the bound** (the update still counts, as much as the largest honest one; a warning
and the round record name the site); a missing or malformed claim (absent, not a positive finite
real number: bool, string, Fraction, ...) weighs 1, like NVFlare's FedAvg.

Robust rules (``federation.robust``: norm clipping, trimmed mean, median; :mod:`bsf.federation.robust`)
replace the streaming mean: the aggregator keeps the round's accepted differences and applies the rule
when the round closes; the round meta's ``robust`` entry says which rule, every site's update norm, the
bound, and whose update was clipped by which factor.

A modality-aware model (``model.modalities``, :mod:`bsf.federation.modality`): the first layer's filters of
each modality are averaged over the sites whose result meta ``modalities`` names it (a malformed claim is
rejected; no claim counts as every modality); the round meta's ``modalities`` entry lists each site's.

Stage 3 across tasks (``federation.tasks``, :mod:`bsf.federation.task_heads`): an update must hold every shared
key and exactly one task's head (else it is rejected, naming the keys); each key is averaged over the sites that
sent it, so a task's head over that task's sites only; the round's metrics also come per task (``brats/val_dice_mean``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from bsf.config import NORM_BOUND_MULTIPLE, NORM_BOUND_RMS, ROBUST_RULES, WEIGHTINGS, FederationConfig
from bsf.errors import ConfigError
from bsf.federation.modality import ModalityAggregation, ModalityMetaError
from bsf.federation.fedcost import cost_ratio, fedcost_weights
from bsf.federation.robust import RobustRule, robust_aggregate
from bsf.federation.task_heads import update_task
from bsf.federation.update_checks import (  # noqa: F401  (check_update, FLOAT_DTYPES, non_finite_tensors: re-exported)
    FLOAT_DTYPES,
    NormBound,
    RoundNorm,
    check_update,
    degenerate_round,
    non_finite_tensors,
    update_norm,
    update_size,
)
from bsf.federation.weighted_mean import WeightedMean
from bsf.fl.scaffold import CONTROL_DIFF

log = logging.getLogger(__name__)

META_NUM_CASES = "num_cases"
META_NUM_STEPS = "NUM_STEPS_CURRENT_ROUND"  # == nvflare.apis.fl_constant.FLMetaKey.NUM_STEPS_CURRENT_ROUND
#: the bound of any weight claim when the job gives none (``cases``, or ``steps`` without ``expected_steps``)
MAX_CLAIM = 1_000_000


def _is_real(value: Any) -> bool:
    """A Python int/float or a NumPy integer/floating scalar (no bool, string, Fraction, Decimal, complex)."""
    return type(value) in (int, float) or isinstance(value, (np.integer, np.floating))


def claimed_weight(meta: Mapping[str, Any] | None, weigh_by: str) -> float | None:
    """A site's weight claim (``steps``: ``NUM_STEPS_CURRENT_ROUND``, ``cases``: ``num_cases``).

    A positive float (``inf`` for a claim beyond float's range), or ``None`` when absent, not
    positive, NaN, or not a real number.
    """
    key = META_NUM_STEPS if weigh_by == "steps" else META_NUM_CASES
    value = (meta or {}).get(key)
    if not _is_real(value):
        return None
    try:
        weight = float(value)
    except OverflowError:  # an int beyond float's range
        weight = math.inf if value > 0 else -math.inf
    return weight if weight > 0 else None  # NaN > 0 is False


def update_weight(meta: Mapping[str, Any] | None, weigh_by: str, bound: float = MAX_CLAIM) -> tuple[float, str]:
    """The aggregation weight of one result and a note on how it was derived (empty: the claim as is).

    Args:
        meta: the result's metadata.
        weigh_by: ``steps``, ``cases`` or ``uniform`` (always 1).
        bound: the largest weight a claim may give (see the module docstring): above it, clipped to it.
    """
    if weigh_by not in WEIGHTINGS:
        raise ConfigError(f"weigh_by must be one of {WEIGHTINGS}, got {weigh_by!r}")
    if weigh_by == "uniform":
        return 1.0, ""
    claim = claimed_weight(meta, weigh_by)
    key = META_NUM_STEPS if weigh_by == "steps" else META_NUM_CASES
    if claim is None:
        return 1.0, f"no valid {key} claim; weight 1"
    if claim > bound:
        return float(bound), f"{key} claim {claim:.6g} is above the bound {bound:g}; clipped to it"
    return claim, ""


def weighted_average(updates: list[tuple[Mapping[str, Any], float]]) -> dict[str, np.ndarray]:
    """Weighted mean of ``[(params, weight), ...]`` (float32 result)."""
    mean = WeightedMean()
    for i, (params, weight) in enumerate(updates):
        mean.add(params, weight, str(i))
    return mean.result()


def _reweighed(updates: list[tuple[str, Any, float]], weights: Mapping[str, float] | None) -> list[tuple[str, Any, float]]:
    """``updates`` (``(site, params, weight)``) with each site's weight from ``weights`` (``None``: as they are)."""
    return updates if weights is None else [(site, params, weights[site]) for site, params, _ in updates]


# ------------------------------------------------------------------------------- NVFlare side
try:  # the pure functions above must stay importable without NVFlare
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
except ImportError:  # pragma: no cover - exercised only without nvflare installed
    ModelAggregator = object  # type: ignore[assignment,misc]


@dataclass
class _Received:
    """One result that passed the checks of :meth:`CheckedFedAvgAggregator.accept_model`, kept until the round closes."""

    site: str
    params: Mapping[str, Any]  # as received (the weighted mean casts as it always did, so a round's mean is unchanged)
    weight: float
    norm: RoundNorm  # the update's (a FULL one's: its difference to the round's global model)
    held: Any = None  # model.modalities: the channels the site holds (mask)
    controls: dict[str, np.ndarray] | None = None  # SCAFFOLD: the site's control change
    control_norm: RoundNorm | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    task: str | None = None


class CheckedFedAvgAggregator(ModelAggregator):  # type: ignore[misc,valid-type]
    """FedAvg ``ModelAggregator`` that validates every result and bounds its weight and norm before it counts.

    Args:
        weigh_by: ``steps`` | ``cases`` | ``uniform``.
        min_accepted: fewest accepted updates for the round to change the global model.
        expected_steps: the job's local steps per round: the bound of a ``steps`` claim
            (``None``: :data:`MAX_CLAIM`).
        max_cases: the largest training set a site may claim: the bound of a ``cases`` claim.
        robust, clip_bound, clip_multiple, trim_fraction: the robust rule (``federation.*`` keys of the same
            names; :class:`~bsf.federation.robust.RobustRule`); ``none``: the weighted mean.
        modalities: the model's input channels by name (``model.modalities``): each modality's first-layer
            filters averaged over the sites holding it; empty: over all sites.
        scaffold: SCAFFOLD (:mod:`bsf.fl.scaffold`): each result's meta ``scaffold_c_diff`` is checked like an update
            (a bad one rejects the result) and the accepted ones are averaged with the update's weight and rule
            into the round meta's ``scaffold_c_diff``.
        fedcost_alpha: ``weigh_by: fedcostwavg``'s alpha (:mod:`bsf.federation.fedcost`).
        tasks: ``federation.tasks``: one head per task, each averaged over its task's sites (see the module docstring).
        norm_bound, norm_bound_multiple, norm_bound_rms: the norm bound (``federation.*`` keys of the same names;
            :class:`~bsf.federation.update_checks.NormBound`), on by default: an update far outside the round's
            others, or above the RMS ceiling, is refused by name when the round closes.
    """

    #: whether this aggregator sees the updates' values (an encrypted job's does not: no norm bound there)
    sees_plaintext = True

    def __init__(self, weigh_by: str = "steps", min_accepted: int = 1, expected_steps: int | None = None,
                 max_cases: int = MAX_CLAIM, robust: str = "none", clip_bound: float = 0.0, clip_multiple: float = 0.0,
                 trim_fraction: float = 0.2, modalities: Sequence[str] = (), scaffold: bool = False,
                 fedcost_alpha: float = 0.5, tasks: Sequence[str] = (), norm_bound: bool = True,
                 norm_bound_multiple: float = NORM_BOUND_MULTIPLE, norm_bound_rms: float = NORM_BOUND_RMS):
        super().__init__()
        if weigh_by not in WEIGHTINGS:
            raise ConfigError(f"weigh_by must be one of {WEIGHTINGS}, got {weigh_by!r}")
        for name, value in (("expected_steps", expected_steps), ("max_cases", max_cases)):
            if value is not None and (type(value) is not int or not 1 <= value <= MAX_CLAIM):
                raise ConfigError(f"{name} must be an int in [1, {MAX_CLAIM}], got {value!r}")
        self.weigh_by = weigh_by
        self.min_accepted = max(1, int(min_accepted))
        self.expected_steps = expected_steps
        self.max_cases = max_cases
        if robust not in ROBUST_RULES:
            raise ConfigError(f"robust must be one of {ROBUST_RULES}, got {robust!r}")
        self.robust, self.clip_bound, self.clip_multiple, self.trim_fraction = robust, clip_bound, clip_multiple, trim_fraction
        rule = RobustRule(robust, clip_bound, clip_multiple, trim_fraction)
        self.rule = rule if rule.needs_all_updates else None
        # NVFlare's job export reads the constructor's arguments back by name: each is kept as it was given
        self.norm_bound, self.norm_bound_multiple, self.norm_bound_rms = norm_bound, norm_bound_multiple, norm_bound_rms
        try:
            self.bound = NormBound(norm_bound_multiple, norm_bound_rms, bool(norm_bound))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if modalities and self.rule is not None:
            raise ConfigError(f"robust rule {robust} is not supported with per-modality aggregation (model.modalities) yet")
        self.modalities = tuple(modalities)
        self.by_modality = ModalityAggregation(self.modalities) if self.modalities else None
        if modalities and weigh_by == "fedcostwavg":
            raise ConfigError("weigh_by fedcostwavg is not supported with per-modality aggregation (model.modalities) yet")
        self.scaffold, self.fedcost_alpha = scaffold, fedcost_alpha
        self._controls: list[tuple[str, dict[str, np.ndarray], float]] = []  # SCAFFOLD: the round's control changes
        self._ratios: dict[str, float] = {}  # fedcostwavg: each accepted site's loss improvement
        self._updates: list[tuple[str, dict[str, np.ndarray], float]] = []  # the round's updates (robust rules)
        self.tasks = tuple(tasks)
        if self.tasks and (self.keeps_updates or scaffold):
            raise ConfigError("per-task heads (federation.tasks) work with the weighted mean only: no robust rule, "
                              "fedcostwavg or SCAFFOLD")
        self._mean = WeightedMean()  # each key over the sites that sent it: a task's head over its own sites
        self._task_metrics: dict[str, WeightedMean] = {}  # tasks: each task's sites' metrics
        self._params_type = None
        self._rejected: list[tuple[str, str]] = []
        self._notes: dict[str, str] = {}
        self._metrics = WeightedMean()
        self._reference: dict[str, tuple[int, ...]] | None = None
        self._global: Mapping[str, Any] | None = None  # the round's global model: what a FULL update is measured against
        self._received: list[_Received] = []  # the round's results that passed the checks, in arrival order
        self._first_update: dict[str, np.ndarray] | None = None
        self._round_checks: dict[str, Any] = {}  # the norm bound's report and a degenerate round's note
        self._told_encrypted = False

    @classmethod
    def for_federation(cls, fed: FederationConfig, modalities: Sequence[str] = ()) -> "CheckedFedAvgAggregator":
        """The aggregator of a job's (validated) federation section and its model's ``model.modalities``."""
        return cls(weigh_by=fed.weigh_by, min_accepted=fed.min_clients, expected_steps=fed.local_steps, robust=fed.robust,
                   clip_bound=fed.clip_bound, clip_multiple=fed.clip_multiple, trim_fraction=fed.trim_fraction,
                   modalities=modalities, scaffold=fed.algorithm == "scaffold", fedcost_alpha=fed.fedcost_alpha,
                   tasks=fed.tasks, norm_bound=fed.norm_bound, norm_bound_multiple=fed.norm_bound_multiple,
                   norm_bound_rms=fed.norm_bound_rms)

    @property
    def max_weight(self) -> float:
        """The largest weight one update can have under this job's weighting."""
        if self.weigh_by == "steps":
            return float(self.expected_steps or MAX_CLAIM)
        return float(self.max_cases) if self.weigh_by in ("cases", "fedcostwavg") else 1.0

    @property
    def keeps_updates(self) -> bool:
        """Whether the round is aggregated from its float32 updates at once (a robust rule, or weights known only
        then) rather than by the streaming weighted mean."""
        return self.rule is not None or self.weigh_by == "fedcostwavg"

    def set_reference(self, global_params: Mapping[str, Any]) -> None:
        """Record the global model's keys and shapes (the controller calls this once the model is loaded); its
        values are the round's global model until :meth:`start_round` gives the next one."""
        self._reference = {k: tuple(np.shape(v)) for k, v in global_params.items()}
        self._global = global_params

    def start_round(self, global_params: Mapping[str, Any] | None) -> None:
        """The global model this round's sites start from (the controller calls this as it sends it): a FULL
        update's norm is that of its difference to it."""
        if global_params and self.sees_plaintext:
            self._global = global_params

    @property
    def rejected(self) -> list[tuple[str, str]]:
        """``(site, reason)`` of the updates rejected in the current round."""
        return list(self._rejected)

    def reject(self, site: str, reason: str) -> bool:
        """Count ``site``'s result of this round as rejected for ``reason`` (logged; in the round's meta)."""
        self._rejected.append((site, reason))
        log.error("rejected the update from site %s: %s", site, reason)
        return False

    # -- ModelAggregator API
    def reset_stats(self) -> None:
        self._mean.reset()
        self._updates = []
        self._metrics.reset()
        self._params_type = None
        self._rejected = []
        self._notes = {}
        self._first_update = None
        self._controls = []
        self._ratios = {}
        self._task_metrics = {}
        self._received = []
        self._round_checks = {}
        if self.by_modality is not None:
            self.by_modality.reset()

    def _norm(self, site: str, params: Mapping[str, Any], params_type: Any) -> RoundNorm:
        """The update's norm: of the difference itself, or of FULL weights minus the round's global model."""
        reference = self._global if params_type == ParamsType.FULL else None
        return RoundNorm(site, update_norm(params, reference), update_size(params))

    def accept_model(self, model: FLModel) -> bool:
        meta = model.meta or {}
        site = str(meta.get("client_name", "unknown"))
        if self._reference is None:
            return self.reject(site, "the server has no global model to check the update against")
        params_type = model.params_type
        if params_type not in (ParamsType.FULL, ParamsType.DIFF):
            return self.reject(site, f"unsupported params type {params_type}")
        if self._params_type is not None and params_type != self._params_type:
            return self.reject(site, f"params type {params_type} differs from this round's {self._params_type}")
        if self.rule is not None and params_type != ParamsType.DIFF:
            return self.reject(site, f"robust rule {self.rule.rule} needs weight differences, got {params_type}")
        if not isinstance(model.params, Mapping) or not model.params:  # nothing below may touch a non-mapping
            return self.reject(site, "; ".join(check_update(model.params, self._reference)))
        reference, task = self._reference, None
        if self.tasks:  # the shared keys and one task's head: checked against those keys of the global model
            task, problems = update_task(model.params, reference)
            if problems:
                return self.reject(site, "; ".join(problems))
            reference = {k: v for k, v in reference.items() if k in model.params}
        problems = check_update(model.params, reference)
        if problems:
            return self.reject(site, "; ".join(problems))
        controls = meta.get(CONTROL_DIFF)
        if self.scaffold and (problems := check_update(controls if isinstance(controls, Mapping) else None, self._reference)):
            return self.reject(site, f"SCAFFOLD control variates (meta {CONTROL_DIFF!r}): " + "; ".join(problems))
        held = None
        if self.by_modality is not None:
            try:
                held = self.by_modality.held(meta)
            except ModalityMetaError as exc:
                return self.reject(site, str(exc))
        weight, note = update_weight(meta, self.weigh_by, self.max_weight)
        if self.weigh_by == "fedcostwavg":
            self._ratios[site], ratio_note = cost_ratio(model.metrics)
            note = "; ".join(n for n in (note, ratio_note) if n)
        if note:
            self._notes[site] = note
            log.warning("site %s: %s", site, note)
        self._params_type = params_type
        received = _Received(site, model.params, weight, self._norm(site, model.params, params_type), held=held, task=task)
        if self.scaffold:
            received.controls = {k: np.asarray(v, dtype=np.float32) for k, v in controls.items()}
            received.control_norm = RoundNorm(site, update_norm(received.controls), update_size(received.controls))
        received.metrics = {k: float(v) for k, v in (model.metrics or {}).items() if _is_real(v) and math.isfinite(float(v))}
        self._received.append(received)
        log.info("accepted the update from site %s (weight %s, %s, norm %.6g)", site, weight, params_type,
                 received.norm.norm)
        return True

    def _close_round(self) -> list[_Received]:
        """The norm bound over the round's checked results (refusing by name), then the kept ones into the means.

        The kept results enter in their arrival order, the order in which the streaming mean took them before: the
        round's mean is the same, bit for bit.
        """
        received = self._received
        reasons, report = self.bound.refusals([r.norm for r in received])
        if self.scaffold and self.bound.active and received:  # the control changes under the same bound
            control_reasons, control_report = self.bound.refusals([r.control_norm for r in received],
                                                                  what="SCAFFOLD control change")
            reasons = [a or (f"meta {CONTROL_DIFF!r}: {b}" if b else None) for a, b in zip(reasons, control_reasons)]
            report["scaffold_control"] = control_report
        if received:
            self._round_checks["norm_bound"] = report
        kept = []
        for r, reason in zip(received, reasons):
            if reason is None:
                kept.append(r)
            else:
                self.reject(r.site, reason)
                self._notes.pop(r.site, None)
                self._ratios.pop(r.site, None)
        if report.get("refused"):
            log.warning("REFUSED the update(s) of %s by the norm bound (norms %s)", sorted(report["refused"]),
                        {s: v["norm"] for s, v in report["refused"].items()})
        degenerate = degenerate_round([r.norm for r in kept])
        if degenerate:
            self._round_checks["degenerate"] = degenerate
            log.warning(degenerate)
        for r in kept:
            params = r.params
            if self.by_modality is not None:
                try:
                    params = self.by_modality.take(params, r.weight, r.held, r.site)
                except ModalityMetaError as exc:
                    self.reject(r.site, str(exc))
                    continue
            if self.scaffold:
                self._controls.append((r.site, r.controls, r.weight))
            self._mean.add({} if self.keeps_updates else params, r.weight, r.site)
            if self.keeps_updates:
                self._updates.append((r.site, {k: np.asarray(v, dtype=np.float32) for k, v in r.params.items()}, r.weight))
            if r.metrics:
                self._metrics.add(r.metrics, r.weight, r.site)
                if r.task is not None:
                    self._task_metrics.setdefault(r.task, WeightedMean()).add(r.metrics, r.weight, r.site)
        contributors = {name for name, _ in self._mean.contributors}
        kept = [r for r in kept if r.site in contributors]
        if len(kept) == 1 and not self.keeps_updates:  # one accepted update: passed on bit for bit
            self._first_update = {k: np.asarray(v, dtype=np.float32) for k, v in kept[0].params.items()}
        self._received = []
        return kept

    def _round_meta(self) -> dict[str, Any]:
        """What the round record says about the sites: who counted with which weight, who was rejected and why."""
        meta = {
            "accepted_sites": [name for name, _ in self._mean.contributors],
            "rejected_sites": [name for name, _ in self._rejected],
            "rejections": [{"site": name, "reason": reason} for name, reason in self._rejected],
            "weights": {name: weight for name, weight in self._mean.contributors},
            "weight_notes": dict(self._notes),
            "weigh_by": self.weigh_by,
            **self._round_checks,
        }
        if not self.sees_plaintext and self.bound.active:
            why = ("the server holds ciphertexts only and cannot measure the sites' update norms: no update is refused "
                   "by its norm (federation.norm_bound does not apply with encryption: he; each site's result guard "
                   "checks its own update's keys, shapes and finite values before encrypting it)")
            meta["norm_bound"] = {"applied": False, "reason": why}
            if not self._told_encrypted:
                log.warning("encrypted updates: %s", why)
                self._told_encrypted = True
        return meta

    def _final_weights(self, meta: dict[str, Any]) -> dict[str, float] | None:
        """fedcostwavg: site -> this round's weight (also into ``meta``'s ``weights`` and ``fedcostwavg``); else ``None``."""
        if self.weigh_by != "fedcostwavg":
            return None
        cases = dict(meta["weights"])
        ratios = {site: ratio for site, ratio in self._ratios.items() if site in cases}
        weights = fedcost_weights(cases, ratios, self.fedcost_alpha)
        meta["weights"] = weights
        meta["fedcostwavg"] = {"alpha": self.fedcost_alpha, "cases": cases, "loss_improvement": ratios}
        return weights

    def aggregate_model(self) -> FLModel:
        self._close_round()
        meta = self._round_meta()
        accepted, rejected = meta["accepted_sites"], meta["rejected_sites"]
        if len(accepted) < self.min_accepted:
            message = (
                f"only {len(accepted)} acceptable update(s) (need {self.min_accepted}); rejected: {rejected}. "
                "The global model stays unchanged this round."
            )
            log.error(message)
            # an empty difference leaves every global key as it is
            result = FLModel(params={}, params_type=ParamsType.DIFF, meta={**meta, "round_skipped": True})
        else:
            weights = self._final_weights(meta)
            if self.scaffold:
                meta[CONTROL_DIFF] = robust_aggregate(_reweighed(self._controls, weights), self.rule or RobustRule())[0]
            if self.keeps_updates and self.rule is None:  # fedcostwavg: the weighted mean with this round's weights
                params = robust_aggregate(_reweighed(self._updates, weights), RobustRule())[0]
            elif self.rule is not None:
                params, meta["robust"] = robust_aggregate(_reweighed(self._updates, weights), self.rule)
                if meta["robust"].get("clipped"):
                    log.warning("clipped the update(s) of %s to the norm bound %.6g", sorted(meta["robust"]["clipped"]),
                                meta["robust"]["bound"])
            elif len(accepted) == 1 and self._first_update is not None:
                params = self._first_update  # one accepted update: bit for bit (a weighted mean of one can differ by an ulp)
            else:
                params = self._mean.result()
            if self.by_modality is not None:
                meta["modalities"] = self.by_modality.round_meta()
                if params is not self._first_update:
                    params = self.by_modality.finish(params)
            result = FLModel(params=params, params_type=self._params_type, meta=meta)
            if rejected:
                log.warning("aggregated %d update(s) without the rejected site(s) %s", len(accepted), rejected)
        metrics = {k: float(v) for k, v in self._metrics.result().items()}
        for task, mean in sorted(self._task_metrics.items()):  # each task's metrics over its own sites
            metrics.update({f"{task}/{k}": float(v) for k, v in mean.result().items()})
        result.metrics = metrics or None
        self.reset_stats()
        return result
