"""The site's local objective for the job's algorithm: NVFlare's PyTorch helpers handed to the NVFlare-free SiteTrainer.

``fedprox``: :class:`FedProxTerm` (``PTFedProxLoss``); ``scaffold``: :class:`~bsf.fl.scaffold.ScaffoldTerm`
(``PTScaffoldHelper``); FedAvg and the server-side algorithms: none.
"""

from __future__ import annotations

import copy
from typing import Any

from bsf.fl.scaffold import ScaffoldTerm


class FedProxTerm:
    """FedProx's proximal term ``mu/2 ||w - w_global||^2`` over the aggregated part, with NVFlare's ``PTFedProxLoss``.

    Args:
        module: the aggregated part of the site's model (``swinViT`` for scope ``encoder``, else the model).
        mu: ``federation.fedprox_mu``.
    """

    def __init__(self, module: Any, mu: float):
        from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

        self.module, self.loss, self.reference = module, PTFedProxLoss(mu=mu), None

    def start_round(self, global_meta: Any = None) -> None:
        """Freeze a copy of the round's global model (just loaded into ``module``; its meta is not needed)."""
        self.reference = copy.deepcopy(self.module).requires_grad_(False)

    def __call__(self):
        """The proximal term (a scalar tensor with gradients into ``module``)."""
        return self.loss(self.module, self.reference)


def local_objective(engine: Any, settings: Any) -> FedProxTerm | ScaffoldTerm | None:
    """The site's local objective for the job's algorithm (``fedprox``: :class:`FedProxTerm`, ``scaffold``:
    :class:`~bsf.fl.scaffold.ScaffoldTerm`), else ``None``."""
    if settings.algorithm == "scaffold":
        return ScaffoldTerm.for_engine(engine, settings.scope)
    if settings.algorithm != "fedprox":
        return None
    return FedProxTerm(engine.model.swinViT if settings.scope == "encoder" else engine.model, settings.fedprox_mu)
