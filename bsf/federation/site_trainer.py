"""The site side of a round, without NVFlare: one long-lived ``Engine`` and what each task does with it.

``SiteTrainer`` keeps one :class:`bsf.engine.Engine` for the whole job, so optimiser state,
learning-rate schedule and data order continue across rounds exactly as in a centralized run.
Only the aggregated part of the model (``scope``: ``encoder`` = ``swinViT.*``, or ``all``) is
exchanged, without its constant buffers (:mod:`bsf.federation.payload`); everything else (the SSL heads) stays
at the site.

What leaves the site (see :meth:`SiteTrainer.train`): the aggregated weights or their
difference, the step count, the number of training cases, scalar metrics, and with a modality-aware
model (``model.modalities``) the names of the modalities the site holds. Never images,
file names or per-case values.

Stage 3 across tasks (``federation.tasks``): the site's engine is a plain SwinUNETR of its task (its data set);
it loads the global model's shared tensors and its own task's head and sends its head in its task's namespace
(:mod:`bsf.federation.task_heads`); everything inside the trainer uses the plain names.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from bsf.config import FederationConfig
from bsf.errors import CheckpointError
from bsf.data.transforms import held_modalities
from bsf.federation.modality import META_MODALITIES
from bsf.federation.fedcost import LOSS_AFTER, LOSS_BEFORE
from bsf.federation.payload import exchanged
from bsf.federation.task_heads import is_head, site_task, to_global, to_local
from bsf.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

RESUME_FILE = "engine_state.pt"
RESUME_META = "engine_state.json"
OBJECTIVE_STATE = "objective_state.npz"  # the local objective's own state (SCAFFOLD's control variate)
TRAIN_LOG = "train_log.jsonl"

@dataclass
class RoundResult:
    """What a train task sends back: weights (or differences), their kind, metrics and meta."""

    params: dict[str, np.ndarray]
    params_type: str  # "DIFF" or "FULL"
    metrics: dict[str, float]
    meta: dict[str, Any]
    records: list[dict[str, float]] = field(default_factory=list)


def _as_float32(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in params.items():
        arr = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        out[k] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def payload_bytes(params: Mapping[str, np.ndarray]) -> int:
    """Bytes of the arrays in a payload (what dominates a round's traffic)."""
    return int(sum(np.asarray(v).nbytes for v in params.values()))


class SiteTrainer:
    """One site's training state across a whole federated job.

    Args:
        engine: a :class:`bsf.engine.Engine` (anything with its weight/step/validate API).
        settings: the job's federation section (:class:`bsf.config.FederationConfig`).
        site: this site's name (for logs and metrics tags only).
        state_dir: where the resume checkpoint is kept (``None``: never saved).
        log_scalar: ``(tag, value, step)`` sink for streamed metrics (e.g. a TensorBoard writer).
        local_objective: what the job's algorithm adds to local training (``None``: FedAvg). Its
            ``start_round(global_meta)`` is called once the round's global model is loaded (``global_meta``: the
            global model's meta). Optional parts: called with no arguments, a scalar tensor added to each
            micro-batch's loss (``engine.extra_loss``; FedProx: :class:`bsf.fl.objectives.FedProxTerm`);
            ``after_step(lr)`` after each optimiser step (``lr``: the first parameter group's rate of that step);
            ``end_round()`` -> meta entries of the result; ``state_dict()`` / ``load_state_dict(state)`` (name ->
            array) kept with the site's per-round resume state (SCAFFOLD: :class:`bsf.fl.scaffold.ScaffoldTerm`).
    """

    def __init__(
        self,
        engine: Any,
        settings: FederationConfig,
        site: str = "site",
        state_dir: str | Path | None = None,
        log_scalar: Callable[[str, float, int], None] | None = None,
        local_objective: Any = None,
    ):
        self.engine = engine
        self.settings = settings
        self.site = site
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.log_scalar = log_scalar
        self.local_objective = local_objective
        if callable(local_objective):
            engine.extra_loss = local_objective
        self.rounds_done: int = -1  # the last round this site trained
        # (what the server makes of this site's last update alone, this site's exact weights)
        self._round_trip: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
        # what a round exchanges: the scope minus constant buffers (bsf.federation.payload)
        self.scope_keys = sorted(exchanged(engine.get_weights(settings.scope)))
        # federation.tasks: the task whose head this site trains (its data set); None in a one-task job
        self.task = site_task(settings.tasks, engine.config.data.dataset, f"site {site}") if settings.tasks else None

    # ------------------------------------------------------------------ resume
    def maybe_resume(self, current_round: int | None = None) -> bool:
        """Continue from this site's own checkpoint if a new process joins mid-job.

        NVFlare's simulator restarts a site's process between tasks when there are fewer threads
        than sites; real sites may restart. The checkpoint of round ``r - 1`` holds the optimiser,
        schedule and data position, so training continues exactly. ``current_round=None`` (evaluation
        tasks) takes the latest checkpoint of this job, whatever its round.
        """
        if not self.settings.resume or self.state_dir is None or self.engine.step > 0:
            return False
        if current_round is not None and current_round <= 0:
            return False
        meta_path = self.state_dir / RESUME_META
        state_path = self.state_dir / RESUME_FILE
        if not (meta_path.is_file() and state_path.is_file()):
            return False
        meta = json.loads(meta_path.read_text())
        if current_round is not None and meta.get("round") != current_round - 1:
            log.info("site %s: resume checkpoint is for round %s, not %s; starting fresh", self.site, meta.get("round"), current_round - 1)
            return False
        self.engine.load_checkpoint(state_path)
        self._load_objective_state()
        self.rounds_done = int(meta["round"])
        log.info("site %s: resumed at step %d from %s (round %d)", self.site, self.engine.step, state_path, self.rounds_done)
        return True

    def _save_resume(self, current_round: int) -> None:
        if not self.settings.resume or self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(self.state_dir / RESUME_FILE)
        if hasattr(self.local_objective, "state_dict"):
            with atomic_path(self.state_dir / OBJECTIVE_STATE) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, **self.local_objective.state_dict())
        atomic_write_json({"round": current_round, "step": int(self.engine.step)}, self.state_dir / RESUME_META)

    def _load_objective_state(self) -> None:
        """Restore the local objective's state saved with the checkpoint being resumed (if it keeps one)."""
        if not hasattr(self.local_objective, "load_state_dict"):
            return
        path = self.state_dir / OBJECTIVE_STATE
        if not path.is_file():
            raise CheckpointError(f"site {self.site}: {path} is missing: the resume checkpoint lacks the state of "
                                  f"algorithm {self.settings.algorithm} (remove {self.state_dir} to start the site afresh)")
        with np.load(path, allow_pickle=False) as state:
            self.local_objective.load_state_dict({k: state[k] for k in state.files})

    def _append_log(self, current_round: int, metrics: Mapping[str, float], records: list[dict[str, float]], seconds: float) -> None:
        """The site's own record of every round (stays at the site): ``<state_dir>/train_log.jsonl``."""
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / TRAIN_LOG, "a") as handle:
            entry = {"round": current_round, "seconds": round(seconds, 3), "metrics": dict(metrics), "steps": records}
            handle.write(json.dumps(entry) + "\n")

    # ------------------------------------------------------------------ tasks
    def _load_global(self, params: Mapping[str, Any], allow_own: bool = False, own_head: bool = False) -> dict[str, np.ndarray]:
        """Load the global part (``own_head``: a model without this site's task head keeps the site's own)."""
        if self.task is not None:
            params = to_local(params, self.task, require_head=not own_head)
            if own_head:  # a model of another task's site (cross-site evaluation) is read with this site's head
                own = self.engine.get_weights(self.settings.scope)
                params = {**{k: v for k, v in own.items() if is_head(k)}, **params}
        received = _as_float32(exchanged(params))  # constant buffers, if a sender still has them, stay as built
        missing = sorted(set(self.scope_keys) - set(received))
        unknown = sorted(set(received) - set(self.scope_keys))
        if missing or unknown:
            raise CheckpointError(
                f"site {self.site}: the global model does not match the aggregation scope {self.settings.scope!r}: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unknown)} unexpected (e.g. {unknown[:3]})"
            )
        if allow_own and self._is_own_round_trip(received):
            # The global model is this site's last update alone (a one-site federation, or every
            # other update rejected): global + (new - global) can miss `new` by an ulp in float32,
            # and Adam amplifies ulps, so continue from the exact weights the global stands for.
            log.info("site %s: the global model is this site's own update; continuing from its exact weights", self.site)
            self.engine.set_weights(self._round_trip[1])
            return received
        self.engine.set_weights(received)
        return received

    def _is_own_round_trip(self, received: Mapping[str, np.ndarray]) -> bool:
        if self._round_trip is None:
            return False
        expected = self._round_trip[0]
        return all(np.array_equal(received[k], expected[k]) for k in self.scope_keys)

    def _emit(self, tag: str, value: float, step: int) -> None:
        if self.log_scalar is not None and value is not None and math.isfinite(value):
            self.log_scalar(tag, float(value), int(step))

    def train(self, global_params: Mapping[str, Any], current_round: int,
              global_meta: Mapping[str, Any] | None = None) -> RoundResult:
        """Load the global part, (optionally) validate it, run ``local_steps``, return the update.

        ``global_meta``: the global model's meta (SCAFFOLD's global control variate rides there).
        """
        started = time.perf_counter()
        self.maybe_resume(current_round)
        received = self._load_global(global_params, allow_own=True)
        if self.local_objective is not None:
            self.local_objective.start_round(global_meta)
        metrics: dict[str, float] = {}
        if self.settings.validate_global:
            metrics = {k: float(v) for k, v in self.engine.validate().items()}
            for name, value in metrics.items():
                self._emit(f"val/{name}", value, self.engine.step)
        records = self._local_steps()
        for record in records:
            for name, value in record.items():
                if name != "step":
                    self._emit(f"train/{name}", value, int(record["step"]))
        losses = [r["loss"] for r in records]
        if not all(math.isfinite(x) for x in losses):
            log.error("site %s: non-finite training loss in round %d: %s", self.site, current_round, losses)
        new = self.engine.get_weights(self.settings.scope)
        dtype = np.float16 if self.settings.transfer_dtype == "float16" else np.float32
        if self.settings.transfer == "diff":
            params = {k: (new[k] - received[k]).astype(dtype, copy=False) for k in self.scope_keys}
            params_type = "DIFF"
        else:
            params = {k: new[k].astype(dtype, copy=False) for k in self.scope_keys}
            params_type = "FULL"
        if params_type == "DIFF" and dtype == np.float32:
            self._round_trip = ({k: received[k] + params[k] for k in self.scope_keys}, new)
        else:
            self._round_trip = None
        if losses:
            metrics["train_loss"] = float(np.mean(losses))
            if self.settings.weigh_by == "fedcostwavg":  # the server's weight (bsf.federation.fedcost)
                metrics[LOSS_BEFORE], metrics[LOSS_AFTER] = float(losses[0]), float(losses[-1])
        meta = {
            "NUM_STEPS_CURRENT_ROUND": len(records),
            "num_cases": int(self.engine.num_train_cases),
            "site_step": int(self.engine.step),
        }
        if hasattr(self.local_objective, "end_round"):
            meta.update(self.local_objective.end_round())
        if self.engine.config.model.modalities:  # modality-aware model: the server averages a modality's filters over its sites
            meta[META_MODALITIES] = held_modalities(self.engine.config.data)
        self.rounds_done = current_round
        self._append_log(current_round, metrics, records, time.perf_counter() - started)
        self._save_resume(current_round)
        if self.task is not None:
            params = to_global(params, self.task)
        log.info(
            "site %s: round %d done, step %d, loss %s, sending %s of %d tensors (%.2f MB)",
            self.site, current_round, self.engine.step, losses[-1] if losses else None, params_type,
            len(params), payload_bytes(params) / 1e6,
        )
        return RoundResult(params=params, params_type=params_type, metrics=metrics, meta=meta, records=records)

    def _local_steps(self) -> list[dict[str, float]]:
        """The round's ``local_steps`` optimiser steps (one at a time when the local objective acts after each)."""
        if not hasattr(self.local_objective, "after_step"):
            return self.engine.train_steps(self.settings.local_steps)
        records = []
        for _ in range(self.settings.local_steps):
            records.extend(self.engine.train_steps(1))
            self.local_objective.after_step(records[-1]["lr"])
        return records

    def validate(self, params: Mapping[str, Any] | None) -> dict[str, float]:
        """Metrics of a received model (cross-site evaluation) on this site's validation cases.

        Across tasks: the model's shared tensors with its head of this site's task, or, when it has none (another
        task's site's model), this site's own head.

        The site's own weights are restored afterwards, so training is unaffected.
        """
        self.maybe_resume(None)
        if not params:
            return {k: float(v) for k, v in self.engine.validate().items()}
        backup = self.engine.get_weights(self.settings.scope)
        try:
            self._load_global(params, own_head=True)
            return {k: float(v) for k, v in self.engine.validate().items()}
        finally:
            self.engine.set_weights(backup)

    def local_model(self) -> dict[str, np.ndarray]:
        """The site's current aggregated part, as a round exchanges it (served to cross-site evaluation)."""
        self.maybe_resume(None)
        weights = exchanged(self.engine.get_weights(self.settings.scope))
        return weights if self.task is None else to_global(weights, self.task)
