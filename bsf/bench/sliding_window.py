"""Whole-volume sliding-window inference: one (4, X, Y, Z) volume (240 x 240 x 155 at paper size), windows of ``ft_roi``.

- ``reference``: the public BraTS test settings: fp32, overlap 0.6, one window per forward, constant
  blending, MONAI's own attention.
- ``fast``: the project's settings (``finetune.sw_overlap`` 0.5, ``finetune.sw_batch_size``, Gaussian
  blending), autocast in the fast precision, ``torch.inference_mode`` and
  ``scaled_dot_product_attention`` in the Swin windows (:func:`bsf.model.attention.use_sdpa_attention`).
- ``fast kernels``: the reference's windows and blending with ``fast``'s precision, windows per call,
  inference mode and attention: what the kernels alone give, and whether they change the output.

Agreement with the reference (``info``): max |probability difference| and the fraction of voxels whose
0.5-thresholded prediction differs (random weights: outputs sit near 0.5, so this is a worst case).
``fast`` also differs by design (fewer windows, Gaussian blending); ``fast kernels`` shows the numerics.
"""

from __future__ import annotations

import copy

import torch
from monai.inferers import sliding_window_inference

from bsf.bench.harness import Options, Variant, autocast, compare
from bsf.config import FinetuneConfig
from bsf.model import build_swin_unetr
from bsf.model.attention import use_sdpa_attention


class _Inference:
    """``__call__()`` -> sigmoid probabilities (1, K, X, Y, Z) of the fixed volume; keeps the last output."""

    def __init__(self, model, volume, roi, *, precision, overlap, sw_batch_size, mode, device):
        self.model, self.volume, self.roi, self.device = model.eval(), volume, roi, device
        self.precision, self.overlap, self.sw_batch_size, self.mode = precision, overlap, sw_batch_size, mode
        self.output: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        with torch.inference_mode(), autocast(self.device, self.precision):
            logits = sliding_window_inference(self.volume, [self.roi] * 3, self.sw_batch_size, self.model,
                                              overlap=self.overlap, mode=self.mode)
        self.output = torch.sigmoid(logits.float())
        return self.output


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    return {"max_abs_prob_diff": float((a - b).abs().max()), "threshold_disagreement": float(((a > 0.5) != (b > 0.5)).float().mean())}


def run(opts: Options) -> dict:
    s, device = opts.size, opts.device
    torch.manual_seed(opts.seed)
    base = build_swin_unetr(s.model, s.volume[0], 3).to(device)
    volume = torch.rand((1, *s.volume), generator=torch.Generator(device).manual_seed(opts.seed), device=device)
    project = FinetuneConfig()
    reference = _Inference(base, volume, s.ft_roi, precision="fp32", overlap=0.6, sw_batch_size=1, mode="constant", device=device)
    fast_model = use_sdpa_attention(copy.deepcopy(base))
    fast = dict(precision=opts.precision, sw_batch_size=project.sw_batch_size, mode="gaussian", device=device)
    runs = {
        "reference": (reference, "reference (fp32, overlap 0.6, 1 window/call, constant blend)"),
        "fast": (_Inference(fast_model, volume, s.ft_roi, overlap=project.sw_overlap, **fast),
                 f"fast ({opts.precision}, overlap {project.sw_overlap}, {project.sw_batch_size} windows/call, gaussian, SDPA)"),
        "fast kernels": (_Inference(fast_model, volume, s.ft_roi, overlap=0.6, **{**fast, "mode": "constant"}),
                         f"fast kernels ({opts.precision}, overlap 0.6, {project.sw_batch_size} windows/call, constant blend, SDPA)"),
    }
    params = list(base.parameters()) + list(fast_model.parameters())
    variants = [Variant(name, label, fn, items=1, state=lambda: params[: len(params) // 2], is_reference=name == "reference")
                for name, (fn, label) in runs.items()]
    rows = compare(variants, opts)
    for row in rows:
        row["info"].update(_agreement(runs[row["name"]][0].output, reference.output))
        row["volumes_per_s"] = row["samples_per_s"]
    return {"config": {"model": s.model, "volume": list(s.volume), "roi": s.ft_roi}, "rows": rows}
