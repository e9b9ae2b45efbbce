"""Stage 3 across tasks (``federation.tasks``): one shared SwinUNETR body, one output head per task.

A BraTS site predicts 3 channels (TC, WT, ET), an ATLAS site 1 (the lesion); everything but SwinUNETR's output
head (``out.*``: ``out.conv.conv.weight`` ``(K, F, 1, 1, 1)`` and ``out.conv.conv.bias`` ``(K,)``, ``K`` the task's
channels) has the same shape at both, so the encoder and decoder are shared by all sites and each head only by the
sites of its task. The global model holds the shared tensors under their own names plus every task's head under
the task's namespace::

    swinViT.patch_embed.proj.weight, ..., decoder1.*, ...     shared: averaged over every site
    task.brats.out.conv.conv.weight  (3, F, 1, 1, 1)          BraTS head: over the BraTS sites only
    task.atlas.out.conv.conv.weight  (1, F, 1, 1, 1)          ATLAS head: over the ATLAS sites only

A site trains a plain SwinUNETR of its own task (its ``model.out_channels`` from its data set:
:data:`TASK_OUT_CHANNELS`). It loads the shared tensors and its own task's head (:func:`to_local`) and sends the
shared tensors and its head renamed into its task's namespace (:func:`to_global`). The server checks that an
update holds every shared key and exactly one task's complete head (:func:`update_task`) and averages each key
over the sites that sent it (:class:`bsf.federation.weighted_mean.WeightedMean`)::

    W[k] = sum_{s sent k} w_s W_s[k] / sum_{s sent k} w_s

with the job's site weights ``w_s``; a head no accepted site sent in a round is left as it is (the updates are
differences). Plain NumPy, no NVFlare, no torch.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from bsf.errors import BSFError

__all__ = [
    "HEAD_PREFIX",
    "TASK_NAMESPACE",
    "TASK_OUT_CHANNELS",
    "TaskHeadError",
    "is_head",
    "task_key",
    "split_task_key",
    "head_keys",
    "to_global",
    "to_local",
    "merge_task_models",
    "update_task",
    "site_task",
    "task_settings",
    "for_task",
]

#: SwinUNETR's output head (MONAI's ``UnetOutBlock``): the only tensors whose shape depends on the task.
HEAD_PREFIX = "out."
#: The global model's namespace of the task heads: ``task.<data set>.out.*``.
TASK_NAMESPACE = "task."
#: Output channels of each task's head (by its data set): BraTS TC, WT, ET; ATLAS the lesion (sigmoid each).
TASK_OUT_CHANNELS: dict[str, int] = {"brats": 3, "atlas": 1}

V = TypeVar("V")


class TaskHeadError(BSFError):
    """A multi-task update or model does not hold the shared tensors and exactly one task's head (names the key)."""


def is_head(key: str) -> bool:
    """Whether a plain SwinUNETR state-dict key belongs to the output head (``out.*``)."""
    return key.startswith(HEAD_PREFIX)


def task_key(task: str, key: str) -> str:
    """The global name of head key ``key`` of ``task``: ``out.conv.conv.bias`` -> ``task.brats.out.conv.conv.bias``."""
    if not is_head(key):
        raise TaskHeadError(f"{key!r} is not an output-head key ({HEAD_PREFIX}*)")
    return f"{TASK_NAMESPACE}{task}.{key}"


def split_task_key(key: str) -> tuple[str, str] | None:
    """``task.brats.out.conv.conv.bias`` -> ``("brats", "out.conv.conv.bias")``; ``None`` for a shared key."""
    if not key.startswith(TASK_NAMESPACE):
        return None
    task, _, head = key[len(TASK_NAMESPACE):].partition(".")
    return (task, head) if task and is_head(head) else None


def head_keys(keys: Iterable[str], task: str) -> list[str]:
    """The global keys among ``keys`` that are ``task``'s head."""
    return [k for k in keys if (split_task_key(k) or ("", ""))[0] == task]


def to_global(local: Mapping[str, V], task: str) -> dict[str, V]:
    """A site's tensors (plain SwinUNETR names) as the global model names them: its head into ``task``'s namespace."""
    return {(task_key(task, k) if is_head(k) else k): v for k, v in local.items()}


