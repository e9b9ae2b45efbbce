"""The server's global model: created deterministically from the job's run config, kept every round.

:class:`BSFModelPersistor` is NVFlare's ``PTFileModelPersistor`` (so ``FL_global_model.pt`` is
written after every round and ``best_FL_global_model.pt`` whenever the validation metric
improves, both as ``{"model": state_dict, "bsf_round": r, "bsf_model": description}`` in the server's app folder,
the description naming the model's input channels by modality, :mod:`bsf.model.provenance`) with one change: the
initial global model is not a model object in the job config but

* the aggregated part (``scope``) of the model the :class:`bsf.engine.Engine` builds for the
  job's run config and seed, so every site starts from identical weights and a one-site
  federation starts exactly where a centralized run does; or
* the ``scope`` part of ``initial_ckpt`` (a checkpoint of this very model, e.g. to continue a job); or
* for Stage 2 and 3: the model the engine builds from the *previous stage's model* (``pretrained``,
  else ``$BSF_PRETRAINED`` on the server, else the run config's ``model.pretrained``; any layout
  :func:`bsf.model.normalize_checkpoint_keys` reads, e.g. ``FL_global_model.pt``), its encoder's
  input channels adapted by modality name with the run config's seed. Done once, here, before
  round 0: sites never read that file, they receive the result as the round-0 global model.

With ``require_pretrained`` (the Stage 2 and 3 jobs) a missing previous model stops the job at
start with a message saying how to set it; a missing, unreadable or incompatible file always does
(never a silent random start). See :func:`bsf.federation.initial_model.initial_global_weights`.

The global model holds only the aggregated keys; site-only parts (SSL heads) never reach it, and a
global model with a NaN/Inf tensor is never written (the file keeps the previous one). The constant
buffers (:data:`bsf.federation.payload.CONSTANT_BUFFERS`, the Swin blocks' ``relative_position_index``)
are kept in the saved files, so they stay complete checkpoints, but never sent (``exclude_vars``):
every round's global model, the model cross-site evaluation sends and what the aggregator checks
results against hold the exchanged keys only.
"""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.model_persistence_format_manager import PTModelPersistenceFormatManager

from bsf.fl.aggregation import non_finite_tensors
from bsf.federation.initial_model import initial_global_weights
from bsf.federation.payload import CONSTANT_BUFFERS
from bsf.engine.stage_model import describe_config
from bsf.federation.run_folders import BEST_MODEL, GLOBAL_MODEL, ROUND_KEY
from bsf.model.provenance import META_KEY


class BSFModelPersistor(PTFileModelPersistor):
    """Global-model persistor for BrainSegFounder-FL jobs.

    Args:
        run_config: the job's run config: a file in the app's ``config/`` folder, a path, or a preset name.
        scope: ``encoder`` (``swinViT.*``) or ``all``: which keys are global.
        initial_ckpt: optional checkpoint to start from instead of the seeded initialisation
            (an absolute path on the server, or relative to the app's ``config/`` folder).
        overrides: run-config overrides (``section.key=value``).
        pretrained: the previous stage's model (server path); ``$BSF_PRETRAINED`` when not set here.
        require_pretrained: refuse to start without a previous stage's model (Stage 2 and 3 jobs).
        job_name: the job's name, for messages.
    """

    def __init__(
        self,
        run_config: str = "bsf_run.yaml",
        scope: str = "encoder",
        initial_ckpt: str | None = None,
        overrides: list[str] | None = None,
        global_model_file_name: str = GLOBAL_MODEL,
        best_global_model_file_name: str = BEST_MODEL,
        pretrained: str | None = None,
        require_pretrained: bool = False,
        job_name: str | None = None,
    ):
        super().__init__(
            global_model_file_name=global_model_file_name,
            best_global_model_file_name=best_global_model_file_name,
            exclude_vars=CONSTANT_BUFFERS,
        )
        self.run_config = run_config
        self.scope = scope
        self.initial_ckpt = initial_ckpt
        self.overrides = list(overrides or [])
        self.pretrained = pretrained
        self.require_pretrained = require_pretrained
        self.job_name = job_name

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
            weights, origin = initial_global_weights(
                config,
                self.scope,
                initial_ckpt=self.initial_ckpt,
                pretrained=self.pretrained,
                require_pretrained=self.require_pretrained,
                job=f"job {self.job_name or fl_ctx.get_job_id()}",
                resolve=lambda name: self._resolve(name, fl_ctx),
            )
        except Exception as exc:
            from bsf.errors import BSFError

            message = f"CANNOT START: cannot create the initial global model: {exc}"
            if isinstance(exc, BSFError):  # the user's setting: the message says it all
                self.log_error(fl_ctx, message)
            else:
                self.log_exception(fl_ctx, message)
            self.system_panic(reason=f"cannot create the initial global model: {exc}", fl_ctx=fl_ctx)
            return None
        import torch

        data = {k: torch.from_numpy(v) for k, v in weights.items()}
        self.log_info(fl_ctx, f"initial global model: {len(data)} '{self.scope}' tensors from {origin}")
        model = "bsf.SSLModel" if config.stage == "ssl" else "monai.networks.nets.SwinUNETR"
        self.default_train_conf = {"train": {"model": model, "stage": config.stage, "scope": self.scope}}
        self.persistence_manager = PTModelPersistenceFormatManager(
            data, default_train_conf=self.default_train_conf, allow_numpy_conversion=True
        )
        # every saved global model says which modality each input channel is: the next stage adapts it unasked
        self.persistence_manager.other_props[META_KEY] = describe_config(config).to_dict()
        return self.persistence_manager.to_model_learnable(self.exclude_vars)

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext) -> None:
        """Persist the global model with the round it is the result of (``bsf_round``, read back by resume).

        A model with a NaN/Inf tensor is refused: the file keeps the previous global model, and the
        round and the tensors are logged.
        """
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        bad = non_finite_tensors(ml.get(ModelLearnableKey.WEIGHTS) or {})
        if bad:
            self.log_error(
                fl_ctx,
                f"round {current_round}: REFUSED to save a global model with {len(bad)} NaN/Inf tensor(s), "
                f"e.g. {bad[:3]}; {self._ckpt_save_path} keeps the previous one",
            )
            return
        self._get_persistence_manager(fl_ctx).other_props[ROUND_KEY] = current_round
        super().save_model(ml, fl_ctx)
