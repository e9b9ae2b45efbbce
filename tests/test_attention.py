"""SDPA window attention (bsf.model.attention) computes what MONAI's WindowAttention computes, gradients included."""

from __future__ import annotations

import copy

import torch

from bsf.model import SSLModel, build_swin_unetr
from bsf.model.attention import use_sdpa_attention


def test_sdpa_attention_matches_monai_forward_and_backward():
    torch.manual_seed(0)
    monai_model = SSLModel("test", 2)
    sdpa_model = use_sdpa_attention(copy.deepcopy(monai_model))
    x = torch.rand(1, 2, 64, 64, 64)  # the test size's window 4 gives shifted windows (masks) in every stage
    outputs = []
    for model in (monai_model, sdpa_model):
        out = model(x)
        (out.reconstruction.mean() + out.rotation_logits.square().mean() + out.contrastive.square().mean()).backward()
        outputs.append(out)
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # the decoder's conv biases right before InstanceNorm have a zero gradient up to rounding
    before_norm = {f"conv.{i}.bias" for i in (0, 4, 8, 12, 16)}
    for (name, p), q in zip(monai_model.named_parameters(), sdpa_model.parameters()):
        if name not in before_norm:
            assert (p.grad - q.grad).abs().max() <= 1e-3 * p.grad.abs().max(), name
    assert monai_model.state_dict().keys() == sdpa_model.state_dict().keys()


def test_sdpa_attention_without_grad_in_swin_unetr():
    torch.manual_seed(0)
    model = build_swin_unetr("test", 4, 3).eval()
    fast = use_sdpa_attention(copy.deepcopy(model))
    x = torch.rand(1, 4, 64, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), fast(x), rtol=1e-4, atol=1e-5)
