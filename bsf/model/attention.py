"""Swin window attention through ``torch.nn.functional.scaled_dot_product_attention``, in training too.

MONAI's ``WindowAttention`` computes ``softmax(q k^T * scale + bias [+ shift mask]) v`` with explicit
matrices and uses SDPA only without gradients (``use_flash_attention``). :func:`use_sdpa_attention`
swaps in a forward that always calls SDPA with the same additive bias, so PyTorch can pick a fused
kernel (memory-efficient attention on CUDA supports an additive bias and its gradient) and never
stores the softmax matrix. Same parameters, same state-dict keys, same result up to rounding.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn


def _sdpa_forward(self: WindowAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x: (B*nW, N, C)`` window tokens, ``mask: (nW, N, N)`` additive shift mask or None -> (B*nW, N, C)."""
    b, n, c = x.shape
    heads = self.num_heads
    q, k, v = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, h, N, d) each
    index = self.relative_position_index[:n, :n].reshape(-1)
    bias = self.relative_position_bias_table[index].reshape(n, n, heads).permute(2, 0, 1)  # (h, N, N)
    if mask is None:
        bias = bias.unsqueeze(0)
    else:
        windows = mask.shape[0]
        bias = (bias.unsqueeze(0).unsqueeze(0) + mask.unsqueeze(1).unsqueeze(0)).expand(b // windows, -1, -1, -1, -1)
        bias = bias.reshape(b, heads, n, n)
    dropout = self.attn_drop.p if self.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=dropout, scale=self.scale)
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


def use_sdpa_attention(model: nn.Module) -> nn.Module:
    """Make every MONAI ``WindowAttention`` in ``model`` use SDPA, with or without gradients; returns ``model``."""
    for module in model.modules():
        if isinstance(module, WindowAttention):
            module.forward = types.MethodType(_sdpa_forward, module)
    return model
