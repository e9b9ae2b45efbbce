"""SCAFFOLD (Karimireddy et al. 2020) at the site, with NVFlare's ``PTScaffoldHelper``, and its fixed meta scheme.

What travels, in the meta of the round's messages, keyed like the aggregated part of the model (the exchanged keys):

* server -> site: :data:`CONTROL_GLOBAL` = the global control variate ``c`` (key -> float32 array);
* site -> server: :data:`CONTROL_DIFF` = the change of the site's control variate in this round,
  ``c_i+ - c_i`` (key -> float32 array, every exchanged key, zeros where a parameter is frozen).

The server (:class:`bsf.fl.controller.CheckedFedAvg`) checks each site's :data:`CONTROL_DIFF` like an update
(:class:`bsf.fl.aggregation.CheckedFedAvgAggregator`), averages the accepted ones with the update's weight (and the
job's robust rule) and adds the mean to ``c``, as NVFlare's ``Scaffold`` workflow does. The site's result guard
(:mod:`bsf.fl.deploy.privacy`) lets :data:`CONTROL_DIFF` leave only in a SCAFFOLD job, only with exactly the keys
and shapes of the weights it sends.

At the site (:class:`ScaffoldTerm`): after every optimiser step the parameters get ``-lr * (c - c_i)``
(``PTScaffoldHelper.model_update``, outside AdamW, as in NVFlare's examples); at the round's end
``c_i+ = c_i - c + (w_global - w) / (K * lr)`` (option II) with ``K * lr`` the sum of the round's step learning rates.
``c_i`` is part of the site's per-round state (:meth:`ScaffoldTerm.state_dict`), so a restarted site continues with it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Mapping, Sequence

import numpy as np

from bsf.errors import ConfigError
from bsf.federation.payload import exchanged

log = logging.getLogger(__name__)

#: meta key of the global control variate the server sends (== NVFlare's ``AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL``)
CONTROL_GLOBAL = "scaffold_c_global"
#: meta key of a site's control-variate change (== NVFlare's ``AlgorithmConstants.SCAFFOLD_CTRL_DIFF``)
CONTROL_DIFF = "scaffold_c_diff"


def _lr_scale(optimizer: Any, module: Any) -> float:
    """The scope's learning rate over the first parameter group's (what a step record's ``lr`` is).

    Raises:
        ConfigError: when the scope's trainable parameters are in groups of different learning rates (one
            helper applies one rate: Stage 3 with ``scope: all`` and ``finetune.encoder_lr_scale`` != 1).
    """
    ids = {id(p) for p in module.parameters() if p.requires_grad}
    rates = {group["initial_lr"] for group in optimizer.param_groups if any(id(p) in ids for p in group["params"])}
    if len(rates) > 1:
        raise ConfigError("federation.algorithm: scaffold applies one learning rate to the aggregated part, but its "
                          f"parameters train at {sorted(rates)} (finetune.encoder_lr_scale with federation.scope: all); "
                          "set finetune.encoder_lr_scale: 1 or scope: encoder")
    base = optimizer.param_groups[0]["initial_lr"]
    return float(rates.pop()) / base if rates and base > 0 else 1.0


class ScaffoldTerm:
    """The site's SCAFFOLD state and steps over the aggregated part (a ``SiteTrainer`` local objective).

    Args:
        module: the aggregated part of the site's model (``swinViT`` for scope ``encoder``, else the model).
        prefix: what the module's parameter names lack against the exchanged keys (``"swinViT."`` or ``""``).
        keys: the exchanged keys (the control variates' keys in both directions).
        lr_scale: the module's learning rate over the first parameter group's (see :func:`_lr_scale`).
    """

    def __init__(self, module: Any, prefix: str, keys: Sequence[str], lr_scale: float = 1.0):
        from nvflare.app_opt.pt.scaffold import PTScaffoldHelper

        self.module, self.prefix, self.keys, self.lr_scale = module, prefix, sorted(keys), lr_scale
        state = module.state_dict()
        self._shapes = {k: tuple(state[k[len(prefix):]].shape) for k in self.keys}
        self.helper = PTScaffoldHelper()
        self.helper.init(module)
        self._c_global = self._c_local = self.reference = None
        self._lr_sum = 0.0

    @classmethod
    def for_engine(cls, engine: Any, scope: str) -> "ScaffoldTerm":
        """The term over an Engine's aggregated part (``scope``: ``encoder`` or ``all``)."""
        module, prefix = (engine.model.swinViT, "swinViT.") if scope == "encoder" else (engine.model, "")
        return cls(module, prefix, exchanged(engine.get_weights(scope)), _lr_scale(engine.optimizer, module))

    def _local(self, key: str) -> str:
        return key[len(self.prefix):]

    def start_round(self, global_meta: Mapping[str, Any] | None = None) -> None:
        """Take the round's global control variate from the global model's meta; freeze a copy of the global model.

        Raises:
            ConfigError: the meta has no :data:`CONTROL_GLOBAL`, or its keys/shapes are not the exchanged ones.
        """
        controls = (global_meta or {}).get(CONTROL_GLOBAL)
        if not isinstance(controls, Mapping):
            raise ConfigError(f"federation.algorithm: scaffold, but the global model carries no meta {CONTROL_GLOBAL!r}: "
                              "the server does not run SCAFFOLD (export the job again with `bsf jobs export`)")
        missing, unknown = sorted(set(self.keys) - set(controls)), sorted(set(controls) - set(self.keys))
        wrong = [k for k in self.keys if k in controls and tuple(np.shape(controls[k])) != self._shapes[k]]
        if missing or unknown or wrong:
            raise ConfigError(f"meta {CONTROL_GLOBAL!r} does not match the aggregated part: {len(missing)} missing "
                              f"(e.g. {missing[:3]}), {len(unknown)} unexpected (e.g. {unknown[:3]}), wrong shapes {wrong[:3]}")
        self.helper.load_global_controls({self._local(k): np.asarray(controls[k], dtype=np.float32) for k in self.keys})
        self._c_global, self._c_local = self.helper.get_params()
        self.reference = copy.deepcopy(self.module).requires_grad_(False)
        self._lr_sum = 0.0

    def after_step(self, lr: float) -> None:
        """Correct the parameters after one optimiser step taken at ``lr`` (the first parameter group's rate)."""
        lr = lr * self.lr_scale
        self.helper.model_update(self.module, lr, self._c_global, self._c_local)
        self._lr_sum += lr

    def end_round(self) -> dict[str, Any]:
        """Update the site's control variate; returns the result meta ``{CONTROL_DIFF: key -> float32 array}``."""
        out = {k: np.zeros(self._shapes[k], np.float32) for k in self.keys}
        if self.helper.cnt > 0 and self._lr_sum > 0:
            self.helper.terms_update(self.module, self._lr_sum / self.helper.cnt, self._c_global, self._c_local,
                                     self.reference)
            for name, delta in self.helper.get_delta_controls().items():
                out[self.prefix + name] = np.ascontiguousarray(delta, dtype=np.float32)
        else:
            log.warning("scaffold: no step with a positive learning rate this round; the control variate stays")
        self.reference = None
        return {CONTROL_DIFF: out}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The site's own control variate ``c_i`` (exchanged key -> float32 array): resume state."""
        local = self.helper.c_local.state_dict()
        return {k: local[self._local(k)].numpy().astype(np.float32) for k in self.keys if self._local(k) in local}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (a restarted site continues with its control variate)."""
        import torch

        local = self.helper.c_local.state_dict()
        for key in self.keys:
            if key in state:
                local[self._local(key)] = torch.as_tensor(np.asarray(state[key], dtype=np.float32))
        self.helper.c_local.load_state_dict(local)
