"""What the server checks in a round's updates before it averages them, in plain NumPy (no NVFlare, no torch).

Three checks, in this order (the aggregator, :class:`bsf.fl.aggregation.CheckedFedAvgAggregator`, applies them and
names the site, and the rest of the round goes on with the other sites):

1. **Each update alone** (:func:`check_update`): a mapping ``key -> NumPy array`` with exactly the global model's
   keys, each array of that key's global shape (a ragged or nested Python list, a string, ``None`` ... is no array:
   rejected by key, saying what arrived and what shape was expected), real floating point, finite once cast to
   float32 (the global model's dtype).
2. **The round together** (:class:`NormBound`): each update's L2 norm (:func:`update_norm`, over all its tensors
   together; a FULL update is measured by its *difference to the round's global model*, never by its weights) is
   bounded:

   * in a round of at least :data:`MEDIAN_MIN_UPDATES` (3) updates, by ``multiple x`` the round's median update
     norm (``federation.norm_bound_multiple``, default 10): one site can move the median only by being the
     majority, so a wild update is refused by comparison with what the typical site sent;
   * in every round, by a ceiling on the update's RMS per value (``federation.norm_bound_rms``, default 100), i.e.
     ``norm <= rms_ceiling x sqrt(number of values)``: in a round of one or two updates a median says nothing, and
     a majority of wild sites cannot lift it either.

   An update above its bound is **refused** (not scaled): the record names the site, its norm and the bound.
   ``federation.norm_bound: off`` opts out (the norms are still recorded).
3. **Degenerate rounds** (:func:`degenerate_round`): when every accepted update is all zeros (a FULL one: equal to
   the global model) the round is named as such (round record and a warning): it is no progress.

The default ceiling (RMS 100 per value), derived: AdamW moves a weight by at most about
``lr x (1 - beta1) / sqrt(1 - beta2)`` per step (3.2 lr with the default betas; about ``lr`` once its moments
settle), so an honest round moves weights by an RMS of at most about ``lr x local_steps``. The shipped presets'
largest learning rate is 5e-3 (Stage 2 ATLAS): a round stays below the ceiling up to 6,000 local steps even if
every step were the largest possible in the same direction, and up to about 20,000 at ``lr`` per step. Measured
on the test-size model (64^3, feature size 12; one honest round of ``bsf.federation.site_trainer.SiteTrainer``):
0.3 to 0.4 lr per step: RMS 5e-4 for Stage 1 (lr 3e-4, 4 steps), 2.3e-3 for Stage 3 BraTS (lr 1e-3, 8 steps,
the whole network), 1.2e-2 for Stage 2 ATLAS at the paper's 5e-3 (8 steps), while the weights themselves have an
RMS of 0.03 to 0.08: the ceiling is four orders of magnitude above an honest round and 1,000 times the weights.
An RMS is per value, so the same ceiling holds for the paper-size model. A float32 update of norm 1e30 is above
it for any model of fewer than 1e56 values.

:func:`update_norm` is the one norm of an update in the project: the robust ``clip`` rule
(:mod:`bsf.federation.robust`) and any later differential-privacy clipping (:func:`clip_to_norm`) measure with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from bsf.config import NORM_BOUND_MULTIPLE, NORM_BOUND_RMS, FederationConfig

__all__ = [
    "FLOAT_DTYPES",
    "MEDIAN_MIN_UPDATES",
    "NormBound",
    "RoundNorm",
    "check_update",
    "clip_to_norm",
    "degenerate_round",
    "describe_value",
    "float32_problem",
    "is_array",
    "non_finite_tensors",
    "update_norm",
    "update_size",
]

#: the dtypes an update's tensors may have: real floating point of 16, 32 or 64 bits
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: the fewest updates in a round for its median norm to bound them (one or two: only the RMS ceiling)
MEDIAN_MIN_UPDATES = 3


# ------------------------------------------------------------------ one update alone
def is_array(value: Any) -> bool:
    """Whether ``value`` is a tensor an update may carry: a NumPy array (or NumPy scalar); a list is not."""
    return isinstance(value, (np.ndarray, np.generic))


def describe_value(value: Any) -> str:
    """What a non-array value is, for a message: ``a list of shape (2, 3)``, ``a ragged list``, ``a str`` ..."""
    kind = type(value).__name__
    if isinstance(value, (list, tuple)):
        try:
            return f"a {kind} of shape {tuple(np.shape(value))}, not an array"
        except ValueError:  # nested sequences of unequal lengths
            return f"a ragged {kind} (nested sequences of unequal lengths), not an array"
    return f"a {kind}, not an array"


def float32_problem(value: Any) -> str | None:
    """Why an array cannot enter a float32 global model: ``"dtype"``, ``"nan_inf"``, ``"overflow"``, or ``None``."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError):  # a ragged list or another object with no array form
        return "dtype"
    if arr.dtype not in FLOAT_DTYPES:
        return "dtype"
    if not np.isfinite(arr).all():
        return "nan_inf"
    if arr.dtype.itemsize > 4:
        with np.errstate(over="ignore"):
            if not np.isfinite(arr.astype(np.float32)).all():
                return "overflow"
    return None


