"""Which validated global model is the best: the server's choice among every global model the sites validated,
the last one included (plain Python, no NVFlare; :class:`bsf.fl.controller.CheckedFedAvg` drives it and writes its
record to ``bsf_model_selection.json``, :data:`bsf.federation.run_folders.SELECTION_FILE`)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if not isinstance(value, bool) and math.isfinite(number) else None


class ModelSelection:
    """Which validated global model is the best, by the job's metric.

    Each candidate is a global model (``model_round``: the round it is the result of) with its metric at each site
    that validated it; its value is the mean over those sites. :meth:`offer` says whether it beats every earlier
    candidate (strictly: on a tie the earlier one stays).

    Args:
        metric: the site metric that decides (e.g. ``val_dice_mean``, ``val_reconstruction_l1``).
        lower_is_better: the direction (SSL losses: lower is better).
    """

    def __init__(self, metric: str, lower_is_better: bool = False):
        self.metric = metric
        self.lower_is_better = bool(lower_is_better)
        self.candidates: list[dict[str, Any]] = []
        self.best: Optional[dict[str, Any]] = None

    def better(self, value: float, than: float) -> bool:
        return value < than if self.lower_is_better else value > than

    def offer(self, model_round: int, site_values: Mapping[str, Any], validated: str) -> bool:
        """Add the global model after round ``model_round`` with its per-site values; True when it is the new best.
        ``validated``: when the sites validated it (e.g. ``round 3``, ``after the last round``). A model no site
        reported a finite value for is recorded with value ``None`` and is never the best."""
        values = {site: v for site, v in ((s, _finite(x)) for s, x in sorted(site_values.items())) if v is not None}
        value = sum(values.values()) / len(values) if values else None
        candidate = {"model_round": int(model_round), "validated": validated, "value": value, "sites": values}
        self.candidates.append(candidate)
        if value is None or (self.best is not None and not self.better(value, self.best["value"])):
            return False
        self.best = candidate
        return True

    def to_dict(self, last_round: Optional[int] = None) -> dict[str, Any]:
        """The record of the choice (``bsf_model_selection.json``)."""
        best_round = self.best["model_round"] if self.best else None
        return {
            "metric": self.metric,
            "lower_is_better": self.lower_is_better,
            "rule": f"mean of {self.metric} over the sites that validated the model, "
                    f"{'lowest' if self.lower_is_better else 'highest'} wins, the earlier on a tie",
            "candidates": list(self.candidates),
            "best": self.best,
            "best_model_round": best_round,
            "last_round": last_round,
            "last_model_validated": any(c["model_round"] == last_round and c["value"] is not None for c in self.candidates),
            "best_is_last": best_round is not None and best_round == last_round,
        }
