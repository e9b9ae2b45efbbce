"""The last task-result filter at every site: only model weights and numbers leave.

:func:`check_shareable` (and :func:`check_result` for a DXO's parts) is plain Python + NumPy: it
inspects what a site is about to send and returns every reason it must not leave. :class:`ResultGuard`
is the NVFlare filter that the provisioned ``privacy.json`` puts last in the site's task-result chain
(after any differential-privacy filter): a result that breaks a rule is not sent (the filter raises;
NVFlare then sends an error reply with no data and logs the reasons at the site).

The allow-list (everything else is refused, naming the field):

* **the shareable**: exactly ``__headers__`` and ``DXO``; the DXO exactly ``kind``, ``data``, ``meta``;
  the kind ``WEIGHTS`` or ``WEIGHT_DIFF`` (a train or submit_model task) or ``METRICS`` (validate);
* **weights**: each key a tensor of the job's model (the state dict its run config builds) with that
  key's shape (Stage 3 across tasks, ``federation.tasks``: the shared tensors and this site's own task's head in
  its namespace, ``task.<data set>.out.*``, the task from the site's configuration as the site reads it; another
  task's head is refused); each value a ``numpy.ndarray`` (no subclass) of float16, float32 or float64 (no int,
  bool, complex, object, wider float), every value finite (a NaN's payload bits could carry data);
* **metrics** (the data of ``METRICS``, or meta ``initial_metrics``): names from :data:`SITE_METRICS`
  only, values Python ``float`` or NumPy floating of at most 64 bits, finite (no int, bool, Fraction,
  Decimal, complex, string);
* **meta**: only the keys of :data:`META_RULES`: the site's counts (``NUM_STEPS_CURRENT_ROUND`` and
  ``num_cases`` non-negative ints up to :data:`MAX_COUNT`, ``site_step`` up to :data:`MAX_SITE_STEP`),
  NVFlare's ``initial_metrics`` (metrics, above), the names NVFlare's DP filters add
  (``filter_history``: :data:`DP_FILTERS`; SVT's accounting records of :data:`SVT_FIELDS`), identifiers
  NVFlare may echo (``job_id``, ``site_name``, ``client_name``, ``task_id``: :data:`IDENTIFIER`),
  ``validate_type`` (NVFlare's two values), ``modalities`` (what the site holds: distinct canonical names);
* **SCAFFOLD** (a job with ``federation.algorithm: scaffold`` only): meta ``scaffold_c_diff``
  (:data:`bsf.fl.scaffold.CONTROL_DIFF`) on a weights result, a mapping with exactly the keys of the weights it
  rides with, each a tensor like them (plain ndarray, float16/32/64, that key's shape, finite); in any other job,
  or on a metrics result, the key is refused like any unknown one;
* **headers**: only the names of :data:`HEADER_RULES`, the ones NVFlare sets on a task result
  (``__content_type__`` = ``DXO``, ``start_round``/``current_round``/``num_rounds`` bounded ints,
  ``_validate_type``, ``__rc__`` = ``OK``, task name/id and audit id as identifiers);
* an error reply leaves as a fresh reply holding only a known NVFlare return code.

Encrypted jobs (``federation.encryption: he``, :mod:`bsf.fl.he`): NVFlare runs the site's scope filters before
the job's, so the guard checks the plaintext update and the job's encryptor runs after it (DP filter -> guard ->
encryption). The server can then check nothing, so the guard also takes over the server's bound of the weight
claim: ``NUM_STEPS_CURRENT_ROUND`` must be an int in ``[1, local_steps]`` (:func:`check_encrypted_claim`).

What the list cannot close: the values of the model's own tensors (a site's code could hide bits in
their low digits) and a handful of metric floats per result. Their capacity is fixed by the model's
size and :data:`SITE_METRICS`, and nothing else can ride along.

Every result the guard passes or refuses is recorded in ``<site workspace>/<job id>/bsf_privacy_audit.jsonl``
(tensor names, shapes, dtypes and bytes, metadata keys and values, header names); any name that is not
a tensor of the job's model, and any string, is cut to :data:`AUDIT_CHARS` characters, so the record
never copies what it refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

import numpy as np

from bsf.errors import BSFError
from bsf.federation.modality import META_MODALITIES, MODALITY_ORDER
from bsf.federation.fedcost import LOSS_AFTER, LOSS_BEFORE
from bsf.fl.aggregation import FLOAT_DTYPES, MAX_CLAIM, META_NUM_CASES, META_NUM_STEPS
from bsf.fl.scaffold import CONTROL_DIFF

AUDIT_FILE = "bsf_privacy_audit.jsonl"
WEIGHT_KINDS = ("WEIGHTS", "WEIGHT_DIFF")
METRICS_KIND = "METRICS"
SHAREABLE_FIELDS = frozenset({"__headers__", "DXO"})
DXO_FIELDS = frozenset({"kind", "data", "meta"})
#: tensor dtypes that may leave: real floating point of 16, 32 or 64 bits (what the server accepts)
WEIGHT_DTYPES = FLOAT_DTYPES

#: BraTS regions in the names :meth:`bsf.engine.segmentation.SegmentationTask.dice` gives them
#: (``bsf.metrics.BRATS_REGIONS`` lower-cased; a test checks they agree)
BRATS_REGION_NAMES = ("tc", "wt", "et")
#: :meth:`bsf.federation.site_trainer.SiteTrainer.train` adds the mean training loss of the round (and, with
#: ``weigh_by: fedcostwavg``, the losses of its first and last local step: :mod:`bsf.federation.fedcost`)
TRAIN_METRICS = ("train_loss", LOSS_BEFORE, LOSS_AFTER)
#: :meth:`bsf.engine.tasks.SSLTask.validate` (Stage 1 and 2)
SSL_METRICS = ("val_loss", "val_rotation", "val_reconstruction_l1", "val_contrastive")
#: :meth:`bsf.engine.segmentation.SegmentationTask.validate` (Stage 3, BraTS regions or the ATLAS lesion)
SEGMENTATION_METRICS = (*(f"val_dice_{r}" for r in BRATS_REGION_NAMES), "val_dice_lesion", "val_dice_mean")
#: every metric name a site's result may carry
SITE_METRICS = frozenset((*TRAIN_METRICS, *SSL_METRICS, *SEGMENTATION_METRICS))

#: bound of a per-round count (steps of one round, training cases of one site): the server's bound of a claim
MAX_COUNT = MAX_CLAIM
#: bound of the site's total step count and of round numbers
MAX_SITE_STEP = 1_000_000_000
#: a name NVFlare or the project gives: short, letters, digits, ``.``, ``_``, ``-``; no separators, no spaces
IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: NVFlare's differential-privacy filters (the names ``filter_history`` may hold)
DP_FILTERS = frozenset({"PercentilePrivacy", "SVTPrivacy"})
#: the fields of NVFlare's SVT accounting records (meta ``svt_privacy_budget`` / ``svt_privacy_accountant``)
SVT_FIELDS = frozenset({
    "accountant", "scope", "delta", "round", "latest_round", "epsilon_total", "epsilon_threshold",
    "epsilon_query", "epsilon_release", "n_upload", "acceptance_passes", "has_scalar_passthrough", "calls", "note",
})
#: the only strings NVFlare 2.9's SVT filter writes into those records
SVT_TEXTS = frozenset({
    "pure_dp_sum", "filter-level",
    "scalar passthrough is not noise-protected by the SVT accountant.",
    "scalar passthrough is not included in the SVT accountant guarantee.",
})
VALIDATE_TYPES = frozenset({"before_train_validate", "model_validate"})
#: names and strings in messages and the audit record are cut to this many characters
AUDIT_CHARS = 48
#: most problems one refusal lists in its message and audit record
MAX_PROBLEMS = 20

Rule = Callable[[Any, str], list]


class ResultRefused(BSFError, ValueError):
    """A site's task result holds something the guard does not let leave; the message names each field."""


