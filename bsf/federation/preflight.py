"""Site preflight: what a job needs from a site's machine, compared with what the machine has.

From the job's run config (``model.size``, ``data.roi``, ``data.batch_size`` x ``data.crops_per_volume``,
``train.precision``, ``model.use_checkpoint``, ``data.cache``, ``data.num_workers``) and the site's cases, with the
figures in :data:`FOOTPRINTS` (peak RSS of one training step, measured by ``benchmarks/preflight_footprints.py``):

* training memory = ``base + 16 x parameters + activation bytes per voxel x crops per step x ROI voxels``
  (weights, gradients and two AdamW moments; ``use_checkpoint`` multiplies the activations by the measured factor).
  On a CPU site it is RAM; on a GPU site it is GPU memory **estimated** from the CPU figures (the same float32
  tensors; mixed precision halves the activations; plus a CUDA context) — no GPU figure was measured;
* RAM for ``data.cache: memory`` (every case's float32 volume, before the foreground crop);
* disk under ``data.cache_dir`` for ``data.cache: persistent``;
* CPU cores for ``data.num_workers`` loader processes plus the training process.

:func:`run_preflight` compares them with the machine (``/proc/meminfo`` MemAvailable, ``torch.cuda.mem_get_info``,
``shutil.disk_usage``, the CPU affinity) and raises :class:`PreflightError` naming the settings to change; the site
client runs it at start (:func:`bsf.fl.client.main`), ``bsf site preflight`` prints it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from bsf.errors import BSFError

log = logging.getLogger(__name__)

GIB = 1024**3

#: Measured with ``python benchmarks/preflight_footprints.py`` (torch 2.13.0+cpu, MONAI 1.6.1, 2-core CPU machine,
#: one training step per point in a fresh process, peak RSS from ``resource.getrusage``); raw rows in
#: benchmarks/RESULTS.md ("Site preflight figures"). Activation bytes per voxel per crop =
#: ``(peak - base - 16 x parameters) / (crops x ROI voxels)``, measured on the second of two steps with the gradients
#: kept (an upper bound); at test size 64^3 and 96^3 agree within 8 % (2590 vs 2403; the larger is kept).
FOOTPRINTS: dict[str, Any] = {
    "base_bytes": 415_395_840,  # the process after importing torch, MONAI and bsf
    "bytes_per_parameter": 16,  # float32 weight, gradient, AdamW's two moments
    "activation_bytes_per_voxel": {
        "ssl": {"test": 2590, "small": 12097},  # 64^3, 2 crops (each crop's two views); Small peak 6.61 GiB
        "finetune": {"test": 2389, "small": 9516},  # 64^3; test 2 crops, Small 1 crop: peak 3.67 GiB
    },
    #: tiny and big share Small's feature size 48 and first stages, where the activations are: Small's figure (an estimate)
    "unmeasured_sizes_like": "small",
    "use_checkpoint_activation_factor": 0.585,  # finetune Small 64^3, 1 crop: 5566 / 9516 (peak 2.70 vs 3.67 GiB)
    #: GPU: NOT measured (no GPU here). The same float32 activations as on the CPU, plus a CUDA context; mixed
    #: precision (bf16/fp16) assumed to halve the activations. Documented estimates, reported as such.
    "gpu_estimate": {"cuda_context_bytes": 600 * 1024**2, "mixed_precision_activation_factor": 0.5},
}


class PreflightError(BSFError):
    """The site's machine cannot hold the job; the message names the settings to change."""


def footprints() -> dict[str, Any]:
    """The measured figures (:data:`FOOTPRINTS`)."""
    return FOOTPRINTS


@dataclass(frozen=True)
class Machine:
    """What a site's machine offers, in bytes (``gpu_free`` None: no GPU in use; ``disk_free`` None: not asked)."""

    ram_available: int
    cpus: int
    gpu_free: int | None = None
    disk_free: int | None = None
    disk_path: str = ""


def _meminfo_available(path: str = "/proc/meminfo") -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise BSFError(f"{path}: no MemAvailable line")


