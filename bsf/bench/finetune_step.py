"""Stage 3 fine-tuning step: SwinUNETR + sigmoid Dice loss on ``ft_batch`` crops of ``ft_roi``^3 (4 in, 3 out).

- ``reference``: fp16 autocast + GradScaler on CUDA (fp32 on CPU), ``torch.optim.AdamW`` defaults, as
  in MONAI's BraTS SwinUNETR script.
- ``fast``: the project's own step, ``Engine.train_steps`` of a Stage 3 BraTS engine at the bench size
  (:class:`bsf.bench.steps.EngineStep`): the fast precision, fused AdamW on CUDA, the preset's gradient
  clipping, encoder/decoder parameter groups and learning-rate schedule, the engine's Dice loss.
- ``fast+sdpa``: the same with ``train.attention: sdpa`` (SDPA window attention).
- ``fast+compile``, ``fast+sdpa+compile``: the same with ``train.compile: true`` (with ``--compile``).
- ``fast+ckpt x2``: ``model.use_checkpoint: true`` (gradient checkpointing in the Swin blocks) with twice
  the batch: its peak memory against ``fast``'s says whether checkpointing lets the larger batch fit;
  samples/s says what it costs.

Inputs are random tensors already on the device; labels are random 0/1 maps (B, 3, roi, roi, roi).
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss

from bsf.bench.harness import Options, Variant, compare
from bsf.bench.steps import EngineStep, ReferenceStep
from bsf.bench.synthetic import fast_train_overrides, stage3_config
from bsf.model import build_swin_unetr

IN_CHANNELS, OUT_CHANNELS = 4, 3


def _batch(batch: int, opts: Options) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 4, r, r, r) images and (B, 3, r, r, r) 0/1 labels, seeded, on the device."""
    r = opts.size.ft_roi
    gen = torch.Generator(opts.device).manual_seed(opts.seed)
    image = torch.rand((batch, IN_CHANNELS, r, r, r), generator=gen, device=opts.device)
    label = (torch.rand((batch, OUT_CHANNELS, r, r, r), generator=gen, device=opts.device) > 0.9).float()
    return image, label


def _reference(opts: Options, batch: int) -> Variant:
    """MONAI's BraTS script: plain AdamW, fp16 + GradScaler on CUDA (fp32 on CPU), no clipping."""
    torch.manual_seed(opts.seed)
    image, label = _batch(batch, opts)
    criterion = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5)
    precision = "fp16" if opts.device.type == "cuda" else "fp32"
    step = ReferenceStep(build_swin_unetr(opts.size.model, IN_CHANNELS, OUT_CHANNELS), lambda model: criterion(model(image), label),
                         device=opts.device, precision=precision)
    return Variant("reference", f"reference ({precision}, batch {batch}, AdamW)", step, items=batch, state=step.state, is_reference=True)


def _fast(name: str, opts: Options, *, batch: int, compiled=False, checkpoint=False, sdpa=False) -> Variant:
    """``Engine.train_steps`` of Stage 3 (BraTS) at the bench size on a fixed batch: the step users run."""
    image, label = _batch(batch, opts)
    config = stage3_config(opts, f"data.batch_size={batch}", f"model.use_checkpoint={str(checkpoint).lower()}",
                           *fast_train_overrides(opts, sdpa=sdpa, compiled=compiled))
    step = EngineStep(config, {"image": image, "label": label})
    label_text = "fast (" + ", ".join(["Engine.train_steps", f"batch {batch}", *step.describe()]) + ")"
    return Variant(name, label_text, step, items=batch, state=step.state)


def run(opts: Options) -> dict:
    b = opts.size.ft_batch
    variants = [_reference(opts, b), _fast("fast", opts, batch=b), _fast("fast+sdpa", opts, batch=b, sdpa=True)]
    if opts.compile:
        variants += [_fast("fast+compile", opts, batch=b, compiled=True),
                     _fast("fast+sdpa+compile", opts, batch=b, compiled=True, sdpa=True)]
    variants.append(_fast("fast+ckpt x2", opts, batch=2 * b, checkpoint=True))
    rows = compare(variants, opts)
    for row, variant in zip(rows, variants):
        row["info"]["final_loss"] = float(variant.step.last_loss)
    return {"config": {"model": opts.size.model, "roi": opts.size.ft_roi, "batch": b, "in_channels": IN_CHANNELS,
                       "out_channels": OUT_CHANNELS}, "rows": rows}
