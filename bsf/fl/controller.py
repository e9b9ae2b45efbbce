"""The server workflow: NVFlare's FedAvg with checked aggregation and every connected site per round.

Differences from ``nvflare.app_common.workflows.fedavg.FedAvg``:

* each round goes to every connected site (``num_clients=0``), so any number of sites works;
* results go through :class:`~bsf.fl.aggregation.CheckedFedAvgAggregator`, which knows the
  global model's keys and shapes; a rejected result does not count as aggregated;
* a per-round record (accepted/rejected sites, weights) is appended to ``bsf_rounds.jsonl`` in
  the server's run folder.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.fedavg import FedAvg

from bsf.fl.aggregation import CheckedFedAvgAggregator

log = logging.getLogger(__name__)

ROUNDS_FILE = "bsf_rounds.jsonl"


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

    def _get_aggregated_result(self) -> FLModel:
        result = super()._get_aggregated_result()
        meta = result.meta or {}
        record = {
            "round": self.current_round,
            "accepted_sites": meta.get("accepted_sites", []),
            "rejected_sites": meta.get("rejected_sites", []),
            "round_skipped": bool(meta.get("round_skipped", False)),
            "weigh_by": meta.get("weigh_by"),
            "metrics": result.metrics or {},
        }
        try:
            path = os.path.join(self.get_run_dir(), ROUNDS_FILE)
            with open(path, "a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
        except Exception as exc:  # a report must never break the round
            self.warning(f"could not write {ROUNDS_FILE}: {exc}")
        return result