def existing_parent(folder: str | Path) -> Path | None:
    """``folder`` or its nearest existing parent (where a cache folder would be created)."""
    return next((p for p in [Path(folder), *Path(folder).parents] if p.exists()), None)


def this_machine(config: Any) -> Machine:
    """RAM, CPU cores, free GPU memory (when ``train.device`` resolves to a GPU) and free disk at ``data.cache_dir``."""
    import torch

    from bsf.engine.engine import resolve_device

    gpu_free = None
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        gpu_free = int(torch.cuda.mem_get_info(device)[0])
    disk_free, disk_path = None, ""
    if config.data.cache == "persistent" and config.data.cache_dir:
        parent = existing_parent(config.data.cache_dir)
        if parent is not None:
            disk_free, disk_path = int(shutil.disk_usage(parent).free), str(parent)
    return Machine(ram_available=_meminfo_available(), cpus=len(os.sched_getaffinity(0)), gpu_free=gpu_free,
                   disk_free=disk_free, disk_path=disk_path)


@dataclass(frozen=True)
class Need:
    """One resource the job needs: ``what`` (RAM, GPU memory, disk, CPU cores), how much, what the machine has,
    how the figure was made, and the settings that change it. A ``soft`` need (CPU cores) that does not fit slows the
    job down instead of stopping it: a note, not a problem."""

    what: str
    needed: int
    available: int | None
    detail: str
    fix: str
    estimate: bool = False
    soft: bool = False

    @property
    def fits(self) -> bool:
        return self.available is None or self.needed <= self.available

    def line(self) -> str:
        unit = (lambda n: f"{n}") if self.what == "CPU cores" else (lambda n: f"{n / GIB:.1f} GiB")
        have = "not checked" if self.available is None else f"{unit(self.available)} available"
        mark = " (estimate)" if self.estimate else ""
        return f"{self.what}: needs about {unit(self.needed)}{mark}, {have} [{self.detail}]"


