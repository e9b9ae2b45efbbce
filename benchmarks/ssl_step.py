"""Throughput of one Stage 1/2 SSL training step, and of a reference-style step in the same process.

    python benchmarks/ssl_step.py --size test --roi 64 --steps 3 --reference          # CPU smoke size
    python benchmarks/ssl_step.py --size small --roi 96 --precision bf16 --compile --reference \\
        --steps 30 --warmup 10 --json benchmarks/results/ssl_step_h100.json             # paper size, one GPU

Batch: ``--batch`` volumes x ``--crops`` crops per volume = N crops (the paper: 2 x 2 = 4). Each
crop gives two rotated, corrupted views, so one step runs the encoder on 2N views: 8 *encoder
passes* per step at the default. "encoder passes/s" = views processed per second; "samples/s" =
crops per second (= encoder passes/s / 2). The crops are random tensors already on the device:
data loading is not timed here.

Two step kinds, each timed three ways (full step; augmentation alone; model step alone on
pre-made views):

- ``fast`` (this project): ``bsf.ssl.make_ssl_views`` (vectorised, on the device), one encoder
  call on all 2N views, autocast in ``--precision``, optional ``torch.compile`` of the model, AdamW
  (fused on CUDA), a GradScaler only for fp16.
- ``reference`` (``--reference``; the public Tang et al. / BrainSegFounder pretraining loop):
  per-sample Python-loop rotation (``torch.rot90``) and box corruption (boxes drawn one by one with
  numpy, noise and pasted patches written box by box), two encoder calls (one per view batch),
  fp16 autocast with a GradScaler on CUDA (fp32 on CPU), ``torch.optim.AdamW`` with defaults.

A full step is augmentation + forward + loss + backward + optimiser step. On CUDA every timed
region is bracketed by ``torch.cuda.synchronize()`` and peak memory is
``torch.cuda.max_memory_allocated()`` over the timed full steps. On CPU peak memory is the rise of
the resident set size (RSS) during one extra untimed full step, sampled from a thread:
indicative only (the allocator keeps freed pages).

On a shared or noisy machine ``--repeats R`` measures the kinds R times, alternating, and keeps,
for each of the three measurements, its fastest repeat (every repeat's mean is in the JSON).
The JSON also has process CPU seconds per step (``*_cpu_s``), which a busy CPU inflates less than
wall time.

Prints a table and, with ``--json OUT``, writes every number plus the machine it came from.
Numbers, not assertions: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Runnable as a plain script from anywhere: put the repository root (holding ``bsf``) on the path.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from bsf.errors import BSFError  # noqa: E402
from bsf.model import SSLModel, check_input_shape, count_parameters, get_size  # noqa: E402
from bsf.ssl import CorruptionConfig, SSLLoss, make_ssl_views  # noqa: E402

SIZES = ("test", "tiny", "small", "big")
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: Tang et al.'s pretraining optimiser settings (AdamW, lr 4e-4, weight decay 1e-5).
_LR, _WEIGHT_DECAY = 4e-4, 1e-5


# ---------------------------------------------------------------------------------------------
# Reference-style augmentation: a faithful port of the public Tang et al. ``utils/ops.py``
# (``rot_rand``, ``aug_rand``, ``patch_rand_drop``), including its per-sample / per-box Python loops.
# ---------------------------------------------------------------------------------------------
def reference_patch_rand_drop(
    x: torch.Tensor,
    rng: np.random.RandomState,
    x_rep: torch.Tensor | None = None,
    max_drop: float = 0.3,
    max_block_sz: float = 0.25,
    tolr: float = 0.05,
) -> torch.Tensor:
    """Corrupt one sample ``x: (C, D, H, W)`` in place box by box: noise boxes, or boxes of ``x_rep``."""
    c, h, w, z = x.size()
    n_drop_pix = rng.uniform(0, max_drop) * h * w * z
    mx_blk_height, mx_blk_width, mx_blk_slices = int(h * max_block_sz), int(w * max_block_sz), int(z * max_block_sz)
    tol = (int(tolr * h), int(tolr * w), int(tolr * z))
    total_pix = 0
    while total_pix < n_drop_pix:
        rnd_r, rnd_c, rnd_s = rng.randint(0, h - tol[0]), rng.randint(0, w - tol[1]), rng.randint(0, z - tol[2])
        rnd_h = min(rng.randint(tol[0], mx_blk_height) + rnd_r, h)
        rnd_w = min(rng.randint(tol[1], mx_blk_width) + rnd_c, w)
        rnd_z = min(rng.randint(tol[2], mx_blk_slices) + rnd_s, z)
        if x_rep is None:
            noise = torch.empty(
                (c, rnd_h - rnd_r, rnd_w - rnd_c, rnd_z - rnd_s), dtype=x.dtype, device=x.device
            ).normal_()
            noise = (noise - torch.min(noise)) / (torch.max(noise) - torch.min(noise))
            x[:, rnd_r:rnd_h, rnd_c:rnd_w, rnd_s:rnd_z] = noise
        else:
            x[:, rnd_r:rnd_h, rnd_c:rnd_w, rnd_s:rnd_z] = x_rep[:, rnd_r:rnd_h, rnd_c:rnd_w, rnd_s:rnd_z]
        total_pix = total_pix + (rnd_h - rnd_r) * (rnd_w - rnd_c) * (rnd_z - rnd_s)
    return x


def reference_rot_rand(x_s: torch.Tensor, rng: np.random.RandomState) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each sample by its own random k*90 degrees in a Python loop; returns the views and k."""
    img_n = x_s.size()[0]
    x_aug = x_s.detach().clone()
    x_rot = torch.zeros(img_n).long().to(x_s.device)
    for i in range(img_n):
        x = x_s[i]
        orientation = rng.randint(0, 4)
        if orientation:
            x = x.rot90(orientation, (1, 2))  # the two axes after the channel axis
        x_aug[i] = x
        x_rot[i] = orientation
    return x_aug, x_rot


