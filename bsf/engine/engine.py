"""The one training core. Every driver (``bsf train``, torchrun, the NVFlare executor) steps this object.

An :class:`Engine` owns the model, AdamW, the warm-up cosine schedule, the grad scaler and a
position in the deterministic data stream. Everything random is derived from ``(seed, step)``,
so ``state_dict()`` at step ``t`` plus the config reproduce steps ``t+1, t+2, ...`` exactly: the
data order and crops, the SSL views (an explicit generator) and what modules draw from torch's
global generator (dropout, drop-path), which each micro-batch re-seeds; what ran before in the
process (other steps, validation, another engine, NVFlare) does not change a step's draws.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from bsf.config import RunConfig
from bsf.data.pipeline import SampleStream, StepSampler, seed_for, train_loader, training_split
from bsf.engine.schedule import warmup_cosine
from bsf.engine.tasks import build_task
from bsf.errors import CheckpointError, ConfigError
from bsf.io import atomic_torch_save
from bsf.model import check_finite, read_checkpoint, select_weights
from bsf.model.attention import use_sdpa_attention

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_TRAIN_STREAM, _VAL_STREAM, _INIT_STREAM, _MODULE_STREAM = 1, 2, 3, 4  # independent RNG streams derived from the seed


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when a GPU is visible, else ``cpu``; a named GPU must exist.

    Raises:
        ConfigError: a CUDA device that this machine does not have (naming ``train.device``).
    """
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError(f"train.device={name}: this machine has {count} CUDA GPU(s); use auto or cpu")
    return device


