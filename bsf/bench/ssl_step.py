"""Stage 1/2 SSL step: the project's fast step against a reference-style step (Tang et al.'s public loop).

Batch: ``ssl_batch`` volumes x ``ssl_crops`` crops = N crops of ``ssl_roi``^3 with 2 channels; each
crop gives two rotated, corrupted views, so a step runs the encoder on 2N views (8 *encoder passes* at
the paper's 2 x 2). samples/s counts crops; encoder passes/s = 2 x samples/s. The crops are random
tensors already on the device (data loading is the ``data_wait`` benchmark).

- ``reference``: per-sample Python-loop rotation and box-by-box corruption (a port of the public
  ``utils/ops.py``: ``rot_rand``, ``aug_rand``, ``patch_rand_drop``), two encoder calls, fp16 autocast +
  GradScaler on CUDA (fp32 on CPU), ``torch.optim.AdamW`` defaults.
- ``fast``: the project's own step, ``Engine.train_steps`` of a Stage 1 engine at the bench size
  (:class:`bsf.bench.steps.EngineStep`): ``bsf.ssl.make_ssl_views`` (vectorised, on the device), one
  call on all 2N views, the fast precision (``train.precision``), fused AdamW on CUDA, the preset's
  gradient clipping and learning-rate schedule.
- ``fast+sdpa``: the same with ``train.attention: sdpa`` (SDPA window attention).
- ``fast+compile``, ``fast+sdpa+compile``: the same with ``train.compile: true`` (with ``--compile``).
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from bsf.bench.harness import Options, Variant, compare, time_calls
from bsf.bench.steps import EngineStep, ReferenceStep
from bsf.bench.synthetic import fast_train_overrides, stage1_config
from bsf.model import SSLModel
from bsf.ssl import SSLLoss, make_ssl_views

IN_CHANNELS = 2


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
    """Rotate each sample ``(B, C, D, H, W)`` by its own random k*90 degrees in a Python loop; returns views and k."""
    img_n = x_s.size()[0]
    x_aug = x_s.detach().clone()
    x_rot = torch.zeros(img_n).long().to(x_s.device)
    for i in range(img_n):
        x = x_s[i]
        orientation = rng.randint(0, 4)
        if orientation:
            x = x.rot90(orientation, (2, 3))  # the last two spatial axes of (C, X, Y, Z), as the public code
        x_aug[i] = x
        x_rot[i] = orientation
    return x_aug, x_rot


def reference_aug_rand(samples: torch.Tensor, rng: np.random.RandomState) -> torch.Tensor:
    """Noise boxes, then boxes pasted from another random sample, one sample at a time (on a copy)."""
    img_n = samples.size()[0]
    x_aug = samples.detach().clone()
    for i in range(img_n):
        x_aug[i] = reference_patch_rand_drop(x_aug[i], rng)
        idx_rnd = rng.randint(0, img_n)
        if idx_rnd != i:
            x_aug[i] = reference_patch_rand_drop(x_aug[i], rng, x_aug[idx_rnd])
    return x_aug


def reference_views(x: torch.Tensor, rng: np.random.RandomState):
    """The public loop's views of ``x: (N, C, D, H, W)``: ((view 1, view 2) corrupted, (2N,) k, (2N, ...) targets)."""
    x1, rot1 = reference_rot_rand(x, rng)
    x2, rot2 = reference_rot_rand(x, rng)
    return (reference_aug_rand(x1, rng), reference_aug_rand(x2, rng)), torch.cat([rot1, rot2]), torch.cat([x1, x2])


# ---------------------------------------------------------------------------------------------
# The variants
# ---------------------------------------------------------------------------------------------
def _reference(x: torch.Tensor, opts: Options) -> Variant:
    torch.manual_seed(opts.seed)
    criterion, rng = SSLLoss(), np.random.RandomState(opts.seed)

    def loss(model):
        (x1, x2), labels, targets = reference_views(x, rng)
        rot1, con1, rec1 = model(x1)
        rot2, con2, rec2 = model(x2)
        return criterion(torch.cat([rot1, rot2]), labels, torch.cat([con1, con2]), torch.cat([rec1, rec2]), targets)[0]

    precision = "fp16" if opts.device.type == "cuda" else "fp32"
    step = ReferenceStep(SSLModel(opts.size.model, IN_CHANNELS), loss, device=opts.device, precision=precision)
    augment = lambda: reference_views(x, rng)  # noqa: E731
    return _variant("reference", f"reference ({precision}, loop aug, 2 calls, AdamW)", step, x, augment, reference=True)


def _fast(x: torch.Tensor, opts: Options, compiled: bool = False, sdpa: bool = False) -> Variant:
    """``Engine.train_steps`` of Stage 1 at the bench size on the crops ``x``: the step users run."""
    step = EngineStep(stage1_config(opts, *fast_train_overrides(opts, sdpa=sdpa, compiled=compiled)), {"image": x})
    generator = torch.Generator(opts.device).manual_seed(opts.seed)
    augment = lambda: make_ssl_views(x, generator, step.engine.task.corruption)  # noqa: E731
    name = "fast" + ("+sdpa" if sdpa else "") + ("+compile" if compiled else "")
    label = "fast (" + ", ".join(["Engine.train_steps", "vectorised aug", "1 call", *step.describe()]) + ")"
    return _variant(name, label, step, x, augment)


def _variant(name, label, step: EngineStep | ReferenceStep, x, augment, reference=False) -> Variant:
    variant = Variant(name, label, step, items=x.shape[0], state=step.state, is_reference=reference)
    variant.info["augment"] = augment
    return variant


def _augmentation_s(augment, device, n: int) -> float:
    """Median seconds of the augmentation alone (after one untimed call)."""
    augment()
    return statistics.median(time_calls(augment, device, n))


def run(opts: Options) -> dict:
    """Rows for the reference, fast (and fast+compile) SSL steps; ``encoder_passes_per_s`` in each row."""
    s = opts.size
    crops = s.ssl_batch * s.ssl_crops
    gen = torch.Generator(opts.device).manual_seed(opts.seed)
    x = torch.rand((crops, IN_CHANNELS, s.ssl_roi, s.ssl_roi, s.ssl_roi), generator=gen, device=opts.device)
    variants = [_reference(x, opts), _fast(x, opts), _fast(x, opts, sdpa=True)]
    if opts.compile:
        variants += [_fast(x, opts, compiled=True), _fast(x, opts, compiled=True, sdpa=True)]
    for variant in variants:
        augment = variant.info.pop("augment")
        variant.info["augmentation_s_median"] = _augmentation_s(augment, opts.device, max(opts.steps, 2))
    rows = compare(variants, opts)
    for row, variant in zip(rows, variants):
        row["encoder_passes_per_s"] = 2 * row["samples_per_s"]
        row["info"]["final_loss"] = float(variant.step.last_loss)
    return {
        "config": {"model": s.model, "roi": s.ssl_roi, "volumes": s.ssl_batch, "crops_per_volume": s.ssl_crops,
                   "crops": crops, "encoder_passes_per_step": 2 * crops, "in_channels": IN_CHANNELS},
        "rows": rows,
    }