@dataclass
class PreflightReport:
    needs: list[Need] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [f"{n.line()}: {n.fix}" for n in self.needs if not n.fits and not n.soft]

    @property
    def notes(self) -> list[str]:
        return [f"{n.line()}: {n.fix}" for n in self.needs if not n.fits and n.soft]

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        lines = ["preflight (figures: bsf.federation.preflight.FOOTPRINTS):", *(f"  {n.line()}" for n in self.needs)]
        lines += [f"note: {p}" for p in self.notes] + [f"problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _parameters(config: Any) -> int:
    """Trainable parameters of the stage's model."""
    m = config.model
    return _count_parameters(config.stage == "ssl", m.size, m.in_channels, m.out_channels)


@lru_cache(maxsize=None)
def _count_parameters(ssl: bool, size: str, in_channels: int, out_channels: int) -> int:
    """Parameters of the SSL model or the SwinUNETR (built once per shape on the CPU, the caller's random state untouched)."""
    import torch

    from bsf.model import SSLModel, build_swin_unetr

    with torch.random.fork_rng(devices=[]):
        model = SSLModel(size, in_channels) if ssl else build_swin_unetr(size, in_channels, out_channels)
    return sum(p.numel() for p in model.parameters())


def training_bytes(config: Any, parameters: int, gpu: bool) -> tuple[int, str, bool]:
    """Peak memory of a training step (bytes), how it was made up, and whether it is an estimate (GPU, or a model size
    without its own measured figure)."""
    figures = footprints()
    stage = "ssl" if config.stage == "ssl" else "finetune"
    per_size = figures["activation_bytes_per_voxel"][stage]
    estimate = config.model.size not in per_size
    per_voxel = per_size.get(config.model.size, per_size[figures["unmeasured_sizes_like"]])
    crops = config.data.batch_size * config.data.crops_per_volume
    activations = per_voxel * crops * math.prod(config.data.roi)
    if config.model.use_checkpoint:
        activations *= figures["use_checkpoint_activation_factor"]
    states = figures["bytes_per_parameter"] * parameters
    if gpu:
        if config.train.precision != "fp32":
            activations *= figures["gpu_estimate"]["mixed_precision_activation_factor"]
        total = figures["gpu_estimate"]["cuda_context_bytes"] + states + activations
        estimate = True
    else:
        total = figures["base_bytes"] + states + activations
    roi = "x".join(map(str, config.data.roi))
    detail = (f"model {config.model.size} ({parameters / 1e6:.1f} M parameters: {states / GIB:.1f} GiB with gradients and "
              f"AdamW), activations {activations / GIB:.1f} GiB for {crops} crop(s) of {roi}"
              + (", checkpointed" if config.model.use_checkpoint else ""))
    return int(total), detail, estimate


def case_bytes(cases: Sequence[dict]) -> int:
    """float32 bytes of one case's image channels (the first readable of the first three cases; 0 if none)."""
    import nibabel as nib
    import numpy as np

    for case in cases[:3]:
        try:
            files = case["image"] if isinstance(case["image"], list) else [case["image"]]
            return sum(int(np.prod(nib.load(f).shape[:3])) * 4 for f in files)
        except Exception:  # noqa: BLE001 - the header check reports unreadable files
            continue
    return 0


def requirements(config: Any, machine: Machine, n_cases: int = 0, per_case: int = 0) -> PreflightReport:
    """What ``config``'s job needs on ``machine`` with ``n_cases`` cases of ``per_case`` bytes each."""
    data = config.data
    gpu = machine.gpu_free is not None
    train_need, detail, estimate = training_bytes(config, _parameters(config), gpu)
    smaller = ("lower data.roi (a multiple of 32, >= 64), data.batch_size or data.crops_per_volume"
               + ("" if config.model.use_checkpoint else ", or set model.use_checkpoint: true"))
    if gpu and config.train.precision == "fp32":
        smaller += ", or train.precision: bf16"
    report = PreflightReport()
    cache = n_cases * per_case if data.cache == "memory" else 0
    ram_base = footprints()["base_bytes"] if gpu else train_need
    if gpu:
        report.needs.append(Need("GPU memory", train_need, machine.gpu_free, detail, smaller, estimate))
    ram_detail = (detail if not gpu else "the training process") + (
        f"; data.cache memory: {n_cases} case(s) x {per_case / 1e6:.0f} MB" if cache else "")
    ram_fix = smaller if not gpu else "free memory on the machine"
    if cache:
        ram_fix = "set data.cache: persistent (with data.cache_dir on a local disk) or none; or " + ram_fix
    report.needs.append(Need("RAM", ram_base + cache, machine.ram_available, ram_detail, ram_fix, estimate and not gpu))
    if data.cache == "persistent":
        report.needs.append(Need(
            "disk", n_cases * per_case, machine.disk_free, f"data.cache persistent at {data.cache_dir}: {n_cases} case(s)",
            "point data.cache_dir at a disk with more free space, or set data.cache: memory or none"))
    report.needs.append(Need(
        "CPU cores", data.num_workers + 1, machine.cpus, f"data.num_workers={data.num_workers} loader(s) + training",
        f"set data.num_workers <= {max(0, machine.cpus - 1)} (more loaders than cores only slow the steps)", soft=True))
    return report


def site_cases(config: Any) -> tuple[int, int]:
    """Number of cases the site lists and the bytes of one (0, 0 for a synthesising site with no data yet)."""
    if not config.data.root and not config.data.datalist:
        return 0, 0
    from bsf.data.cases import list_cases

    data = config.data
    cases = list_cases(data.dataset, datalist=data.datalist, root=data.root, modalities=data.modalities, fold=data.fold).all_cases
    return len(cases), case_bytes(cases)


def run_preflight(config: Any, machine: Machine | None = None, cases: tuple[int, int] | None = None) -> PreflightReport:
    """The preflight of ``config`` on ``machine`` (default: this one); raises :class:`PreflightError` if it cannot fit."""
    machine = machine or this_machine(config)
    n_cases, per_case = cases if cases is not None else site_cases(config)
    report = requirements(config, machine, n_cases, per_case)
    for line in report.text().splitlines():
        log.info("%s", line)
    if not report.ok:
        raise PreflightError("this machine cannot hold the job:\n" + "\n".join(report.problems))
    return report
