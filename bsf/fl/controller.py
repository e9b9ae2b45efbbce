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
  weight claims, the robust rule's norms and clipped updates, late results, whether the global model was
  kept) is appended to ``bsf_rounds.jsonl`` in the server's run folder.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import numpy as np

from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.workflows.fedavg import FedAvg

from bsf.config import FederationConfig
from bsf.fl.aggregation import CheckedFedAvgAggregator, non_finite_tensors
from bsf.federation.robust import update_norm
from bsf.federation.run_folders import ROUNDS_FILE
from bsf.federation.server_opt import ServerOptimizer
from bsf.fl.scaffold import CONTROL_DIFF, CONTROL_GLOBAL

log = logging.getLogger(__name__)


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
        Other arguments are FedAvg's.
    """

    def __init__(self, *args, aggregator: Optional[CheckedFedAvgAggregator] = None, num_clients: int = 0,
                 min_responses: int = 0, wait_time_after_min_received: int = 0, fedopt: Optional[dict] = None,
                 scaffold: bool = False, **kwargs):
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
        self.model = model
        super().run()

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
        if self._controls is not None and data is not None:
            data.meta = {**(data.meta or {}), CONTROL_GLOBAL: self._controls}
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
        for key in ("robust", "fedopt", "scaffold", "fedcostwavg", "modalities"):
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
