"""The server's global model: created deterministically from the job's run config, kept every round.

:class:`BSFModelPersistor` is NVFlare's ``PTFileModelPersistor`` (so ``FL_global_model.pt`` is
written after every round and ``best_FL_global_model.pt`` whenever the validation metric
improves, both as ``{"model": state_dict}`` in the server's app folder) with one change: the
initial global model is not a model object in the job config but

* the aggregated part (``scope``) of the model the :class:`bsf.engine.Engine` builds for the
  job's run config and seed, so every site starts from identical weights and a one-site
  federation starts exactly where a centralized run does; or
* the ``scope`` part of ``initial_ckpt`` (any layout :func:`bsf.model.normalize_checkpoint_keys`
  reads: a previous stage's encoder, the public BrainSegFounder checkpoints, ...).

The global model holds only the aggregated keys; site-only parts (SSL heads) never reach it.
"""

from __future__ import annotations

import os
from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.model_persistence_format_manager import PTModelPersistenceFormatManager

from bsf.fl.model_init import checkpoint_weights, initial_weights


class BSFModelPersistor(PTFileModelPersistor):
    """Global-model persistor for BrainSegFounder-FL jobs.

    Args:
        run_config: the job's run config: a file in the app's ``config/`` folder, a path, or a preset name.
        scope: ``encoder`` (``swinViT.*``) or ``all``: which keys are global.
        initial_ckpt: optional checkpoint to start from instead of the seeded initialisation
            (an absolute path on the server, or relative to the app's ``config/`` folder).
        overrides: run-config overrides (``section.key=value``).
    """

    def __init__(
        self,
        run_config: str = "bsf_run.yaml",
        scope: str = "encoder",
        initial_ckpt: str | None = None,
        overrides: list[str] | None = None,
        global_model_file_name: str = "FL_global_model.pt",
        best_global_model_file_name: str = "best_FL_global_model.pt",
    ):
        super().__init__(
            global_model_file_name=global_model_file_name,
            best_global_model_file_name=best_global_model_file_name,
        )
        self.run_config = run_config
        self.scope = scope
        self.initial_ckpt = initial_ckpt
        self.overrides = list(overrides or [])

    def _resolve(self, name: str, fl_ctx: FLContext) -> str:
        app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT) or "."
        candidate = Path(app_root) / "config" / name
        if candidate.is_file():
            return str(candidate)
        return name

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        from bsf.engine import load_config

        try:
            config = load_config(self._resolve(self.run_config, fl_ctx), overrides=self.overrides)
            if self.initial_ckpt:
                path = self._resolve(self.initial_ckpt, fl_ctx)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"initial checkpoint {path} not found on the server")
                weights = checkpoint_weights(config, path, self.scope)
                origin = f"checkpoint {path}"
            else:
                weights = initial_weights(config, self.scope)
                origin = f"seed {config.seed}"
        except Exception as exc:
            self.log_exception(fl_ctx, f"cannot create the initial global model: {exc}")
            self.system_panic(reason=f"cannot create the initial global model: {exc}", fl_ctx=fl_ctx)
            return None
        import torch

        data = {k: torch.from_numpy(v) for k, v in weights.items()}
        self.log_info(fl_ctx, f"initial global model: {len(data)} '{self.scope}' tensors from {origin}")
        self.default_train_conf = {"train": {"model": "bsf.SSLModel", "scope": self.scope}}
        self.persistence_manager = PTModelPersistenceFormatManager(
            data, default_train_conf=self.default_train_conf, allow_numpy_conversion=True
        )
        return self.persistence_manager.to_model_learnable(None)
