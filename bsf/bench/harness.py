"""What every step benchmark shares: the bench sizes, timing, peak memory, the machine, and speed-ups.

A step benchmark builds :class:`Variant` objects (one of them the reference-style step) and hands
them to :func:`compare`, which times them in alternating rounds in this process, so a busy phase of
a shared machine hits every variant alike, and reports medians and speed-ups over the reference.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from bsf.bench.sizes import BenchSize
from bsf.errors import BSFError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Options:
    """What the command line chose (see ``bsf bench --help``)."""

    size: BenchSize
    device: torch.device
    precision: str  # the fast path's autocast: fp32 | bf16 | fp16
    compile: bool  # also time torch.compile'd variants
    steps: int
    warmup: int
    repeats: int
    seed: int = 0


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BSFError("--device cuda: no CUDA device is available to this torch build")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` (fp32: none)."""
    return nullcontext() if precision == "fp32" else torch.autocast(device.type, dtype=_DTYPES[precision])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of an optimiser's state (AdamW: step, exp_avg, exp_avg_sq per parameter)."""
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


@dataclass
class Variant:
    """One way of doing the benchmark's unit of work.

    Attributes:
        name: short key (``reference``, ``fast``, ``fast+compile``, ...).
        label: what it does, for the table.
        step: one unit of work (a training step, one volume's inference).
        items: samples per unit (crops per SSL step, crops per fine-tuning step, 1 volume).
        state: tensors that live across steps (weights, gradients, optimiser state), for peak memory.
        is_reference: the reference-style step every other variant is compared with.
        info: extra facts for the JSON (filled by the benchmark, e.g. the final loss).
    """

    name: str
    label: str
    step: Callable[[], Any]
    items: int
    state: Callable[[], list[torch.Tensor]] = list
    is_reference: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class _RssPeak:
    """Highest resident set size above the starting one while the ``with`` block runs (Linux /proc)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s, self.peak_delta = interval_s, 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> _RssPeak:
        self._start = self._peak = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_delta = max(self._peak, self._rss()) - self._start


def peak_memory(variant: Variant, device: torch.device) -> dict[str, Any]:
    """Peak memory of one more step.

    CUDA: ``max_memory_allocated`` during the step minus what was allocated before it (activations,
    gradients, temporaries), plus the variant's resident state: ``bytes`` is what the variant alone
    needs at its peak. CPU: the RSS rise during the step plus the resident state (indicative only:
    the allocator keeps freed pages, so a variant measured after another can show a smaller rise).
    """
    state = tensor_bytes(variant.state())
    free(device)
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        variant.step()
        sync(device)
        transient = torch.cuda.max_memory_allocated(device) - before
        kind = "cuda_max_memory_allocated"
    elif sys.platform.startswith("linux"):
        with _RssPeak() as rss:
            variant.step()
        transient, kind = rss.peak_delta, "cpu_rss_rise"
    else:  # pragma: no cover - no /proc
        variant.step()
        transient, kind = 0, "state_only"
    return {"kind": kind, "bytes": state + transient, "state_bytes": state, "step_bytes": transient}


def time_calls(fn: Callable[[], Any], device: torch.device, n: int) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn``, the device synchronised before and after each."""
    times = []
    for _ in range(n):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def compare(variants: list[Variant], opts: Options) -> list[dict[str, Any]]:
    """Time the variants in alternating rounds and summarise each (medians over every timed step).

    Round 1 starts each variant with ``opts.warmup`` untimed steps (compilation happens there);
    every round then times ``opts.steps`` steps of each variant in turn. Speed-up = the reference's
    median step time / this variant's (samples per step are equal unless the label says otherwise,
    in which case it is the ratio of samples/s).

    Returns:
        One row per variant: ``name``, ``label``, ``steps_per_s``, ``samples_per_s``, ``step_s_median``,
        ``step_s_min``, ``step_s_all``, ``first_step_s``, ``peak_memory``, ``speedup`` and ``info``.
    """
    device = opts.device
    first: dict[str, float | None] = {}
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for round_index in range(opts.repeats):
        for variant in variants:
            if round_index == 0:
                warm = time_calls(variant.step, device, opts.warmup)
                first[variant.name] = warm[0] if warm else None
            times[variant.name] += time_calls(variant.step, device, opts.steps)
    rows = []
    for variant in variants:
        median = statistics.median(times[variant.name])
        rows.append({
            "name": variant.name, "label": variant.label, "reference": variant.is_reference,
            "items_per_step": variant.items, "step_s_median": median, "step_s_min": min(times[variant.name]),
            "step_s_all": times[variant.name], "steps_per_s": 1.0 / median, "samples_per_s": variant.items / median,
            "first_step_s": first[variant.name], "peak_memory": peak_memory(variant, device), "info": variant.info,
        })
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Set each row's ``speedup``: its samples/s over the reference row's (None without one)."""
    reference = next((r for r in rows if r.get("reference")), None)
    for row in rows:
        row["speedup"] = row["samples_per_s"] / reference["samples_per_s"] if reference and row.get("samples_per_s") else None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the numbers came from: CPU model and cores, torch threads, versions, GPU name."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_bytes=torch.cuda.get_device_properties(device).total_memory,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)