def reference_aug_rand(samples: torch.Tensor, rng: np.random.RandomState) -> torch.Tensor:
    """Noise boxes, then boxes pasted from another random sample, one sample at a time."""
    img_n = samples.size()[0]
    x_aug = samples.detach().clone()
    for i in range(img_n):
        x_aug[i] = reference_patch_rand_drop(x_aug[i], rng)
        idx_rnd = rng.randint(0, img_n)
        if idx_rnd != i:
            x_aug[i] = reference_patch_rand_drop(x_aug[i], rng, x_aug[idx_rnd])
    return x_aug


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device, steps: int) -> tuple[list[float], list[float]]:
    """Wall seconds and process CPU seconds of each of ``steps`` calls of ``fn``.

    Each call is bracketed by device synchronisation. CPU seconds (all threads of this process)
    help read a CPU run on a shared machine, where wall time includes waiting for a core.
    """
    wall, cpu = [], []
    for _ in range(steps):
        _sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def _current_rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class _RssPeak:
    """Highest RSS above the starting RSS while the ``with`` block runs (Linux /proc; else ru_maxrss)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak_delta = 0
        self._stop = threading.Event()

    def __enter__(self) -> _RssPeak:
        self._start = _current_rss()
        self._maxrss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if self._start is not None:
            self._peak = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _current_rss() or 0)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        if self._start is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, _current_rss() or 0)
            self.peak_delta = self._peak - self._start
        else:  # ru_maxrss: kilobytes on Linux, bytes on macOS; only rises above the process's old peak
            scale = 1 if sys.platform == "darwin" else 1024
            self.peak_delta = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss_start) * scale


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The two step kinds
# ---------------------------------------------------------------------------------------------
class StepKind:
    """One way of doing an SSL step: ``augment(x) -> views`` and ``model_step(views) -> loss``."""

    name: str
    label: str
    precision: str

    def augment(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def model_step(self, views: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def full_step(self, x: torch.Tensor) -> torch.Tensor:
        return self.model_step(self.augment(x))


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def _backward_and_step(loss, model, optimizer, scaler) -> None:
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


class FastStep(StepKind):
    """Vectorised on-device views, one encoder call on all 2N views, autocast, optional compile."""

    name = "fast"

    def __init__(self, args: argparse.Namespace, device: torch.device):
        torch.manual_seed(args.seed)
        self.device, self.precision = device, args.precision
        self.model = SSLModel(args.size, args.in_channels, use_checkpoint=args.grad_checkpoint).to(device)
        self.model.train()
        self.forward = torch.compile(self.model, mode=args.compile_mode) if args.compile else self.model
        self.criterion = SSLLoss()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=_LR, weight_decay=_WEIGHT_DECAY, fused=device.type == "cuda"
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
        self.generator = torch.Generator(device).manual_seed(args.seed)
        self.corruption = CorruptionConfig()
        parts = [args.precision, "vectorised aug"]
        if args.compile:
            parts.append("compile" + ("" if args.compile_mode in (None, "default") else f" {args.compile_mode}"))
        if device.type == "cuda":
            parts.append("fused AdamW")
        if args.grad_checkpoint:
            parts.append("grad ckpt")
        self.label = "fast (" + ", ".join(parts) + ")"

    def augment(self, x):
        views = make_ssl_views(x, self.generator, self.corruption)
        return views.inputs, views.rotation_labels, views.targets

    def model_step(self, views):
        inputs, labels, targets = views
        with _autocast(self.device, self.precision):
            out = self.forward(inputs)
            loss, _ = self.criterion(out.rotation_logits, labels, out.contrastive, out.reconstruction, targets)
        _backward_and_step(loss, self.model, self.optimizer, self.scaler)
        return loss.detach()


class ReferenceStep(StepKind):
    """Tang et al.'s loop: Python-loop rotation and corruption, two encoder calls, fp16 autocast + GradScaler."""

    name = "reference"

    def __init__(self, args: argparse.Namespace, device: torch.device):
        torch.manual_seed(args.seed)
        self.device = device
        self.precision = "fp16" if device.type == "cuda" else "fp32"
        self.model = SSLModel(args.size, args.in_channels).to(device)
        self.model.train()
        self.criterion = SSLLoss()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=_LR, weight_decay=_WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.rng = np.random.RandomState(args.seed)
        self.label = f"reference ({self.precision}, loop aug, 2 calls)"

    def augment(self, x):
        x1, rot1 = reference_rot_rand(x, self.rng)
        x2, rot2 = reference_rot_rand(x, self.rng)
        x1_aug, x2_aug = reference_aug_rand(x1, self.rng), reference_aug_rand(x2, self.rng)
        return (x1_aug, x2_aug), torch.cat([rot1, rot2]), torch.cat([x1, x2])

    def model_step(self, views):
        (x1_aug, x2_aug), labels, targets = views
        with _autocast(self.device, self.precision):
            rot1, con1, rec1 = self.model(x1_aug)
            rot2, con2, rec2 = self.model(x2_aug)
            loss, _ = self.criterion(
                torch.cat([rot1, rot2]), labels, torch.cat([con1, con2]), torch.cat([rec1, rec2]), targets
            )
        _backward_and_step(loss, self.model, self.optimizer, self.scaler)
        return loss.detach()


