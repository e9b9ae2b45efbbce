"""Stage 3 fine-tuning step: SwinUNETR + sigmoid Dice loss on ``ft_batch`` crops of ``ft_roi``^3 (4 in, 3 out).

- ``reference``: fp16 autocast + GradScaler on CUDA (fp32 on CPU), ``torch.optim.AdamW`` defaults, as
  in MONAI's BraTS SwinUNETR script.
- ``fast``: the fast precision, fused AdamW on CUDA, gradient clipping at 1.0 (the engine's default).
- ``fast+sdpa``: the same with SDPA window attention (:func:`bsf.model.attention.use_sdpa_attention`).
- ``fast+compile``, ``fast+sdpa+compile``: the same with ``torch.compile`` (with ``--compile``).
- ``fast+ckpt x2``: gradient checkpointing in the Swin blocks with twice the batch: its peak memory
  against ``fast``'s says whether checkpointing lets the larger batch fit; samples/s says what it costs.

Inputs are random tensors already on the device; labels are random 0/1 maps (B, 3, roi, roi, roi).
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss

from bsf.bench.harness import Options, Variant, compare
from bsf.bench.steps import TrainStep
from bsf.model import build_swin_unetr
from bsf.model.attention import use_sdpa_attention

IN_CHANNELS, OUT_CHANNELS = 4, 3


def _batch(batch: int, opts: Options) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 4, r, r, r) images and (B, 3, r, r, r) 0/1 labels, seeded, on the device."""
    r = opts.size.ft_roi
    gen = torch.Generator(opts.device).manual_seed(opts.seed)
    image = torch.rand((batch, IN_CHANNELS, r, r, r), generator=gen, device=opts.device)
    label = (torch.rand((batch, OUT_CHANNELS, r, r, r), generator=gen, device=opts.device) > 0.9).float()
    return image, label


def _variant(name: str, opts: Options, *, batch: int, precision: str, fused: bool, compiled=False,
             checkpoint=False, sdpa=False, clip: float | None = None, reference=False) -> Variant:
    torch.manual_seed(opts.seed)
    image, label = _batch(batch, opts)
    criterion = DiceLoss(sigmoid=True, smooth_nr=0.0, smooth_dr=1e-5)
    model = build_swin_unetr(opts.size.model, IN_CHANNELS, OUT_CHANNELS, use_checkpoint=checkpoint)
    step = TrainStep(use_sdpa_attention(model) if sdpa else model, lambda forward: criterion(forward(image), label),
                     device=opts.device, precision=precision, fused=fused, compile=compiled, grad_clip=clip)
    parts = [precision, f"batch {batch}", "fused AdamW" if fused else "AdamW"]
    parts += (["clip 1.0"] if clip else []) + (["SDPA"] if sdpa else []) + (["compile"] if compiled else [])
    parts += ["grad checkpoint"] if checkpoint else []
    return Variant(name, f"{name.split('+')[0]} (" + ", ".join(parts) + ")", step, items=batch, state=step.state,
                   is_reference=reference)


def run(opts: Options) -> dict:
    b, cuda = opts.size.ft_batch, opts.device.type == "cuda"
    fast = dict(precision=opts.precision, fused=cuda, clip=1.0)
    variants = [
        _variant("reference", opts, batch=b, precision="fp16" if cuda else "fp32", fused=False, reference=True),
        _variant("fast", opts, batch=b, **fast),
        _variant("fast+sdpa", opts, batch=b, sdpa=True, **fast),
    ]
    if opts.compile:
        variants += [_variant("fast+compile", opts, batch=b, compiled=True, **fast),
                     _variant("fast+sdpa+compile", opts, batch=b, compiled=True, sdpa=True, **fast)]
    variants.append(_variant("fast+ckpt x2", opts, batch=2 * b, checkpoint=True, **fast))
    rows = compare(variants, opts)
    for row, variant in zip(rows, variants):
        row["info"]["final_loss"] = float(variant.step.last_loss)
    return {"config": {"model": opts.size.model, "roi": opts.size.ft_roi, "batch": b, "in_channels": IN_CHANNELS,
                       "out_channels": OUT_CHANNELS}, "rows": rows}
