"""One optimiser step on a fixed batch, the fast way or the reference way: what the step benchmarks time."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bsf.bench.harness import autocast, optimizer_tensors

#: Tang et al.'s pretraining AdamW settings; used by every benchmarked step alike.
LR, WEIGHT_DECAY = 4e-4, 1e-5


class TrainStep:
    """``step()`` = zero grads, forward + loss under autocast, backward, (clip), AdamW step.

    Args:
        model: the module whose parameters are trained.
        loss_fn: ``loss_fn(forward) -> scalar loss`` on the benchmark's fixed batch, where ``forward``
            is the model or its compiled version.
        device: where everything lives.
        precision: autocast dtype (fp32: none); fp16 adds a GradScaler, as in the reference code.
        fused: fused AdamW (one kernel per step on CUDA) instead of the default foreach one.
        compile: ``torch.compile`` the model.
        grad_clip: clip the gradient norm to this (the engine's default is 1.0), or None.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Callable[..., object]], torch.Tensor],
        *,
        device: torch.device,
        precision: str,
        fused: bool,
        compile: bool = False,
        grad_clip: float | None = None,
    ):
        self.model, self.loss_fn, self.device, self.precision = model.to(device).train(), loss_fn, device, precision
        self.forward = torch.compile(self.model) if compile else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=fused)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.grad_clip = grad_clip
        self.last_loss: torch.Tensor | None = None

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            loss = self.loss_fn(self.forward)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_loss = loss.detach()

    def state(self) -> list[torch.Tensor]:
        """Weights, buffers, gradients and optimiser state: what stays allocated between steps."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return [*self.model.parameters(), *self.model.buffers(), *grads, *optimizer_tensors(self.optimizer)]