def measure(kind: StepKind, x: torch.Tensor, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Warm up, then time full steps, the augmentation alone and the model step alone (raw times)."""
    warmup, _ = _timed(lambda: kind.full_step(x), device, args.warmup)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[torch.Tensor] = []
    step, step_cpu = _timed(lambda: losses.append(kind.full_step(x)), device, args.steps)
    if device.type == "cuda":
        peak = {"kind": "cuda_max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(device),
                "reserved_bytes": torch.cuda.max_memory_reserved(device)}
    else:
        _free(device)
        with _RssPeak() as rss:
            kind.full_step(x)
        peak = {"kind": "cpu_rss_delta_one_step", "bytes": rss.peak_delta}

    kind.augment(x)  # warm (allocator, kernels)
    aug, aug_cpu = _timed(lambda: kind.augment(x), device, args.steps)

    views = kind.augment(x)
    kind.model_step(views)
    model, model_cpu = _timed(lambda: kind.model_step(views), device, args.steps)
    return {
        "label": kind.label, "precision": kind.precision, "warmup": warmup,
        "step": step, "step_cpu": step_cpu, "aug": aug, "aug_cpu": aug_cpu, "model": model, "model_cpu": model_cpu,
        "peak_memory": peak, "final_loss": float(losses[-1]) if losses else float("nan"),
    }


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def summarise(repeats: list[dict[str, Any]], crops: int) -> dict[str, Any]:
    """Throughput figures of one step kind; over several repeats each measurement keeps its fastest repeat."""
    best = {part: min(repeats, key=lambda r: _mean(r[part])) for part in ("step", "aug", "model")}
    full, aug, model = best["step"], best["aug"], best["model"]
    passes = 2 * crops
    step_s, aug_s, model_s = _mean(full["step"]), _mean(aug["aug"]), _mean(model["model"])
    return {
        "label": full["label"],
        "precision": full["precision"],
        "first_step_s": repeats[0]["warmup"][0] if repeats[0]["warmup"] else None,
        "step_s": step_s,
        "step_s_median": statistics.median(full["step"]),
        "step_s_all": full["step"],
        "step_cpu_s": _mean(full["step_cpu"]),
        "steps_per_s": 1.0 / step_s,
        "samples_per_s": crops / step_s,
        "encoder_passes_per_s": passes / step_s,
        "augmentation_s": aug_s,
        "augmentation_cpu_s": _mean(aug["aug_cpu"]),
        "augmentation_share": aug_s / step_s,
        "model_step_s": model_s,
        "model_step_cpu_s": _mean(model["model_cpu"]),
        "model_step_encoder_passes_per_s": passes / model_s,
        "peak_memory": full["peak_memory"],
        "final_loss": full["final_loss"],
        "loss_finite": bool(np.isfinite(full["final_loss"])),
        "repeats_step_s": [_mean(r["step"]) for r in repeats],
        "repeats_augmentation_s": [_mean(r["aug"]) for r in repeats],
        "repeats_model_step_s": [_mean(r["model"]) for r in repeats],
    }


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ssl_step.py",
        description="Time one Stage 1/2 SSL training step (and a reference-style step with --reference).",
    )
    p.add_argument("--size", choices=SIZES, default="small", help="model size (default: small)")
    p.add_argument("--roi", type=_positive_int, default=96, help="crop side in voxels, multiple of 32, >= 64 (default: 96)")
    p.add_argument("--batch", type=_positive_int, default=2, help="volumes per step (default: 2)")
    p.add_argument("--crops", type=_positive_int, default=2, help="crops per volume (default: 2); each crop gives 2 views")
    p.add_argument("--in-channels", type=_positive_int, default=2, help="input modalities (default: 2)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="autocast dtype of the fast step (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in the fast step")
    p.add_argument("--compile-mode", default="default",
                   choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    p.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing in the Swin blocks (fast step)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--steps", type=_positive_int, default=20, help="timed steps per measurement (default: 20)")
    p.add_argument("--warmup", type=_non_negative_int, default=5,
                   help="untimed full steps first; compilation happens here (default: 5)")
    p.add_argument("--reference", action="store_true", help="also time the reference-style step and print the speed-up")
    p.add_argument("--repeats", type=_positive_int, default=1,
                   help="measure each step kind this many times, alternating, and keep the fastest (default: 1)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write all numbers as JSON here")
    return p


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BSFError("--device cuda: no CUDA device is available to this torch build")
    return torch.device(name)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    return info


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(report: dict[str, Any]) -> str:
    cfg, machine = report["config"], report["machine"]
    where = machine.get("gpu") or f"CPU ({machine['cpu_count']} cores, {machine['torch_threads']} threads)"
    lines = [
        f"ssl_step: size {cfg['size']}, roi {cfg['roi']}^3, {cfg['batch']} volumes x {cfg['crops_per_volume']} crops"
        f" = {cfg['crops']} crops -> {cfg['encoder_passes_per_step']} encoder passes/step,"
        f" {cfg['in_channels']} channels, {where}, {cfg['steps']} timed steps after {cfg['warmup']} warm-up"
        + (f", best of {cfg['repeats']} repeats each" if cfg["repeats"] > 1 else ""),
    ]
    header = ("step", "step ms", "steps/s", "samples/s", "enc passes/s", "aug ms", "aug %",
              "model-only passes/s", "peak mem", "speed-up")
    rows = [header]
    ref = report["results"].get("reference")
    for name, r in report["results"].items():
        speedup = "1.00x" if name == "reference" else (
            f"{r['encoder_passes_per_s'] / ref['encoder_passes_per_s']:.2f}x" if ref else "-")
        rows.append((
            r["label"], f"{1e3 * r['step_s']:.1f}", f"{r['steps_per_s']:.2f}", f"{r['samples_per_s']:.2f}",
            f"{r['encoder_passes_per_s']:.2f}", f"{1e3 * r['augmentation_s']:.1f}",
            f"{100 * r['augmentation_share']:.0f}", f"{r['model_step_encoder_passes_per_s']:.2f}",
            _fmt_bytes(r["peak_memory"]["bytes"]), speedup,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    if report.get("speedup"):
        s = report["speedup"]
        lines.append(
            f"speed-up of fast over reference: full step {s['full_step']:.2f}x, model step alone"
            f" {s['model_step']:.2f}x, augmentation alone {s['augmentation']:.2f}x"
        )
    peak_kind = next(iter(report["results"].values()))["peak_memory"]["kind"]
    lines.append(f"peak mem = {peak_kind}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = _resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cuda":
        if args.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise BSFError("--precision bf16: this GPU does not support bfloat16; use fp16 or fp32")
        torch.backends.cudnn.benchmark = True  # as in the public pretraining script; applies to both steps
    crops = args.batch * args.crops
    check_input_shape((crops, args.in_channels, args.roi, args.roi, args.roi), args.in_channels)
    spec = get_size(args.size)

    gen = torch.Generator(device).manual_seed(args.seed)
    x = torch.rand((crops, args.in_channels, args.roi, args.roi, args.roi), generator=gen, device=device)

    config = {
        "size": args.size, "depths": list(spec.depths), "feature_size": spec.feature_size,
        "window_size": spec.window_size, "roi": args.roi, "batch": args.batch, "crops_per_volume": args.crops,
        "crops": crops, "encoder_passes_per_step": 2 * crops, "in_channels": args.in_channels,
        "precision": args.precision, "compile": args.compile, "compile_mode": args.compile_mode if args.compile else None,
        "grad_checkpoint": args.grad_checkpoint, "device": str(device), "steps": args.steps,
        "warmup": args.warmup, "repeats": args.repeats, "reference": args.reference, "seed": args.seed,
    }
    kinds: list[type[StepKind]] = [FastStep] + ([ReferenceStep] if args.reference else [])
    raw: dict[str, list[dict[str, Any]]] = {kind_cls.name: [] for kind_cls in kinds}
    for _ in range(args.repeats):  # alternate the kinds, so slow phases of a shared machine hit both
        for kind_cls in kinds:
            kind = kind_cls(args, device)
            config.setdefault("parameters", count_parameters(kind.model))
            config.setdefault("encoder_parameters", count_parameters(kind.model.swinViT))
            raw[kind_cls.name].append(measure(kind, x, args, device))
            del kind
            if args.compile:
                torch._dynamo.reset()  # drop compiled graphs holding the old model; each repeat compiles afresh
            _free(device)
    results = {name: summarise(repeats, crops) for name, repeats in raw.items()}

    report: dict[str, Any] = {"benchmark": "ssl_step", "machine": machine_info(device), "config": config,
                              "results": results}
    if "reference" in results:
        fast, ref = results["fast"], results["reference"]
        report["speedup"] = {
            "full_step": fast["encoder_passes_per_s"] / ref["encoder_passes_per_s"],
            "model_step": fast["model_step_encoder_passes_per_s"] / ref["model_step_encoder_passes_per_s"],
            "augmentation": ref["augmentation_s"] / fast["augmentation_s"],
        }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.json is not None and args.json.is_dir():
        print(f"error: --json {args.json}: is a folder, expected a file path", file=sys.stderr)
        return 2
    try:
        report = run(args)
    except BSFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json is not None:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            print(f"error: --json {args.json}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
