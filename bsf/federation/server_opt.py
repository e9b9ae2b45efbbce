"""FedOpt's server step in plain NumPy: momentum or Adam on the round's aggregated weight difference.

Reddi et al. 2021, "Adaptive Federated Optimization" (Algorithm 2, no bias correction). With the round's
aggregate ``d`` (the weighted mean of the sites' ``w_site - w_global``; the negated pseudo-gradient):

* ``momentum`` (FedAvgM): ``m = beta1 * m + d``;  step ``= lr * m``;
* ``adam`` (FedAdam):    ``m = beta1 * m + (1 - beta1) * d``,  ``v = beta2 * v + (1 - beta2) * d**2``;
  step ``= lr * m / (sqrt(v) + eps)``.

The new global model is ``w_global + step``. ``momentum`` with ``lr=1, beta1=0`` is FedAvg exactly.
The moments live in the server process: a server restart (``bsf deploy resume``) starts them at zero.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from bsf.config import FederationConfig


class ServerOptimizer:
    """The server's optimiser state (first and second moments per key, float64).

    Args:
        kind: ``momentum`` | ``adam`` (:data:`bsf.config.SERVER_OPTIMIZERS`).
        lr, beta1, beta2, eps: see the module docstring (validated as ``federation.fedopt_*``).
    """

    def __init__(self, kind: str = "momentum", lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.99,
                 eps: float = 1e-3):
        self.kind, self.lr, self.beta1, self.beta2, self.eps = kind, lr, beta1, beta2, eps
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(cls, fed: FederationConfig) -> "ServerOptimizer":
        return cls(fed.fedopt_optimizer, fed.fedopt_lr, fed.fedopt_beta1, fed.fedopt_beta2, fed.fedopt_eps)

    def step(self, diff: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The global model's step (key -> float32 array, the shapes of ``diff``) for the round's aggregate ``diff``."""
        out = {}
        for key, value in diff.items():
            d = np.asarray(value, dtype=np.float64)
            m = self.m.get(key, np.zeros_like(d))
            if self.kind == "momentum":
                m = self.beta1 * m + d
                step = self.lr * m
            else:
                m = self.beta1 * m + (1 - self.beta1) * d
                v = self.beta2 * self.v.get(key, np.zeros_like(d)) + (1 - self.beta2) * d * d
                self.v[key] = v
                step = self.lr * m / (np.sqrt(v) + self.eps)
            self.m[key] = m
            out[key] = step.astype(np.float32)
        return out
