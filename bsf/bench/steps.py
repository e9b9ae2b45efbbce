"""The units of work the step benchmarks time: the project's own training step, and the reference-style one.

- :class:`EngineStep`: ``Engine.train_steps(1)``, the step ``bsf train`` and every federated site run
  (task loss, autocast, grad scaler, clipping, AdamW, learning-rate schedule), on a fixed batch;
- :class:`ReferenceStep`: the public scripts' loop written out (plain AdamW with Tang et al.'s settings,
  fp16 GradScaler on CUDA), the baseline every speed-up is measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from bsf.bench.harness import autocast, optimizer_tensors
from bsf.config import RunConfig
from bsf.engine import Engine

#: Tang et al.'s pretraining AdamW settings, used by the reference-style step.
LR, WEIGHT_DECAY = 4e-4, 1e-5


def _resident(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Weights, buffers, gradients and optimiser state: what stays allocated between steps."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return [*model.parameters(), *model.buffers(), *grads, *optimizer_tensors(optimizer)]


class EngineStep:
    """``step()`` = one ``Engine.train_steps(1)`` of an engine built from ``config``, on a fixed batch.

    The engine's fetch of the next micro-batch returns ``batch`` (already on the device), so what is
    timed is the training step itself; the loader's share is the ``data_wait`` benchmark's.

    Args:
        config: a run config at the bench size (see :mod:`bsf.bench.synthetic`); its ``train``
            section chooses precision, attention and compilation, as it does for users.
        batch: the micro-batch the task's loss reads: ``{"image": (N, C, *roi)}`` for SSL, plus
            ``"label": (N, K, *roi)`` for fine-tuning.
    """

    def __init__(self, config: RunConfig, batch: Mapping[str, torch.Tensor]):
        self.engine = Engine(config)
        self.batch = {k: v.to(self.engine.device) for k, v in batch.items()}
        self.engine._next_micro_batch = lambda: self.batch
        self.last_loss: float | None = None

    def __call__(self) -> None:
        self.last_loss = self.engine.train_steps(1)[0]["loss"]

    def state(self) -> list[torch.Tensor]:
        return _resident(self.engine.model, self.engine.optimizer)

    def describe(self) -> list[str]:
        """The settings that shape the step, for the table: precision, optimiser, clipping, attention, ..."""
        c, engine = self.engine.config, self.engine
        parts = [c.train.precision, "fused AdamW" if engine.device.type == "cuda" else "AdamW"]
        parts += [f"clip {c.optim.grad_clip:g}"] if c.optim.grad_clip else []
        parts += (["SDPA"] if c.train.attention == "sdpa" else []) + (["compile"] if c.train.compile else [])
        return parts + (["grad checkpoint"] if c.model.use_checkpoint else [])


class ReferenceStep:
    """``step()`` = zero grads, forward + loss under autocast, backward, AdamW step: the public scripts' loop.

    Args:
        model: the module whose parameters are trained.
        loss_fn: ``loss_fn(model) -> scalar loss`` on the benchmark's fixed batch.
        device: where everything lives.
        precision: autocast dtype (fp32: none); fp16 adds a GradScaler, as in the reference code.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], *, device: torch.device, precision: str):
        self.model, self.loss_fn, self.device, self.precision = model.to(device).train(), loss_fn, device, precision
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.last_loss: float | None = None

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            loss = self.loss_fn(self.model)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_loss = float(loss.detach())

    def state(self) -> list[torch.Tensor]:
        return _resident(self.model, self.optimizer)