def non_finite_tensors(params: Mapping[str, Any]) -> list[str]:
    """Keys of the tensors that are not finite float32 (NaN, Inf, beyond float32's range, or not floating)."""
    return [k for k, v in params.items() if float32_problem(v) is not None]


def check_update(params: Any, reference: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Problems that make ``params`` unusable against a global model with ``reference`` shapes.

    Returns an empty list when the update is acceptable: a mapping with exactly the reference keys, each value a
    NumPy array of the reference shape, of a real floating dtype (float16/32/64), finite everywhere once cast to
    float32. Messages name keys and shapes (never values); nothing here raises on a malformed update.
    """
    if params is not None and not isinstance(params, Mapping):
        return [f"the update is a {type(params).__name__}, not a mapping of key -> array"]
    if not params:
        return ["the update is empty"]
    problems = []
    missing = sorted(set(reference) - set(params))
    unknown = sorted(set(params) - set(reference))
    if missing:
        problems.append(f"{len(missing)} global key(s) missing, e.g. {missing[:3]}")
    if unknown:
        problems.append(f"{len(unknown)} key(s) not in the global model, e.g. {unknown[:3]}")
    not_arrays = [k for k, v in params.items() if not is_array(v)]
    if not_arrays:
        k = not_arrays[0]
        expected = f"an array of shape {tuple(reference[k])}" if k in reference else "an array"
        problems.append(f"{len(not_arrays)} value(s) not an array, e.g. {k}: {describe_value(params[k])} "
                        f"(expected {expected})")
    arrays = {k: v for k, v in params.items() if is_array(v)}
    bad_shape = [k for k, v in arrays.items() if k in reference and np.shape(v) != tuple(reference[k])]
    if bad_shape:
        k = bad_shape[0]
        problems.append(
            f"{len(bad_shape)} shape mismatch(es), e.g. {k}: {np.shape(arrays[k])} vs global {tuple(reference[k])}"
        )
    found: dict[str, list[str]] = {"dtype": [], "nan_inf": [], "overflow": []}
    for k, v in arrays.items():
        problem = float32_problem(v)
        if problem is not None:
            found[problem].append(k)
    if found["dtype"]:
        k = found["dtype"][0]
        problems.append(
            f"{len(found['dtype'])} tensor(s) not real floating point (float16/32/64), e.g. {k} ({np.asarray(arrays[k]).dtype})"
        )
    if found["nan_inf"]:
        problems.append(f"{len(found['nan_inf'])} tensor(s) contain NaN/Inf, e.g. {found['nan_inf'][:3]}")
    if found["overflow"]:
        problems.append(
            f"{len(found['overflow'])} tensor(s) overflow float32 (the global model's dtype: NaN/Inf after the cast), "
            f"e.g. {found['overflow'][:3]}"
        )
    return problems


# ------------------------------------------------------------------ norms
def update_norm(params: Mapping[str, Any], reference: Mapping[str, Any] | None = None) -> float:
    """The L2 norm of an update over all its tensors together (accumulated in float64).

    Args:
        params: key -> array: a weight difference, or (with ``reference``) full weights.
        reference: the global model the weights are measured against (``None``: ``params`` is a difference):
            the norm of ``params - reference`` over ``params``' keys.
    """
    if reference is None:
        return math.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in params.values()))
    return math.sqrt(sum(
        float(np.sum(np.square(np.asarray(v, dtype=np.float64) - np.asarray(reference[k], dtype=np.float64))))
        for k, v in params.items()))


def update_size(params: Mapping[str, Any]) -> int:
    """The number of values in an update (all its tensors together)."""
    return int(sum(np.size(v) for v in params.values()))


def clip_to_norm(params: Mapping[str, Any], bound: float, norm: float | None = None) -> tuple[dict[str, Any], float]:
    """``params`` scaled to L2 norm ``bound`` when longer (float64), and the factor (1.0: as it was, not copied).

    ``norm`` is :func:`update_norm` of ``params`` when the caller has it already.
    """
    norm = update_norm(params) if norm is None else norm
    if norm <= bound:
        return dict(params), 1.0
    factor = bound / norm
    return {k: np.asarray(v, dtype=np.float64) * factor for k, v in params.items()}, factor


def _g(value: float) -> float:
    """A norm for a JSON record: 6 significant digits (a rounding to decimals would write small norms as 0)."""
    return float(f"{value:.6g}")


@dataclass(frozen=True)
class RoundNorm:
    """One update of a round as the norm bound sees it: who sent it, its L2 norm, how many values it has."""

    site: str
    norm: float
    size: int


@dataclass(frozen=True)
class NormBound:
    """The server's bound on the norm of the sites' updates (see the module docstring).

    Args:
        multiple: refuse an update above ``multiple x`` the round's median update norm, in rounds of at least
            :data:`MEDIAN_MIN_UPDATES` updates (``>= 1``; 0: no relative bound).
        rms_ceiling: refuse, in every round, an update whose RMS per value is above this, i.e. whose norm is above
            ``rms_ceiling x sqrt(its number of values)`` (``> 0``; 0: no ceiling).
        enabled: ``False`` (``federation.norm_bound: off``): refuse nothing (the norms are still reported).
    """

    multiple: float = NORM_BOUND_MULTIPLE
    rms_ceiling: float = NORM_BOUND_RMS
    enabled: bool = True
    min_updates: int = field(default=MEDIAN_MIN_UPDATES, repr=False)

    def __post_init__(self) -> None:
        for name in ("multiple", "rms_ceiling"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"NormBound.{name} must be a finite number >= 0, got {value!r}")
        if 0 < self.multiple < 1:
            raise ValueError(f"NormBound.multiple must be 0 (off) or >= 1, got {self.multiple}")

    @classmethod
    def from_config(cls, fed: FederationConfig) -> "NormBound":
        """The bound a job's (validated) federation section chooses."""
        return cls(fed.norm_bound_multiple, fed.norm_bound_rms, fed.norm_bound)

    @classmethod
    def off(cls) -> "NormBound":
        return cls(enabled=False)

    @property
    def active(self) -> bool:
        """Whether the bound can refuse anything."""
        return self.enabled and (self.multiple > 0 or self.rms_ceiling > 0)

    def median_bound(self, norms: Sequence[float]) -> tuple[float | None, float | None]:
        """``(median norm, multiple x median)`` of a round; ``None`` where they do not apply.

        The median needs :attr:`min_updates` updates; a median of 0 (most sites sent nothing) bounds nothing.
        """
        if self.multiple <= 0 or len(norms) < self.min_updates:
            return None, None
        median = float(np.median(np.asarray(norms, dtype=np.float64)))
        return median, (self.multiple * median if median > 0 else None)

    def ceiling(self, size: int) -> float | None:
        """The L2 ceiling of an update of ``size`` values (``None``: no ceiling)."""
        return self.rms_ceiling * math.sqrt(size) if self.rms_ceiling > 0 and size > 0 else None

    def refusals(self, updates: Sequence[RoundNorm], what: str = "update") -> tuple[list[str | None], dict[str, Any]]:
        """Which of a round's updates are refused, and a JSON-ready report for the round record.

        Args:
            updates: the round's updates that passed :func:`check_update`, in arrival order.
            what: what is measured, for the messages (``update``, ``SCAFFOLD control change``).

        Returns:
            ``reasons`` aligned with ``updates`` (``None``: kept; else why it is refused, naming its norm and the
            bound) and the report: whether the bound applied, the settings, the median and the relative bound (or
            ``None``), every site's norm and the refused sites with their norm, bound and which bound it was.
        """
        norms = [u.norm for u in updates]
        report: dict[str, Any] = {"applied": self.active, "norms": {u.site: _g(u.norm) for u in updates}}
        if not self.active:
            return [None] * len(updates), report
        median, relative = self.median_bound(norms)
        report.update(multiple=self.multiple, rms_ceiling=self.rms_ceiling,
                      median_norm=None if median is None else _g(median),
                      relative_bound=None if relative is None else _g(relative), refused={})
        reasons: list[str | None] = []
        for u in updates:
            ceiling = self.ceiling(u.size)
            bounds = []
            if relative is not None:
                bounds.append((relative, f"{self.multiple:g} x the round's median {what} norm {median:.6g}"))
            if ceiling is not None:
                bounds.append((ceiling, f"the ceiling {self.rms_ceiling:g} RMS per value x sqrt({u.size} values)"))
            bound, how = min(bounds, key=lambda b: b[0]) if bounds else (math.inf, "")
            if u.norm > bound:
                reasons.append(f"its {what} norm {u.norm:.6g} is above the bound {bound:.6g} ({how}); refused")
                report["refused"][u.site] = {"norm": _g(u.norm), "bound": _g(bound),
                                             "by": "median" if relative is not None and bound == relative else "ceiling"}
            else:
                reasons.append(None)
        return reasons, report


def degenerate_round(updates: Sequence[RoundNorm]) -> str | None:
    """A message when every update of a round is all zeros (norm 0), else ``None`` (also for no updates)."""
    if not updates or any(u.norm != 0 for u in updates):
        return None
    sites = ", ".join(u.site for u in updates)
    return (f"degenerate round: every accepted update ({sites}) is all zeros (no change to the global model); "
            "the round is no progress")