def build_model(config: RunConfig) -> torch.nn.Module:
    """The stage's model, initialised from the config's seed (identical in every process and on the FL server)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_for(config.seed, _INIT_STREAM))
        return build_task(config).build_model()


class Engine:
    """Model + optimiser + schedule + data position, stepped by any driver.

    Args:
        config: the validated run configuration.
        rank, world_size: this process's place in a DDP group (``torch.distributed`` must be
            initialised by the caller when ``world_size > 1``).
        device: overrides ``config.train.device``.
    """

    def __init__(self, config: RunConfig, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.device = device or resolve_device(config.train.device)
        if self.device.type == "cpu" and config.train.precision != "fp32":
            # measured with torch 2.13.0+cpu: the bf16 Conv3d backward returns gradients of 1e35 on some calls
            raise ConfigError(
                f"train.precision={config.train.precision} on the CPU: mixed-precision training is for GPUs "
                "(CPU bf16 Conv3d gradients are unreliable in this torch build); set train.precision=fp32"
            )
        self.task = build_task(config)
        self.model = build_model(config).to(self.device)
        if config.train.attention == "sdpa":
            use_sdpa_attention(self.model)
        self.train_model = self.model
        if world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=device_ids)
        if config.train.compile:
            self.train_model = torch.compile(self.train_model)
        self.optimizer = torch.optim.AdamW(
            self.task.parameter_groups(self.model),
            lr=config.optim.lr,
            weight_decay=config.optim.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.scheduler = warmup_cosine(self.optimizer, config.optim.warmup_steps, config.schedule_steps, config.optim.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.train.precision == "fp16")
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.split = training_split(config.data, config.seed, config.finetune.label_format)
        self.stream = SampleStream(self.split.train, config.data, config.seed, self.task.random_transforms(), self.task.label_transform)
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None
        self._val_items: list | None = None
        #: an optional term added to every micro-batch's loss (e.g. FedProx's proximal term); returns a scalar tensor
        self.extra_loss: Callable[[], torch.Tensor] | None = None
        log.info("engine: %d training and %d validation cases, device %s", len(self.split.train), len(self.split.val), self.device)

    @property
    def num_train_cases(self) -> int:
        return len(self.split.train)

    # ------------------------------------------------------------------ training
    def _autocast(self):
        precision = self.config.train.precision
        if precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _next_micro_batch(self) -> dict[str, torch.Tensor]:
        """``{"image": (N, C, *roi)[, "label": (N, K, *roi)]}`` on the device."""
        if self._batches is None:
            sampler = StepSampler(self.step, self.config.data.batch_size, self.config.optim.accumulate, self.rank, self.world_size)
            self._batches = iter(train_loader(self.stream, sampler, self.config.data.num_workers))
        return {k: v.to(self.device, non_blocking=True) for k, v in next(self._batches).items() if isinstance(v, torch.Tensor)}

    @contextmanager
    def _micro_batch_random(self, micro_batch: int) -> Iterator[torch.Generator]:
        """The random draws of micro-batch ``micro_batch`` (``rank * accumulate + a``) of the current step.

        Yields the generator the task draws its views from (``_TRAIN_STREAM``), and for the block seeds
        torch's global generators of the CPU and this device (``_MODULE_STREAM``), which dropout and
        drop-path draw from in the forward (and a checkpointed forward replays in the backward); the
        process's global state is restored afterwards. Both depend only on ``(seed, step, micro_batch)``.
        """
        module_seed = seed_for(self.config.seed, _MODULE_STREAM, self.step, micro_batch)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.random.default_generator.manual_seed(module_seed)
            if self.device.type == "cuda":
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(module_seed)
            yield torch.Generator(self.device).manual_seed(seed_for(self.config.seed, _TRAIN_STREAM, self.step, micro_batch))

    def train_steps(self, n: int) -> list[dict[str, float]]:
        """Run ``n`` optimiser steps. Returns one record per step: ``step``, ``loss``, the loss parts, ``lr``.

        Losses are averaged over micro-batches and, under DDP, over processes. A non-finite loss
        is returned as is (the caller decides: the centralized driver stops, a federated server
        rejects the update).
        """
        accumulate = self.config.optim.accumulate
        records = []
        for _ in range(n):
            self.train_model.train()
            self.optimizer.zero_grad(set_to_none=True)
            totals: dict[str, torch.Tensor] = {}
            for a in range(accumulate):
                batch = self._next_micro_batch()
                sync = nullcontext() if a == accumulate - 1 or self.world_size == 1 else self.train_model.no_sync()
                with sync, self._micro_batch_random(self.rank * accumulate + a) as generator:
                    with self._autocast():
                        loss, parts = self.task.loss(self.train_model, batch, generator)
                        if self.extra_loss is not None:
                            parts = {**parts, "extra_loss": self.extra_loss()}
                            loss = loss + parts["extra_loss"]
                    self.scaler.scale(loss / accumulate).backward()
                for name, value in {"loss": loss, **parts}.items():
                    totals[name] = totals.get(name, 0.0) + value.detach().float() / accumulate
            lr = self.scheduler.get_last_lr()[0]
            if self.config.optim.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.step += 1
            records.append({"step": self.step, **self._global_mean(totals), "lr": lr})
        return records

    def _global_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        stacked = torch.stack([values[k] for k in values])
        if self.world_size > 1:
            dist.all_reduce(stacked)
            stacked /= self.world_size
        return {k: float(v) for k, v in zip(values, stacked.tolist())}

    # ---------------------------------------------------------------- validation
    def validation_inputs(self) -> list:
        """The task's validation items (SSL: one centre crop per case; fine-tuning: whole volumes), loaded once."""
        if self._val_items is None:
            self._val_items = self.task.validation_items(self.split.val)
        return self._val_items

    def validate(self) -> dict[str, float]:
        """The task's validation metrics on the validation cases (fixed seed), averaged over cases."""
        if not self.split.val:
            return {}
        generator = torch.Generator(self.device).manual_seed(seed_for(self.config.seed, _VAL_STREAM))
        self.model.eval()
        with self._autocast():
            return self.task.validate(self.model, self.validation_inputs(), generator, self.device)

    def is_better(self, metrics: Mapping[str, float]) -> bool:
        """Record ``metrics`` as the best so far when its selection metric improves; return whether it did."""
        name = self.task.best_metric
        if name not in metrics or not np.isfinite(metrics[name]):
            return False
        value = metrics[name]
        if self.best is not None:
            better = value < self.best["value"] if self.task.lower_is_better else value > self.best["value"]
            if not better:
                return False
        self.best = {"metric": name, "value": value, "step": self.step}
        return True

    # ------------------------------------------------------------------ weights
    def get_weights(self, scope: str = "all") -> dict[str, np.ndarray]:
        """float32 numpy copies of the model's ``scope`` keys (``encoder`` = ``swinViT.*``)."""
        state = select_weights(self.model.state_dict(), scope)
        return {k: v.detach().float().cpu().numpy().copy() for k, v in state.items()}

    def set_weights(self, weights: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Copy exactly ``weights`` into the model; keys must exist and shapes match."""
        state = self.model.state_dict()
        unknown = sorted(set(weights) - set(state))
        mismatched = sorted(k for k in weights if k in state and tuple(np.shape(weights[k])) != tuple(state[k].shape))
        if unknown or mismatched:
            raise CheckpointError(f"weights do not match the model: unknown keys {unknown}, shape mismatches {mismatched}")
        with torch.no_grad():
            for key, value in weights.items():
                state[key].copy_(torch.as_tensor(np.asarray(value)))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "best": self.best,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint version {state.get('version')!r} is not {CHECKPOINT_VERSION}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best = state["best"]
        self._batches = None  # restart the stream at the restored step

    def save_checkpoint(self, path: str | Path) -> None:
        """Write the full resumable state atomically (temp file + rename)."""
        atomic_torch_save(self.state_dict(), path)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore the state :meth:`save_checkpoint` wrote; the file is loaded with ``weights_only=True``.

        The state holds only tensors, numbers, strings and plain containers, so a planted file that
        names any other class is refused instead of run. Non-finite model weights are refused too.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path}: no such file")
        state = read_checkpoint(path, "checkpoint", map_location=self.device)
        if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
            raise CheckpointError(f"checkpoint {path}: not a bsf training checkpoint (no 'model' state)")
        check_finite(state["model"], f"checkpoint {path}")
        self.load_state_dict(state)
