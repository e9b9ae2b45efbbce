"""The server workflow: NVFlare's FedAvg with checked aggregation and every connected site per round.

Differences from ``nvflare.app_common.workflows.fedavg.FedAvg``:

* each round goes to every connected site (``num_clients=0``), so any number of sites works;
* results go through :class:`~bsf.fl.aggregation.CheckedFedAvgAggregator`, which knows the
  global model's keys and shapes and bounds each site's weight; a rejected result does not count
  as aggregated; an error reply (e.g. a result the site's own guard refused, which arrives as
  ``TASK_RESULT_FILTER_ERROR`` with no data) is recorded as a rejection of that site, and the job
  stops only when fewer than ``min_clients`` sites can still count (NVFlare alone would stop at the
  first error reply when every site is asked);
* the new global model is checked before it replaces the old one: if any tensor is NaN/Inf (e.g.
  a weight difference that overflows float32 once added), the previous global model is kept for
  that round, and the round and the tensors are logged;
* slow sites: with ``min_responses`` a round closes once that many sites answered and
  ``wait_time_after_min_received`` seconds passed (NVFlare's broadcast conditions; FedAvg itself always
  waits for every site); a result that arrives after its round closed is dropped with a log line and
  listed as late in the record of the round it arrived in;
* FedOpt: with ``fedopt`` (the arguments of :class:`~bsf.federation.server_opt.ServerOptimizer`) the
  round's aggregated difference goes through the server's momentum/Adam step before it is applied;
* SCAFFOLD: with ``scaffold`` the server keeps the global control variate ``c`` (zeros at the start, keyed like
  the global model), sends it with the model in every round's meta (``scaffold_c_global``) and adds the round's
  aggregated control change (the aggregator's ``scaffold_c_diff``) to it, as NVFlare's ``Scaffold`` workflow does;
  a non-finite ``c`` is not taken (the previous one stays). ``c`` lives in the server process: a server restart
  (``bsf deploy resume``) starts it at zero again (:mod:`bsf.fl.scaffold`);
* a per-round record (asked, accepted and missing sites, their weights, rejected sites and why, clipped
  weight claims, every update's norm and those the norm bound refused, a degenerate round (every accepted update
  all zeros), the robust rule's norms and clipped updates, late results, whether the global model was
  kept) is appended to ``bsf_rounds.jsonl`` in the server's run folder;
* the best global model (``best_FL_global_model.pt``) is chosen here, among *every* global model the sites
  validated, the last one included (:class:`ModelSelection`). In round r each site validates the global model it
  receives, the result of round r-1, and sends the metric with its update; NVFlare's ``IntimeModelSelector``
  stops there, so the last aggregate was never validated and never a candidate. With ``validate_final`` the
  controller sends the last global model to every site once more as a ``validate`` task after the last round, and
  that result is a candidate too. A candidate's value is the mean over the sites that reported the metric (each
  site counts once); the first best stays on a tie. Round 0's validation (the initial model, no aggregate yet) is
  not a candidate. Which model won, and every candidate's value per site, goes to ``bsf_model_selection.json``
  in the server's run folder.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping, Optional

import numpy as np

from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.fedavg import FedAvg

from bsf.config import FederationConfig
from bsf.fl.aggregation import CheckedFedAvgAggregator, non_finite_tensors
from bsf.federation.robust import update_norm
from bsf.federation.model_selection import ModelSelection
from bsf.federation.run_folders import ROUNDS_FILE, SELECTION_FILE
from bsf.io import atomic_write_json
from bsf.federation.server_opt import ServerOptimizer
from bsf.fl.scaffold import CONTROL_DIFF, CONTROL_GLOBAL

log = logging.getLogger(__name__)

#: the task that validates the last global model at every site (the sites' Client API ``is_evaluate()`` task)
VALIDATE_TASK = AppConstants.TASK_VALIDATION


class CheckedFedAvg(FedAvg):
    """FedAvg whose aggregator rejects NaN/Inf and mismatched updates (see module docstring).

    Args:
        aggregator: a :class:`CheckedFedAvgAggregator` (its ``weigh_by`` and ``min_accepted``
            choose the weighting and the quorum); one with defaults when omitted.
        num_clients: sites asked per round; 0 asks every connected site.
        min_responses: results that close a round (0: every asked site); see the module docstring.
        wait_time_after_min_received: seconds a round stays open for the others once ``min_responses`` answered.
        fedopt: keyword arguments of :class:`~bsf.federation.server_opt.ServerOptimizer` (``None``: plain FedAvg).
        scaffold: run SCAFFOLD's server side (see the module docstring; the aggregator needs ``scaffold=True`` too).
        key_metric: the sites' validation metric that picks ``best_FL_global_model.pt`` (``None``: no selection here).
        lower_is_better: ``key_metric``'s direction.
        validate_final: after the last round, have every site validate the last global model, so that it is a
            candidate for the best model too (see the module docstring).
        Other arguments are FedAvg's.
    """

    def __init__(self, *args, aggregator: Optional[CheckedFedAvgAggregator] = None, num_clients: int = 0,
                 min_responses: int = 0, wait_time_after_min_received: int = 0, fedopt: Optional[dict] = None,
                 scaffold: bool = False, key_metric: Optional[str] = None, lower_is_better: bool = False,
                 validate_final: bool = True, **kwargs):
        if aggregator is None:
            aggregator = CheckedFedAvgAggregator()
        if not isinstance(aggregator, CheckedFedAvgAggregator):
            raise TypeError(f"aggregator must be a CheckedFedAvgAggregator, got {type(aggregator).__name__}")
        super().__init__(*args, aggregator=aggregator, num_clients=num_clients, **kwargs)
        self.min_responses = int(min_responses)
        self.wait_time_after_min_received = int(wait_time_after_min_received)
        self.fedopt = fedopt
        self._server_opt = ServerOptimizer(**fedopt) if fedopt else None
        self.scaffold = scaffold
        self._controls: Optional[dict] = None  # SCAFFOLD's global control variate (key -> float32 array)
        self._asked: list[str] = []  # the sites asked in the current round
        self._answered: set[str] = set()  # those whose result (or error) arrived before the round closed
        self._late: list[dict] = []  # results of closed rounds that arrived since the last record
        self.key_metric = key_metric
        self.lower_is_better = bool(lower_is_better)
        self.validate_final = bool(validate_final)
        self.selection = ModelSelection(key_metric, lower_is_better) if key_metric else None
        self._validation: dict[str, Any] = {}  # site -> key metric of the global model it validated (this task)
        self._final_validation = False  # the last global model's validate task is out
        self._last_model: Optional[FLModel] = None  # the global model last saved

    @staticmethod
    def federation_options(fed: FederationConfig) -> dict:
        """This controller's own arguments for a job's (validated) federation section (slow sites, FedOpt)."""
        fedopt = None
        if fed.algorithm == "fedopt":
            fedopt = {"kind": fed.fedopt_optimizer, "lr": fed.fedopt_lr, "beta1": fed.fedopt_beta1,
                      "beta2": fed.fedopt_beta2, "eps": fed.fedopt_eps}
        return {"min_responses": fed.min_responses, "wait_time_after_min_received": fed.wait_time_after_min_received,
                "fedopt": fedopt, "scaffold": fed.algorithm == "scaffold"}

    def run(self) -> None:
        # A persistor that cannot create the initial model has stopped the job (CANNOT START, system panic);
        # FedAvg.run would go on with no model and add an AttributeError traceback. Load it once here instead.
        model = self.load_model()
        if model is None:
            self.info("no initial global model: the job does not start")
            return
        sites = sorted(self.sample_clients())  # every site of the job
        if len(sites) < self.aggregator.min_accepted:  # every round would train and none aggregate
            self.panic(f"CANNOT START: federation.min_clients={self.aggregator.min_accepted} but {len(sites)} site(s) "
                       f"take part ({', '.join(sites) or 'none'}); start the job with more sites (simulator: -n "
                       f"{self.aggregator.min_accepted}) or lower federation.min_clients")
            return
        self.model = model
        super().run()
        if self.selection is not None and self._last_model is not None and not self.abort_signal.triggered:
            if self.validate_final:
                self._validate_last(self._last_model)
            self._write_selection()

    def save_model(self, model: FLModel) -> None:
        self._last_model = model
        super().save_model(model)

    # ------------------------------------------------------------------ best model
    def _note_validation(self, result: FLModel) -> None:
        """Keep the key metric a site reported for the global model it validated (its update's metrics)."""
        if self.selection is None:
            return
        site = (result.meta or {}).get("client_name", "unknown")
        value = (result.metrics or {}).get(self.key_metric)
        if value is not None:
            self._validation[site] = value

    def _get_aggregated_result(self) -> FLModel:
        # The round's results are in: the global model the sites validated in this round (the one persisted after
        # the previous round, still the current one) is a candidate. Round 0 validated the initial model: skipped.
        if self.selection is not None and self.current_round > 0:
            self._select(self.current_round - 1, f"round {self.current_round}")
        return super()._get_aggregated_result()

    def _select(self, model_round: int, validated: str) -> None:
        values, self._validation = self._validation, {}
        if not values:
            self.info(f"model selection: no site reported {self.key_metric} for the global model after round {model_round}")
            return
        if self.selection.offer(model_round, values, validated):
            best = self.selection.best
            self.info(f"NEW BEST global model: the model after round {model_round}, mean {self.key_metric} "
                      f"{best['value']:.6g} over {len(best['sites'])} site(s) (validated {validated})")
            self._announce_best(best)
        self._write_selection()

    def _announce_best(self, best: Mapping[str, Any]) -> None:
        """NVFlare's event for a new best global model: the persistor writes the current global model (the one
        validated) to ``best_FL_global_model.pt``, as it does for ``IntimeModelSelector``."""
        value = best["value"]
        self.fl_ctx.set_prop(AppConstants.VALIDATION_RESULT, -value if self.lower_is_better else value,
                             private=True, sticky=False)
        self.fl_ctx.set_prop(AppConstants.METRICS_SELECTION_INFO, {
            "source": type(self).__name__, "metric_source": "site validation of the global model",
            "key_metric": {"name": self.key_metric, "mode": "min" if self.lower_is_better else "max"},
            "best_round": best["model_round"], "best_metrics": {self.key_metric: value},
        }, private=True, sticky=False)
        self.event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE)

    def _validate_last(self, model: FLModel) -> None:
        """Every site validates the last global model (a ``validate`` task); it is then a candidate like the others."""
        last_round = self.current_round
        self.info(f"validating the last global model (after round {last_round}) at every site")
        self._validation = {}
        self._final_validation = True
        try:
            data = FLModel(params=model.params, params_type=ParamsType.FULL, meta={},
                           current_round=last_round, total_rounds=self.num_rounds)
            self.send_model(task_name=VALIDATE_TASK, data=data, targets=self.sample_clients(self.num_clients),
                            callback=self._final_result)
            while self.get_num_standing_tasks():
                if self.abort_signal.triggered:
                    self.info("abort signal: the last global model is not validated")
                    return
                time.sleep(self._task_check_period)
        finally:
            self._final_validation = False
        self._select(last_round, "after the last round")

    def _final_result(self, result: FLModel) -> bool:
        site = (result.meta or {}).get("client_name", "unknown")
        self._note_validation(result)
        self.info(f"site {site} validated the last global model: {self.key_metric} "
                  f"{(result.metrics or {}).get(self.key_metric)}")
        return True

    def _write_selection(self) -> None:
        """Write :data:`SELECTION_FILE` (never fails the job)."""
        try:
            record = self.selection.to_dict(last_round=self.current_round if self._last_model is not None else None)
            atomic_write_json(record, os.path.join(self.get_run_dir(), SELECTION_FILE))
        except Exception as exc:  # a report must never break the job
            self.warning(f"could not write {SELECTION_FILE}: {exc}")

    def load_model(self) -> FLModel:
        model = super().load_model()
        if model is not None:
            self.aggregator.set_reference(model.params or {})
            if self.scaffold and self._controls is None:
                self._controls = {k: np.zeros(np.shape(v), np.float32) for k, v in (model.params or {}).items()}
            self.info(f"global model: {len(model.params or {})} tensors are aggregated")
        return model

    def sample_clients(self, num_clients: int = None):
        return super().sample_clients(num_clients or None)

    def send_model(self, task_name: str = "train", data: FLModel = None, targets=None, min_responses: int = None,
                   timeout: int = 0, callback=None) -> None:
        """FedAvg's round broadcast, closing at ``min_responses`` results plus ``wait_time_after_min_received``."""
        self._asked = sorted(getattr(t, "name", t) for t in targets or [])
        if task_name == self.task_name:
            self._validation = {}  # the sites validate this round's global model
        if self._controls is not None and data is not None and task_name == self.task_name:
            data.meta = {**(data.meta or {}), CONTROL_GLOBAL: self._controls}
        if data is not None and task_name == self.task_name:
            self.aggregator.start_round(data.params)  # a FULL update's norm is that of its difference to this model
        self._answered = set()
        wanted = min(self.min_responses, len(self._asked)) if self._asked else self.min_responses
        if wanted:
            self.info(f"round {self.current_round}: closes after {wanted} of {len(self._asked)} result(s) "
                      f"+ {self.wait_time_after_min_received} s")
        self.broadcast_model(task_name=task_name, data=data, targets=targets, min_responses=wanted or min_responses,
                             timeout=timeout, wait_time_after_min_received=self.wait_time_after_min_received,
                             blocking=False, callback=callback)

    def process_result_of_unknown_task(self, client, task_name: str, client_task_id: str, result, fl_ctx) -> None:
        """A result whose round has closed (a slow site): dropped, logged, listed in the next round record."""
        if task_name != self.task_name:
            return super().process_result_of_unknown_task(client, task_name, client_task_id, result, fl_ctx)
        late_round = result.get_header(AppConstants.CURRENT_ROUND, None)
        self._late.append({"site": client.name, "round": late_round})
        self.warning(f"DROPPED the late result of site {client.name} for round {late_round} "
                     f"(round {self.current_round} is running; that round closed without it)")

    def _aggregate_one_result(self, result: FLModel) -> bool:
        self._note_validation(result)  # the site's metrics of the global model it received, accepted or not
        if self._params_type is None and result.params_type is not None:
            self._params_type = result.params_type
        accepted = self.aggregator.accept_model(result) is not False
        site = (result.meta or {}).get("client_name", "unknown")
        if accepted:
            self._received_count += 1
            self.info(f"accepted the result of {site} ({self._received_count}/{self._expected_count})")
        else:
            reason = self.aggregator.rejected[-1][1] if self.aggregator.rejected else "invalid update"
            self.error(f"REJECTED the result of site {site} in round {self.current_round}: {reason}")
        return accepted

    def _accept_train_result(self, client_name: str, result, fl_ctx, is_unknown_task: bool = False) -> bool:
        """An error reply is a rejected site; the job stops only when the quorum can no longer be met.

        NVFlare's own rule stops the job as soon as *any* asked site answers with an error (it needs
        every target when ``num_clients=0``). Here the quorum is the aggregator's ``min_accepted``:
        a site whose result its own guard refused (``TASK_RESULT_FILTER_ERROR``), or that failed,
        counts as rejected, and the round goes on with the others while ``min_accepted`` can still be
        reached (``ignore_result_error=True``: always; ``False``: never).
        """
        rc = result.get_return_code()
        if self._final_validation and not is_unknown_task:  # the last global model's validation: a failure only logs
            if rc and rc != ReturnCode.OK:
                self.warning(f"site {client_name} could not validate the last global model (return code {rc})")
                return False
            return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task=is_unknown_task)
        if not is_unknown_task:
            self._answered.add(client_name)
        if is_unknown_task or not rc or rc == ReturnCode.OK:
            return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task=is_unknown_task)
        reason = f"the site sent no update (return code {rc}"
        if rc == ReturnCode.TASK_RESULT_FILTER_ERROR:
            reason += ": its result guard or another result filter refused it; the site's log says why"
        self.aggregator.reject(client_name, reason + ")")
        self.error(f"REJECTED the result of site {client_name} in round {self.current_round}: {reason})")
        still_possible = self._current_num_targets - len(self.aggregator.rejected) >= self.aggregator.min_accepted
        if self._ignore_result_error is False or (self._ignore_result_error is None and not still_possible):
            self.panic(f"round {self.current_round}: {len(self.aggregator.rejected)} of {self._current_num_targets} "
                       f"site(s) rejected; fewer than min_clients={self.aggregator.min_accepted} can remain")
        return False

    def update_model(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        """Apply the round's aggregate; keep the previous global model if the new one is not finite."""
        previous = dict(model.params or {})
        control_diff = (aggr_result.meta or {}).pop(CONTROL_DIFF, None)  # never into the global model's meta
        if self._server_opt is not None and aggr_result.params:
            aggr_result = self._server_step(model, aggr_result)
        model = super().update_model(model, aggr_result)
        bad = non_finite_tensors(model.params or {})
        kept = None
        if bad:
            kept = f"{len(bad)} tensor(s) of the new global model are NaN/Inf, e.g. {bad[:3]}"
            self.error(f"round {self.current_round}: {kept}; KEEPING the previous global model")
            model.params = previous
            model = super().update_model(model, FLModel(params={}, params_type=ParamsType.DIFF, meta=aggr_result.meta,
                                                        metrics=aggr_result.metrics))
        elif control_diff:
            self._update_controls(control_diff, aggr_result.meta)
        self._write_round_record(aggr_result, kept)
        return model

    def _update_controls(self, control_diff: dict, meta: dict) -> None:
        """SCAFFOLD: ``c += `` the round's aggregated control change, unless that makes ``c`` non-finite."""
        new = {k: (v + np.asarray(control_diff[k], dtype=np.float32)) if k in control_diff else v
               for k, v in self._controls.items()}
        bad = non_finite_tensors(new)
        if bad:
            self.error(f"round {self.current_round}: the new SCAFFOLD control variate is NaN/Inf in {bad[:3]}; KEEPING the previous one")
        else:
            self._controls = new
        meta["scaffold"] = {"control_diff_norm": round(update_norm(control_diff), 6),
                            "control_norm": round(update_norm(self._controls), 6), "kept_previous": bool(bad)}

    def _server_step(self, model: FLModel, aggr_result: FLModel) -> FLModel:
        """FedOpt: the aggregated difference (or full weights minus the global model) -> the server's step, a DIFF."""
        diff = aggr_result.params
        if aggr_result.params_type != ParamsType.DIFF:
            diff = {k: v - model.params[k] for k, v in aggr_result.params.items()}
        step = self._server_opt.step(diff)
        meta = {**(aggr_result.meta or {}), "fedopt": {"optimizer": self._server_opt.kind, "aggregate_norm":
                round(update_norm(diff), 6), "step_norm": round(update_norm(step), 6)}}
        return FLModel(params=step, params_type=ParamsType.DIFF, meta=meta, metrics=aggr_result.metrics)

    def _write_round_record(self, result: FLModel, kept: Optional[str]) -> None:
        """Append this round's line to ``bsf_rounds.jsonl`` (never fails the round)."""
        meta = result.meta or {}
        record = {
            "round": self.current_round,
            "accepted_sites": meta.get("accepted_sites", []),
            "rejected_sites": meta.get("rejected_sites", []),
            "rejections": meta.get("rejections", []),
            "weights": meta.get("weights", {}),
            "weight_notes": meta.get("weight_notes", {}),
            "round_skipped": bool(meta.get("round_skipped", False)),
            "weigh_by": meta.get("weigh_by"),
            "metrics": result.metrics or {},
            "asked_sites": list(self._asked),
            "missing_sites": [site for site in self._asked if site not in self._answered],
            "late_results": list(self._late),
        }
        self._late = []
        for key in ("norm_bound", "degenerate", "robust", "fedopt", "scaffold", "fedcostwavg", "modalities"):
            if key in meta:
                record[key] = meta[key]
        if kept:
            record["global_model_kept"] = kept
        try:
            path = os.path.join(self.get_run_dir(), ROUNDS_FILE)
            with open(path, "a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
        except Exception as exc:  # a report must never break the round
            self.warning(f"could not write {ROUNDS_FILE}: {exc}")