def to_local(global_params: Mapping[str, V], task: str, require_head: bool = True) -> dict[str, V]:
    """What a site of ``task`` takes from a global model: the shared tensors and its task's head as ``out.*``.

    Other tasks' heads are dropped. ``require_head=False``: a model without ``task``'s head (another task's site's
    model, in cross-site evaluation) gives the shared tensors only, the site keeps its own head.

    Raises:
        TaskHeadError: ``require_head`` and ``task`` has no head in ``global_params``.
    """
    out: dict[str, V] = {}
    for key, value in global_params.items():
        split = split_task_key(key)
        if split is None:
            if is_head(key):
                raise TaskHeadError(f"{key!r}: a multi-task model names its heads {TASK_NAMESPACE}<task>.{key}")
            out[key] = value
        elif split[0] == task:
            out[split[1]] = value
    if require_head and not any(is_head(k) for k in out):
        present = sorted({s[0] for s in map(split_task_key, global_params) if s})
        raise TaskHeadError(f"the model holds no head of task {task!r} (its tasks: {', '.join(present) or 'none'})")
    return out


def merge_task_models(per_task: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """One global model from one plain model per task (``task -> state``): the shared tensors (equal in all of
    them) once, every task's head in its namespace.

    Raises:
        TaskHeadError: the tasks' shared tensors differ in keys or values (they must come from one seeded build).
    """
    tasks = list(per_task)
    if not tasks:
        raise TaskHeadError("no task to merge")
    first = per_task[tasks[0]]
    shared = {k: v for k, v in first.items() if not is_head(k)}
    merged = dict(shared)
    for task in tasks:
        state = per_task[task]
        other = {k for k in state if not is_head(k)}
        if other != set(shared):
            raise TaskHeadError(f"task {task}'s model has other shared keys than task {tasks[0]}'s: "
                                f"{sorted(other ^ set(shared))[:3]}")
        differ = [k for k in shared if not np.array_equal(np.asarray(state[k]), np.asarray(shared[k]))]
        if differ:
            raise TaskHeadError(f"task {task}'s shared tensors differ from task {tasks[0]}'s, e.g. {differ[:3]}")
        merged.update(to_global({k: v for k, v in state.items() if is_head(k)}, task))
    return merged


def update_task(keys: Iterable[str], reference: Iterable[str]) -> tuple[str | None, list[str]]:
    """The task whose head an update carries, and what is wrong with its key set (empty: nothing).

    Args:
        keys: the update's keys.
        reference: the global model's keys (shared + ``task.<t>.out.*`` of every task).

    An acceptable update holds every shared key of ``reference`` and every head key of exactly one task, nothing
    else. The messages name the keys (the task is ``None`` when it cannot be told).
    """
    keys, reference = set(keys), set(reference)
    shared = {k for k in reference if split_task_key(k) is None}
    tasks = sorted({s[0] for s in map(split_task_key, reference) if s})
    problems = []
    missing = sorted(shared - keys)
    if missing:
        problems.append(f"{len(missing)} shared key(s) missing, e.g. {missing[:3]}")
    unknown = sorted(keys - reference)
    if unknown:
        problems.append(f"{len(unknown)} key(s) not in the global model, e.g. {unknown[:3]}")
    sent = sorted({s[0] for s in map(split_task_key, keys & reference) if s})
    if len(sent) != 1:
        problems.append(f"the update carries the heads of {len(sent)} tasks ({', '.join(sent) or 'none'}); "
                        f"a site sends exactly one (the job's tasks: {', '.join(tasks)})")
        return None, problems
    task = sent[0]
    lacking = sorted(set(head_keys(reference, task)) - keys)
    if lacking:
        problems.append(f"task {task}'s head is incomplete: {lacking[:3]} missing")
    return task, problems


def site_task(tasks: Sequence[str], dataset: str, site: str = "this site") -> str | None:
    """A site's task in a job with ``tasks`` (``federation.tasks``): its data set; ``None`` in a one-task job.

    Raises:
        TaskHeadError: the site's data set is not one of the job's tasks.
    """
    if not tasks:
        return None
    if dataset not in tasks:
        raise TaskHeadError(f"{site}: data.dataset {dataset!r} is not one of the job's tasks (federation.tasks: "
                            f"{', '.join(tasks)})")
    return dataset


def task_settings(task: str) -> dict[str, Any]:
    """Dotted run-config settings of ``task``'s plain model (``data.dataset``, ``model.out_channels``)."""
    if task not in TASK_OUT_CHANNELS:
        raise TaskHeadError(f"unknown task {task!r}; the tasks are {', '.join(TASK_OUT_CHANNELS)}")
    return {"data.dataset": task, "model.out_channels": TASK_OUT_CHANNELS[task]}


def for_task(config: Any, task: str) -> Any:
    """A copy of a run config (:class:`bsf.config.RunConfig`) whose model is ``task``'s plain SwinUNETR."""
    import copy

    settings = task_settings(task)
    config = copy.deepcopy(config)
    config.data.dataset, config.model.out_channels = settings["data.dataset"], settings["model.out_channels"]
    return config
