"""The site-local policy files a BrainSegFounder-FL startup kit carries in ``local/`` (plain dicts, no NVFlare).

* ``resources.json``: NVFlare's own settings from ``resources.json.default`` plus the GPU resources
  (``GPUResourceManager``) and the class allow-list extended by :data:`BSF_CLASSES`
  (NVFlare 2.9 refuses to build a job component whose class is not listed).
* ``privacy.json``: one privacy scope, ``bsf`` (the default), whose task-result filters are,
  optionally, NVFlare's percentile or sparse-vector-technique differential-privacy filter, then
  :class:`bsf.fl.deploy.privacy.ResultGuard` (only the aggregated weights and numeric metadata leave).
  NVFlare runs a site's scope filters before the job's own, so in an encrypted job (``encryption: he``)
  the order is DP filter -> guard -> the job's encryptor (:mod:`bsf.fl.he`): the guard sees the plaintext.
* ``authorization.json``: who may do what at this site; bring-your-own-code (BYOC, the jobs' thin
  ``custom/bsf_client.py``) is allowed for the project admin and the consortium's ``lead`` role only.
"""

from __future__ import annotations

import copy
from typing import Any

from bsf.errors import ConfigError

#: Component classes of this project's jobs and site policies (added to NVFlare's default allow-list).
BSF_CLASSES = (
    "bsf.fl.aggregation.CheckedFedAvgAggregator",
    "bsf.fl.controller.CheckedFedAvg",
    "bsf.fl.crosssite.CrossSiteResultsWriter",
    "bsf.fl.metrics.JSONMetricsReceiver",
    "bsf.fl.persistor.BSFModelPersistor",
    "bsf.fl.deploy.privacy.ResultGuard",
    "bsf.fl.he.HEFedAvg",
    "bsf.fl.he.HEFedAvgAggregator",
    "bsf.fl.he.HEModelPersistor",
    "bsf.fl.he.SiteHEDecryptor",
    "bsf.fl.he.SiteHEEncryptor",
    "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
    "nvflare.app_opt.pt.file_model_locator.PTFileModelLocator",
    "nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
)

PRIVACY_SCOPE = "bsf"
DP_CHOICES = ("none", "percentile", "svt")
GUARD_PATH = "bsf.fl.deploy.privacy.ResultGuard"


def extend_allow_list(resources: dict[str, Any]) -> dict[str, Any]:
    """``resources`` with :data:`BSF_CLASSES` added to its ``class_allow_list`` (kept in enforce mode)."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    out = copy.deepcopy(resources)
    allowed = list(out.get("class_allow_list") or DEFAULT_CLASS_ALLOW_LIST)
    if "*" in allowed:
        raise ConfigError("resources.json: class_allow_list contains '*' (every class allowed); refusing to extend it")
    allowed.extend(c for c in BSF_CLASSES if c not in allowed)
    out["class_allow_list"] = allowed
    out["class_list_enforcement_mode"] = "enforce"
    return out


def set_gpu_resources(resources: dict[str, Any], num_gpus: int, mem_per_gpu_gib: float) -> dict[str, Any]:
    """``resources`` with the ``GPUResourceManager`` set to ``num_gpus`` x ``mem_per_gpu_gib`` (0 = CPU site)."""
    if num_gpus < 0 or mem_per_gpu_gib < 0:
        raise ConfigError(f"GPU resources must be >= 0, got {num_gpus} GPUs x {mem_per_gpu_gib} GiB")
    out = copy.deepcopy(resources)
    for component in out.get("components", []):
        if component.get("id") == "resource_manager":
            component.setdefault("args", {}).update({"num_of_gpus": int(num_gpus), "mem_per_gpu_in_GiB": mem_per_gpu_gib})
            return out
    raise ConfigError("resources.json has no 'resource_manager' component to set the GPUs on")


def privacy_policy(dp: str = "none", percentile: float = 10.0, gamma: float = 0.01, epsilon: float = 0.1,
                   fraction: float = 0.1) -> dict[str, Any]:
    """The ``privacy.json`` of a site: the result guard, then optionally a differential-privacy filter.

    Args:
        dp: ``none``; ``percentile`` (NVFlare ``PercentilePrivacy``: only weight differences above the
            ``percentile``-th percentile of magnitudes are shared, clipped to ``gamma``); ``svt``
            (NVFlare ``SVTPrivacy``: sparse vector technique, ``fraction`` of the differences with
            privacy budget ``epsilon``). Both act on weight differences (the jobs' default transfer).
    """
    if dp not in DP_CHOICES:
        raise ConfigError(f"privacy filter must be one of {DP_CHOICES}, got {dp!r}")
    filters: list[dict[str, Any]] = []
    if dp == "percentile":
        filters.append({"path": "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
                        "args": {"percentile": percentile, "gamma": gamma}})
    elif dp == "svt":
        filters.append({"path": "nvflare.app_common.filters.svt_privacy.SVTPrivacy",
                        "args": {"fraction": fraction, "epsilon": epsilon}})
    filters.append({"path": GUARD_PATH, "args": {}})  # last: it sees exactly what leaves
    return {
        "scopes": [{"name": PRIVACY_SCOPE, "properties": {}, "task_result_filters": filters, "task_data_filters": []}],
        "default_scope": PRIVACY_SCOPE,
    }


def authorization_policy() -> dict[str, Any]:
    """A site's ``authorization.json``: BYOC jobs only from the project admin and ``lead`` users."""
    return {
        "format_version": "1.0",
        "permissions": {
            "project_admin": "any",
            "org_admin": {
                "submit_job": "none", "clone_job": "none", "manage_job": "o:submitter", "download_job": "o:submitter",
                "view": "any", "operate": "o:site", "shell_commands": "o:site", "byoc": "none",
            },
            "lead": {
                "submit_job": "any", "clone_job": "n:submitter", "manage_job": "n:submitter",
                "download_job": "n:submitter", "view": "any", "operate": "o:site", "shell_commands": "o:site",
                "byoc": "any",
            },
            "member": {"view": "any"},
        },
    }
