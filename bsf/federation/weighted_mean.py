"""The server's weighted mean of the sites' updates (plain NumPy; no NVFlare, no torch).

Each key is averaged over the updates that hold it::

    W[k] = sum_{s holds k} w_s * W_s[k] / sum_{s holds k} w_s

With every key in every update (every job but Stage 3 across tasks) this is the plain weighted mean, to the bit:
each key's summed weight is the same sum in the same order as the total. Across tasks
(:mod:`bsf.federation.task_heads`) a task's head is only in its own sites' updates, so it is averaged over
those sites alone.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

__all__ = ["WeightedMean"]


class WeightedMean:
    """Running weighted mean of dicts of arrays, each key over the updates holding it (float64 sums, float32 result)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._weights: dict[str, float] = {}
        self.contributors: list[tuple[str, float]] = []

    def add(self, params: Mapping[str, Any], weight: float, name: str = "?") -> None:
        """Add ``params`` (key -> array, any shape) with a positive finite ``weight``."""
        if weight <= 0 or not math.isfinite(weight):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        for k, v in params.items():
            contribution = np.asarray(v, dtype=np.float64) * weight
            if k in self._sums:
                self._sums[k] += contribution
                self._weights[k] += weight
            else:
                self._sums[k], self._weights[k] = contribution, weight
        self.contributors.append((name, weight))

    def __len__(self) -> int:
        return len(self.contributors)

    def result(self) -> dict[str, np.ndarray]:
        """Key -> float32 weighted mean over the updates holding that key (same shapes); empty before any ``add``."""
        return {k: (s / self._weights[k]).astype(np.float32) for k, s in self._sums.items()}
