"""Server-side JSON summary of the metrics sites stream (TensorBoard gets the same stream).

Sites log scalars with ``nvflare.client.tracking.SummaryWriter`` (``train/<part>`` per step,
``val/<metric>`` per round). NVFlare forwards them to the server, where ``TBAnalyticsReceiver``
writes ``tb_events/<site>/`` and :class:`JSONMetricsReceiver` writes ``bsf_metrics.json``::

    {"sites": {"site-1": {"train/loss": [[step, value], ...], "val/val_reconstruction_l1": [...]}, ...},
     "last": {"site-1": {"train/loss": value, ...}}}
"""

from __future__ import annotations

import math
import os
from typing import Any

from nvflare.apis.analytix import AnalyticsData, AnalyticsDataType
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.widgets.streaming import AnalyticsReceiver

from bsf.io import atomic_write_json

SUMMARY_FILE = "bsf_metrics.json"


class JSONMetricsReceiver(AnalyticsReceiver):
    """Collect streamed scalars per site and tag; write them to ``<run dir>/bsf_metrics.json``.

    Args:
        file_name: output file name inside the server's run folder.
        flush_every: rewrite the file after this many records (and always at the end).
    """

    def __init__(self, file_name: str = SUMMARY_FILE, flush_every: int = 50):
        super().__init__()
        self.file_name = file_name
        self.flush_every = flush_every
        self._series: dict[str, dict[str, list[list[float]]]] = {}
        self._path: str | None = None
        self._pending = 0

    def initialize(self, fl_ctx: FLContext):
        workspace = fl_ctx.get_engine().get_workspace()
        run_dir = workspace.get_run_dir(fl_ctx.get_job_id())
        os.makedirs(run_dir, exist_ok=True)
        self._path = os.path.join(run_dir, self.file_name)

    def _add(self, site: str, tag: str, value: Any, step: Any) -> None:
        try:
            value = float(value)
        except (TypeError, ValueError):
            return
        if not math.isfinite(value):
            value = None
        self._series.setdefault(site, {}).setdefault(tag, []).append([None if step is None else int(step), value])

    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str):
        try:
            data = AnalyticsData.from_dxo(from_shareable(shareable))
        except Exception:
            return
        if data is None:
            return
        if data.data_type == AnalyticsDataType.SCALAR:
            self._add(record_origin, data.tag, data.value, data.step)
        elif data.data_type == AnalyticsDataType.SCALARS and isinstance(data.value, dict):
            for key, value in data.value.items():
                self._add(record_origin, f"{data.tag}/{key}", value, data.step)
        elif data.data_type == AnalyticsDataType.METRIC:
            self._add(record_origin, data.tag, data.value, data.step)
        elif data.data_type == AnalyticsDataType.METRICS and isinstance(data.value, dict):
            for key, value in data.value.items():
                self._add(record_origin, key, value, data.step)
        self._pending += 1
        if self._pending >= self.flush_every:
            self._write()

    def _write(self) -> None:
        if not self._path:
            return
        # events travel asynchronously and can arrive out of order: keep each series sorted by step
        for tags in self._series.values():
            for points in tags.values():
                points.sort(key=lambda p: -1 if p[0] is None else p[0])
        last = {
            site: {tag: points[-1][1] for tag, points in tags.items() if points} for site, tags in self._series.items()
        }
        atomic_write_json({"sites": self._series, "last": last}, self._path)
        self._pending = 0

    def finalize(self, fl_ctx: FLContext):
        self._write()