# ------------------------------------------------------------------ naming without copying
def _name(value: Any) -> str:
    """A key or string as it may appear in a message: quoted, cut to :data:`AUDIT_CHARS` characters (else its type)."""
    if not isinstance(value, str):
        return f"<{_type(value)}>"
    if len(value) > AUDIT_CHARS:
        return repr(value[:AUDIT_CHARS]) + f"...({len(value)} chars)"
    return repr(value)


def _type(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{type(value).__name__} {value.dtype} {tuple(value.shape)}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"int of {value.bit_length()} bits"
    return type(value).__name__


def _kind_name(kind: Any) -> str | None:
    """The kind as a string when it is a plain ``str`` or a string enum member (NVFlare's ``DataKind``)."""
    if type(kind) is str or (isinstance(kind, str) and isinstance(kind, Enum)):
        return str(getattr(kind, "value", kind))
    return None


# ------------------------------------------------------------------ value rules
def _is_float(value: Any) -> bool:
    """A Python float or a NumPy floating scalar of at most 64 bits (no subclass, no wider float)."""
    return type(value) is float or (isinstance(value, np.floating) and value.dtype in WEIGHT_DTYPES)


def _is_int(value: Any) -> bool:
    """A Python int or NumPy integer scalar, not a bool."""
    return type(value) is int or isinstance(value, np.integer)


def _metric_value(value: Any, where: str) -> list[str]:
    if not _is_float(value):
        return [f"{where} is a {_type(value)}, not a float of at most 64 bits"]
    if not math.isfinite(float(value)):
        return [f"{where} is not finite"]
    return []


def _metrics(mapping: Any, where: str) -> list[str]:
    """A mapping of :data:`SITE_METRICS` names to finite floats."""
    if not isinstance(mapping, Mapping):
        return [f"{where} is a {_type(mapping)}, not a mapping of metrics"]
    problems = []
    for key, value in mapping.items():
        if key not in SITE_METRICS:
            problems.append(f"{where} name {_name(key)} is not a metric a site sends")
        else:
            problems.extend(_metric_value(value, f"{where}[{key!r}]"))
    return problems


def _count(bound: int) -> Rule:
    def rule(value: Any, where: str) -> list[str]:
        if not _is_int(value):
            return [f"{where} is a {_type(value)}, not an int"]
        if not 0 <= value <= bound:
            return [f"{where} is outside [0, {bound}]"]
        return []

    return rule


def _identifier(value: Any, where: str) -> list[str]:
    if type(value) is not str:
        return [f"{where} is a {_type(value)}, not an identifier"]
    if not IDENTIFIER.match(value):
        return [f"{where} {_name(value)} is not an identifier (1-64 of A-Z a-z 0-9 . _ -)"]
    return []


def _one_of(choices: frozenset[str]) -> Rule:
    def rule(value: Any, where: str) -> list[str]:
        if type(value) is not str or value not in choices:
            return [f"{where} {_name(value)} is not one of {sorted(choices)}"]
        return []

    return rule


def _filter_history(value: Any, where: str) -> list[str]:
    if type(value) is not list or len(value) > len(DP_FILTERS):
        return [f"{where} is a {_type(value)}, not a short list of filter names"]
    return [f"{where} holds {_name(v)}, not one of {sorted(DP_FILTERS)}"
            for v in value if type(v) is not str or v not in DP_FILTERS]


def _modalities(value: Any, where: str) -> list[str]:
    """The modalities a site holds (:data:`bsf.federation.modality.META_MODALITIES`): distinct canonical names."""
    if type(value) is not list or not 1 <= len(value) <= len(MODALITY_ORDER):
        return [f"{where} is a {_type(value)}, not a short list of modality names"]
    problems = [f"{where} holds {_name(v)}, not one of {list(MODALITY_ORDER)}"
                for v in value if type(v) is not str or v not in MODALITY_ORDER]
    return problems or ([] if len(set(value)) == len(value) else [f"{where} repeats a modality"])


def _svt_record(value: Any, where: str) -> list[str]:
    """NVFlare's SVT accounting record: its fields only; numbers, bools, ``None`` or its own fixed texts."""
    if not isinstance(value, Mapping):
        return [f"{where} is a {_type(value)}, not an SVT accounting record"]
    problems = []
    for key, item in value.items():
        at = f"{where}[{_name(key)}]"
        if key not in SVT_FIELDS:
            problems.append(f"{at} is not a field of NVFlare's SVT record")
        elif type(item) is str:
            problems.extend([] if item in SVT_TEXTS else [f"{at} {_name(item)} is not one of NVFlare's SVT texts"])
        elif not (item is None or type(item) is bool or _is_float(item) or (_is_int(item) and abs(item) <= MAX_SITE_STEP)):
            problems.append(f"{at} is a {_type(item)}, not a bounded number")
    return problems


#: meta key -> rule (the project's counts, NVFlare's additions)
META_RULES: dict[str, Rule] = {
    META_NUM_STEPS: _count(MAX_COUNT),
    META_NUM_CASES: _count(MAX_COUNT),
    "site_step": _count(MAX_SITE_STEP),
    "initial_metrics": _metrics,
    "filter_history": _filter_history,
    "svt_privacy_budget": _svt_record,
    "svt_privacy_accountant": _svt_record,
    "job_id": _identifier,
    "site_name": _identifier,
    "client_name": _identifier,
    "task_id": _identifier,
    "validate_type": _one_of(VALIDATE_TYPES),
    META_MODALITIES: _modalities,
}
#: header name -> rule (what NVFlare sets on a task result)
HEADER_RULES: dict[str, Rule] = {
    "__content_type__": _one_of(frozenset({"DXO"})),
    "start_round": _count(MAX_SITE_STEP),
    "current_round": _count(MAX_SITE_STEP),
    "num_rounds": _count(MAX_SITE_STEP),
    "_validate_type": _one_of(VALIDATE_TYPES),
    "__rc__": _one_of(frozenset({"OK"})),
    "__task_name__": _identifier,
    "__task_id__": _identifier,
    "__audit_event_id__": _identifier,
}


def _keyed(mapping: Any, rules: Mapping[str, Rule], what: str) -> list[str]:
    """Every key of ``mapping`` must have a rule, and its value must pass it."""
    if mapping is None:
        return []
    if not isinstance(mapping, Mapping):
        return [f"{what} is a {_type(mapping)}, not a mapping"]
    problems = []
    for key, value in mapping.items():
        rule = rules.get(key) if type(key) is str else None
        if rule is None:
            problems.append(f"{what} key {_name(key)} is not allowed (allowed: {sorted(rules)})")
        else:
            problems.extend(rule(value, f"{what}[{key!r}]"))
    return problems


# ------------------------------------------------------------------ weights
def _tensor(key: str, value: Any, shape: tuple[int, ...]) -> list[str]:
    """Problems of one model tensor: a plain ndarray of an allowed dtype with the model's shape, finite."""
    where = f"tensor {key!r}"
    if type(value) is not np.ndarray:
        return [f"{where} is a {_type(value)}, not a NumPy array"]
    if value.dtype not in WEIGHT_DTYPES:
        return [f"{where} has dtype {value.dtype}, not float16/float32/float64"]
    if tuple(value.shape) != tuple(shape):
        return [f"{where} has shape {tuple(value.shape)}, the model's is {tuple(shape)}"]
    if not np.isfinite(value).all():
        return [f"{where} holds NaN or Inf"]
    return []


def _weights(kind: str, data: Any, model_shapes: Mapping[str, tuple[int, ...]] | None) -> list[str]:
    if model_shapes is None:
        return ["weights were sent but the job's model is unknown to the guard"]
    if not isinstance(data, Mapping) or not data:
        return [f"the {kind} data is not a non-empty mapping of tensors"]
    problems = []
    for key, value in data.items():
        if type(key) is not str or key not in model_shapes:
            problems.append(f"tensor name {_name(key)} is not a tensor of the job's model")
        else:
            problems.extend(_tensor(key, value, model_shapes[key]))
    return problems


def _controls(value: Any, data: Any) -> list[str]:
    """SCAFFOLD's control-variate change: exactly the keys of the weights sent (``data``), each a tensor like them."""
    where = f"meta[{CONTROL_DIFF!r}]"
    if not isinstance(value, Mapping) or not isinstance(data, Mapping):
        return [f"{where} is a {_type(value)}, not a mapping of tensors"]
    problems = [f"{where} key {_name(k)} is not a tensor of the weights sent" for k in value if k not in data]
    missing = [k for k in data if k not in value]
    if missing:
        problems.append(f"{where} lacks {len(missing)} key(s) of the weights sent, e.g. {[_name(k) for k in missing[:3]]}")
    for key in value:
        if key in data and type(data[key]) is np.ndarray:
            problems.extend(f"{where}: {p}" for p in _tensor(key, value[key], data[key].shape))
    return problems


# ------------------------------------------------------------------ the whole result
def check_result(
    dxo_kind: Any, data: Any, meta: Mapping[str, Any] | None, headers: Mapping[str, Any] | None,
    model_shapes: Mapping[str, tuple[int, ...]] | None, scaffold: bool = False,
) -> list[str]:
    """Reasons a site result must not leave (empty: it may).

    Args:
        dxo_kind: the DXO's data kind (``WEIGHTS``, ``WEIGHT_DIFF`` or ``METRICS``).
        data: the DXO's data: tensor name -> array of the model's shape, or metric name -> float.
        meta: the DXO's metadata.
        headers: the shareable's headers.
        model_shapes: key -> shape of the job's model (``None``: weights cannot be checked, refuse them).
        scaffold: the job runs SCAFFOLD: a weights result may carry meta ``scaffold_c_diff`` (see the module docstring).
    """
    kind = _kind_name(dxo_kind)
    if kind not in (*WEIGHT_KINDS, METRICS_KIND):
        return [f"DXO kind {_name(dxo_kind)} may not leave the site (only WEIGHTS, WEIGHT_DIFF, METRICS)"]
    if kind in WEIGHT_KINDS:
        problems = _weights(kind, data, model_shapes)
    else:
        problems = _metrics(data, "metrics")
    if scaffold and kind in WEIGHT_KINDS and isinstance(meta, Mapping) and CONTROL_DIFF in meta:
        problems.extend(_controls(meta[CONTROL_DIFF], data))
        meta = {k: v for k, v in meta.items() if k != CONTROL_DIFF}
    problems.extend(_keyed(meta, META_RULES, "meta"))
    problems.extend(_keyed(headers, HEADER_RULES, "header"))
    return problems


def check_shareable(shareable: Mapping[str, Any], model_shapes: Mapping[str, tuple[int, ...]] | None,
                    scaffold: bool = False) -> list[str]:
    """Reasons a whole task result (an NVFlare ``Shareable``, a dict) must not leave (empty: it may)."""
    problems = []
    extra = [_name(k) for k in shareable if k not in SHAREABLE_FIELDS]
    if extra:
        problems.append(f"the result carries fields outside the DXO: {', '.join(sorted(extra))}")
    dxo = shareable.get("DXO")
    if not isinstance(dxo, Mapping):
        return [*problems, f"the result's DXO is a {_type(dxo)}, not a DXO"]
    extra = [_name(k) for k in dxo if k not in DXO_FIELDS]
    if extra:
        problems.append(f"the DXO carries fields other than kind, data, meta: {', '.join(sorted(extra))}")
    problems.extend(check_result(dxo.get("kind"), dxo.get("data"), dxo.get("meta"), shareable.get("__headers__"), model_shapes,
                                 scaffold))
    return problems


# ------------------------------------------------------------------ the audit record
def _plain(value: Any, depth: int = 0) -> Any:
    """A JSON value that says what ``value`` is without copying more than a few characters of it."""
    if value is None or type(value) is bool:
        return value
    if _is_float(value):
        return float(value) if math.isfinite(float(value)) else None
    if _is_int(value) and abs(int(value)) <= MAX_SITE_STEP:
        return int(value)
    if type(value) is str:
        return value if len(value) <= AUDIT_CHARS else value[:AUDIT_CHARS] + f"...({len(value)} chars)"
    if isinstance(value, Mapping) and depth < 2:
        return {_plain_key(k): _plain(v, depth + 1) for k, v in list(value.items())[:MAX_PROBLEMS]}
    if type(value) in (list, tuple) and depth < 2:
        return [_plain(v, depth + 1) for v in value[:8]]
    return f"<{_type(value)}>"


def _plain_key(key: Any) -> str:
    return _plain(key) if type(key) is str else f"<{type(key).__name__}>"


def describe_result(
    dxo_kind: Any, data: Any, meta: Mapping[str, Any] | None, headers: Mapping[str, Any] | None,
    model_keys: Collection[str] = (),
) -> dict:
    """What a result holds, for the audit log: tensor names/shapes/dtypes/bytes, metadata, header names.

    Names of the job's model tensors (``model_keys``) are written in full; every other name or string
    is cut to :data:`AUDIT_CHARS` characters.
    """
    tensors = {}
    values = {}
    for key, value in (data.items() if isinstance(data, Mapping) else []):
        name = key if type(key) is str and key in model_keys else _plain_key(key)
        if isinstance(value, np.ndarray):
            tensors[name] = {"shape": list(value.shape), "dtype": str(value.dtype), "bytes": int(value.nbytes)}
        else:
            values[name] = _plain(value)
    return {
        "kind": _plain(_kind_name(dxo_kind) or dxo_kind),
        "tensors": tensors,
        "bytes": int(sum(t["bytes"] for t in tensors.values())),
        "data_values": values,
        "meta": _plain(meta if meta is not None else {}),
        "headers": sorted(_plain_key(k) for k in (headers if isinstance(headers, Mapping) else {})),
    }


def check_encrypted_claim(kind: Any, meta: Mapping[str, Any] | None, local_steps: int) -> list[str]:
    """Encrypted jobs: a weight result's step claim must be an int in ``[1, local_steps]``.

    The site's encryptor scales its update by that claim and the server, seeing only ciphertexts, cannot
    clip it (as it does in the clear), so the bound is checked here, before encryption.
    """
    if _kind_name(kind) not in WEIGHT_KINDS:
        return []
    claim = (meta or {}).get(META_NUM_STEPS)
    if type(claim) is not int or not 1 <= claim <= local_steps:
        return [f"meta[{META_NUM_STEPS!r}] {_plain(claim)!r} is not an int in [1, {local_steps}] (the job's local steps; "
                "an encrypted update is weighted by it and the server cannot clip it)"]
    return []


def model_shapes_from_run_config(run_config: str | os.PathLike, site: str = "", workspace: str | os.PathLike | None = None
                                 ) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of the model a job's run config builds (no data needed).

    Across tasks (``federation.tasks``): the tensors ``site`` may send, the shared ones and its own task's head
    named as the global model names them; its task is its data set in its site configuration (found from its
    ``workspace`` as the site itself finds it, :func:`bsf.federation.site_config.resolve_site`).
    """
    from bsf.engine import load_config
    from bsf.federation.initial_model import build_initial_model
    from bsf.federation.site_config import load_with_site, resolve_site
    from bsf.federation.task_heads import for_task, site_task, to_global

    config = load_config(run_config)
    tasks = config.federation.tasks if config.federation is not None else []
    task = None
    if tasks:
        dataset = load_with_site(run_config, resolve_site(site, workspace)).data.dataset
        task = site_task(tasks, dataset, f"site {site}")
        config = for_task(config, task)
    shapes = {k: tuple(v.shape) for k, v in build_initial_model(config).state_dict().items()}
    return shapes if task is None else to_global(shapes, task)


def _encrypted_local_steps(run_config: str | os.PathLike) -> int | None:
    """The job's ``federation.local_steps`` when its updates are encrypted (``encryption: he``), else ``None``."""
    from bsf.engine import load_config

    federation = load_config(run_config).federation
    return federation.local_steps if federation is not None and federation.encryption == "he" else None


def _is_scaffold(run_config: str | os.PathLike) -> bool:
    """Whether a job's run config runs ``federation.algorithm: scaffold``."""
    from bsf.engine import load_config

    federation = load_config(run_config).federation
    return federation is not None and federation.algorithm == "scaffold"


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
        self._encrypted_steps: dict[str, int | None] = {}  # job -> its local steps when it is encrypted (HE)
        self._scaffold: dict[str, bool] = {}  # job -> whether it runs SCAFFOLD (its results carry control variates)

    def _model_shapes(self, fl_ctx) -> dict[str, tuple[int, ...]] | None:
        from nvflare.apis.fl_constant import FLContextKey

        job_id = fl_ctx.get_job_id()
        if job_id not in self._shapes:
            app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT) or ""
            path = Path(app_root) / "config" / self.run_config
            site_workspace = Path(app_root).parent.parent  # <workspace>/<job>/app_<site>, as the site finds it
            self._shapes[job_id] = (model_shapes_from_run_config(path, fl_ctx.get_identity_name(), site_workspace)
                                    if path.is_file() else None)
            self._encrypted_steps[job_id] = _encrypted_local_steps(path) if path.is_file() else None
            self._scaffold[job_id] = path.is_file() and _is_scaffold(path)
            if self._shapes[job_id] is None:
                self.log_warning(fl_ctx, f"no run config at {path}: weights of this job cannot be checked and are refused")
        return self._shapes[job_id]

    def _audit(self, fl_ctx, record: dict) -> None:
        workspace = fl_ctx.get_engine().get_workspace()
        path = Path(workspace.get_run_dir(fl_ctx.get_job_id())) / self.audit_file
        with open(path, "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def _error_reply(self, fl_ctx, rc: Any, record: dict):
        """An error reply leaves as a fresh reply with a known return code and nothing else."""
        from nvflare.apis.fl_constant import ReturnCode
        from nvflare.apis.shareable import make_reply

        codes = {v for k, v in vars(ReturnCode).items() if k.isupper()}
        safe = rc if type(rc) is str and rc in codes else ReturnCode.EXECUTION_EXCEPTION
        record.update(kind="reply", return_code=safe, allowed=True)
        if safe != rc:
            record["problems"] = [f"return code {_name(rc)} is not NVFlare's; sent {safe}"]
        self._audit(fl_ctx, record)
        return make_reply(safe)

    def process(self, shareable, fl_ctx):
        site = fl_ctx.get_identity_name()
        task = fl_ctx.get_prop("__task_name__") or ""
        record: dict[str, Any] = {"time": round(time.time(), 3), "site": site, "task": task}
        rc = shareable.get_return_code()
        if rc != "OK":
            return self._error_reply(fl_ctx, rc, record)
        shapes = self._model_shapes(fl_ctx)
        problems = check_shareable(shareable, shapes, self._scaffold.get(fl_ctx.get_job_id(), False))
        dxo = shareable.get("DXO")
        local_steps = self._encrypted_steps.get(fl_ctx.get_job_id())
        if local_steps is not None and isinstance(dxo, Mapping):
            problems.extend(check_encrypted_claim(dxo.get("kind"), dxo.get("meta"), local_steps))
        if isinstance(dxo, Mapping):
            record.update(describe_result(dxo.get("kind"), dxo.get("data"), dxo.get("meta"), shareable.get("__headers__"),
                                          model_keys=shapes or ()))
        record.update(allowed=not problems, problems=problems[:MAX_PROBLEMS], problem_count=len(problems))
        self._audit(fl_ctx, record)
        if problems:
            message = f"site {site}: REFUSED to send the {task or 'task'} result: " + "; ".join(problems[:10])
            self.log_error(fl_ctx, message)
            raise ResultRefused(message)
        return shareable
