"""The last task-result filter at every site: only model weights and numbers leave.

:func:`check_result` is plain Python + NumPy: it inspects what a site is about to send and returns
every reason it must not leave. :class:`ResultGuard` is the NVFlare filter that the provisioned
``privacy.json`` puts last in the site's task-result chain (after any differential-privacy filter):
a result that breaks a rule is not sent (the filter raises; NVFlare then sends an error reply with no
data and logs the reasons at the site). Rules:

* the payload is a DXO of weights, weight differences or metrics, nothing else;
* weights: every key is a key of the job's model (the state dict the job's run config builds) with
  that key's shape, every value a finite-or-not floating array; nothing that is not a model tensor
  (so no image, label, per-case output or file name can ride along under any name);
* metrics and metadata: numbers only (a metrics dict of numbers is allowed), no strings, lists or arrays;
  the keys NVFlare itself adds are listed in :data:`NVFLARE_META`;
* headers (NVFlare's routing: task, round, peer) are scalars and short.

Every result the guard passes or refuses is recorded in ``<site workspace>/<job id>/bsf_privacy_audit.jsonl``
(tensor names, shapes, dtypes and bytes, metadata keys and values), so a site admin can read what
left the site.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

AUDIT_FILE = "bsf_privacy_audit.jsonl"
PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
WEIGHT_KINDS = ("WEIGHTS", "WEIGHT_DIFF")
METRICS_KIND = "METRICS"
#: metadata keys whose value may be a flat mapping of numbers (NVFlare puts a result's metrics there)
METRIC_MAPS = ("initial_metrics",)
#: metadata NVFlare adds on its own; values must still be numbers (or, here, short identifiers)
NVFLARE_META = {"client_name", "params_type", "processed_algorithm", "job_id", "task_id"}
MAX_HEADER_CHARS = 256


def _is_number(value: Any) -> bool:
    return isinstance(value, (numbers.Number, np.number)) and not isinstance(value, complex)


def _kind_name(kind: Any) -> str:
    return str(getattr(kind, "value", kind))


def _check_numbers(mapping: Any, where: str) -> list[str]:
    if not isinstance(mapping, Mapping):
        return [f"{where} is a {type(mapping).__name__}, not a mapping of numbers"]
    return [f"{where}[{k!r}] is a {type(v).__name__}, not a number" for k, v in mapping.items() if not _is_number(v)]


def check_result(
    dxo_kind: Any, data: Any, meta: Mapping[str, Any] | None, headers: Mapping[str, Any] | None,
    model_shapes: Mapping[str, tuple[int, ...]] | None,
) -> list[str]:
    """Reasons a site result must not leave (empty: it may).

    Args:
        dxo_kind: the DXO's data kind (``WEIGHTS``, ``WEIGHT_DIFF`` or ``METRICS``).
        data: the DXO's data.
        meta: the DXO's metadata.
        headers: the shareable's headers.
        model_shapes: key -> shape of the job's model (``None``: weights cannot be checked, refuse them).
    """
    kind = _kind_name(dxo_kind)
    problems: list[str] = []
    if kind in WEIGHT_KINDS:
        if model_shapes is None:
            return ["weights were sent but the job's model is unknown to the guard"]
        if not isinstance(data, Mapping) or not data:
            return [f"{kind} payload is not a non-empty mapping of tensors"]
        for key, value in data.items():
            if not isinstance(key, str) or not PARAM_NAME.match(key):
                problems.append(f"tensor name {key!r} is not a model parameter name")
            elif key not in model_shapes:
                problems.append(f"{key!r} is not a tensor of the job's model")
            arr = value if isinstance(value, np.ndarray) else None
            if arr is None:
                problems.append(f"{key!r} is a {type(value).__name__}, not a NumPy array")
                continue
            if not np.issubdtype(arr.dtype, np.floating):
                problems.append(f"{key!r} has dtype {arr.dtype}, not a floating type")
            if key in model_shapes and tuple(arr.shape) != tuple(model_shapes[key]):
                problems.append(f"{key!r} has shape {tuple(arr.shape)}, the model's is {tuple(model_shapes[key])}")
    elif kind == METRICS_KIND:
        problems.extend(_check_numbers(data, "metrics"))
    else:
        return [f"data kind {kind} may not leave the site (only weights, weight differences, metrics)"]
    for key, value in (meta or {}).items():
        if key in METRIC_MAPS:
            problems.extend(_check_numbers(value, f"meta[{key!r}]"))
        elif key in NVFLARE_META and isinstance(value, str) and len(value) <= MAX_HEADER_CHARS and "/" not in value:
            continue
        elif not (_is_number(value) or value is None):
            problems.append(f"meta[{key!r}] is a {type(value).__name__}, not a number")
    for key, value in (headers or {}).items():
        if isinstance(value, str) and len(value) > MAX_HEADER_CHARS:
            problems.append(f"header {key!r} holds {len(value)} characters")
        elif not (value is None or isinstance(value, (str, bool)) or _is_number(value)):
            problems.append(f"header {key!r} is a {type(value).__name__}, not a scalar")
    return problems


def describe_result(dxo_kind: Any, data: Any, meta: Mapping[str, Any] | None, headers: Mapping[str, Any] | None) -> dict:
    """What a result holds, for the audit log: tensor names/shapes/dtypes/bytes, metadata, header names."""
    tensors = {}
    numbers_ = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            if isinstance(value, np.ndarray):
                tensors[str(key)] = {"shape": list(value.shape), "dtype": str(value.dtype), "bytes": int(value.nbytes)}
            else:
                numbers_[str(key)] = value if _is_number(value) else f"<{type(value).__name__}>"

    def _plain(value: Any) -> Any:
        if _is_number(value):
            value = float(value) if isinstance(value, (float, np.floating)) else value
            return None if isinstance(value, float) and not math.isfinite(value) else (value.item() if hasattr(value, "item") else value)
        if isinstance(value, Mapping):
            return {str(k): _plain(v) for k, v in value.items()}
        if value is None or isinstance(value, (str, bool)):
            return value
        return f"<{type(value).__name__}>"

    return {
        "kind": _kind_name(dxo_kind),
        "tensors": tensors,
        "bytes": int(sum(t["bytes"] for t in tensors.values())),
        "data_values": {k: _plain(v) for k, v in numbers_.items()},
        "meta": {str(k): _plain(v) for k, v in (meta or {}).items()},
        "headers": sorted(str(k) for k in (headers or {})),
    }


def model_shapes_from_run_config(run_config: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of the model a job's run config builds (no data needed)."""
    from bsf.engine import load_config
    from bsf.fl.model_init import build_initial_model

    model = build_initial_model(load_config(run_config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


try:
    from nvflare.apis.filter import Filter
except ImportError:  # pragma: no cover - the pure checks above stay usable without NVFlare
    Filter = object  # type: ignore[assignment,misc]


class ResultGuard(Filter):  # type: ignore[misc,valid-type]
    """NVFlare task-result filter that lets only model tensors and numbers leave the site (see module docstring).

    Args:
        run_config: the job's run config, relative to the deployed app's ``config/`` folder.
        audit_file: file name of the audit log in the site's job folder.
    """

    def __init__(self, run_config: str = "bsf_run.yaml", audit_file: str = AUDIT_FILE):
        super().__init__()
        self.run_config = run_config
        self.audit_file = audit_file
        self._shapes: dict[str, dict[str, tuple[int, ...]] | None] = {}

    def _model_shapes(self, fl_ctx) -> dict[str, tuple[int, ...]] | None:
        from nvflare.apis.fl_constant import FLContextKey

        job_id = fl_ctx.get_job_id()
        if job_id not in self._shapes:
            app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT) or ""
            path = Path(app_root) / "config" / self.run_config
            self._shapes[job_id] = model_shapes_from_run_config(path) if path.is_file() else None
            if self._shapes[job_id] is None:
                self.log_warning(fl_ctx, f"no run config at {path}: weights of this job cannot be checked and are refused")
        return self._shapes[job_id]

    def _audit(self, fl_ctx, record: dict) -> None:
        workspace = fl_ctx.get_engine().get_workspace()
        path = Path(workspace.get_run_dir(fl_ctx.get_job_id())) / self.audit_file
        with open(path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def process(self, shareable, fl_ctx):
        from nvflare.apis.dxo import from_shareable
        from nvflare.apis.fl_constant import ReturnCode
        from nvflare.apis.shareable import make_reply

        site = fl_ctx.get_identity_name()
        task = fl_ctx.get_prop("__task_name__") or ""
        record: dict[str, Any] = {"time": round(time.time(), 3), "site": site, "task": task}
        rc = shareable.get_return_code()
        if rc != ReturnCode.OK:
            record.update(kind="reply", return_code=str(rc), allowed=True)
            self._audit(fl_ctx, record)
            return make_reply(rc)  # an error reply carries no data
        extra = sorted(set(shareable) - {"__headers__", "DXO"})
        try:
            dxo = from_shareable(shareable)
        except Exception as exc:
            problems = [f"the result is not a DXO ({exc})"]
            dxo = None
        headers = shareable.get("__headers__") or {}
        if dxo is not None:
            problems = check_result(dxo.data_kind, dxo.data, dxo.meta, headers, self._model_shapes(fl_ctx))
            record.update(describe_result(dxo.data_kind, dxo.data, dxo.meta, headers))
        if extra:
            problems.append(f"the result carries fields outside the DXO: {extra}")
        record.update(allowed=not problems, problems=problems)
        self._audit(fl_ctx, record)
        if problems:
            message = f"site {site}: REFUSED to send the {task or 'task'} result: " + "; ".join(problems[:10])
            self.log_error(fl_ctx, message)
            raise ValueError(message)
        return shareable
