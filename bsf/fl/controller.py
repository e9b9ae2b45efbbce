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
* a per-round record (accepted sites and their weights, rejected sites and why, clipped weight
  claims, whether the global model was kept) is appended to ``bsf_rounds.jsonl`` in the server's
  run folder.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.fedavg import FedAvg

from bsf.fl.aggregation import CheckedFedAvgAggregator, non_finite_tensors
from bsf.federation.run_folders import ROUNDS_FILE

log = logging.getLogger(__name__)


class CheckedFedAvg(FedAvg):
    """FedAvg whose aggregator rejects NaN/Inf and mismatched updates (see module docstring).

    Args:
        aggregator: a :class:`CheckedFedAvgAggregator` (its ``weigh_by`` and ``min_accepted``
            choose the weighting and the quorum); one with defaults when omitted.
        num_clients: sites asked per round; 0 asks every connected site.
        Other arguments are FedAvg's.
    """

    def __init__(self, *args, aggregator: Optional[CheckedFedAvgAggregator] = None, num_clients: int = 0, **kwargs):
        if aggregator is None:
            aggregator = CheckedFedAvgAggregator()
        if not isinstance(aggregator, CheckedFedAvgAggregator):
            raise TypeError(f"aggregator must be a CheckedFedAvgAggregator, got {type(aggregator).__name__}")
        super().__init__(*args, aggregator=aggregator, num_clients=num_clients, **kwargs)

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
            self.info(f"global model: {len(model.params or {})} tensors are aggregated")
        return model

    def sample_clients(self, num_clients: int = None):
        return super().sample_clients(num_clients or None)

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
        model = super().update_model(model, aggr_result)
        bad = non_finite_tensors(model.params or {})
        kept = None
        if bad:
            kept = f"{len(bad)} tensor(s) of the new global model are NaN/Inf, e.g. {bad[:3]}"
            self.error(f"round {self.current_round}: {kept}; KEEPING the previous global model")
            model.params = previous
            model = super().update_model(model, FLModel(params={}, params_type=ParamsType.DIFF, meta=aggr_result.meta,
                                                        metrics=aggr_result.metrics))
        self._write_round_record(aggr_result, kept)
        return model

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
        }
        if kept:
            record["global_model_kept"] = kept
        try:
            path = os.path.join(self.get_run_dir(), ROUNDS_FILE)
            with open(path, "a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
        except Exception as exc:  # a report must never break the round
            self.warning(f"could not write {ROUNDS_FILE}: {exc}")
