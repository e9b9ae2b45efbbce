"""From a data folder to a deterministic, resumable stream of training crops.

The stream is a pure function of ``(seed, sample_id)``: sample ``s`` belongs to epoch
``s // n_cases``, whose case order is a seeded permutation, and its random crop is seeded from
``(seed, s)``. A run therefore resumes exactly from its step count alone, and worker count or
process count never changes what a given sample is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, list_data_collate
from monai.transforms import (
    CenterSpatialCropd,
    Compose,
    CropForegroundd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandSpatialCropSamplesd,
    SpatialPadd,
)
from torch.utils.data import DataLoader, Sampler

from bsf.data.layouts import find_ukb_subjects
from bsf.config import DataConfig
from bsf.errors import DataError

log = logging.getLogger(__name__)

Case = dict[str, Any]


def seed_for(*keys: int) -> int:
    """A 31-bit seed derived from integer keys (stable across processes and platforms)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] >> 1)


@dataclass
class CaseSplit:
    train: list[Case]
    val: list[Case]


def load_cases(cfg: DataConfig, seed: int) -> CaseSplit:
    """Find the cases of ``cfg.dataset`` (from a datalist JSON, else the folder layout) and split off validation.

    Paths in the result are absolute. A datalist is MONAI-style JSON
    ``{"training": [{"image": [...]}, ...], "validation": [...]}`` with paths relative to
    ``data.root`` (or to the JSON's folder when ``root`` is empty).
    """
    if cfg.datalist:
        return _read_datalist(Path(cfg.datalist), cfg.root, cfg.val_cases, seed)
    root = Path(cfg.root)
    if not cfg.root or not root.is_dir():
        raise DataError(f"data.root {cfg.root or '(empty)'}: no such data folder")
    if cfg.dataset != "ukb":
        raise DataError(f"data.dataset {cfg.dataset}: only 'ukb' can be indexed from a folder yet; give data.datalist")
    cases = [_absolute(case, root) for case in find_ukb_subjects(root)]
    return _split(cases, cfg.val_cases, seed)


def _read_datalist(path: Path, root: str, val_cases: int, seed: int) -> CaseSplit:
    if not path.is_file():
        raise DataError(f"datalist {path}: no such file")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"datalist {path}: not valid JSON ({exc})") from None
    base = Path(root) if root else path.parent
    train = [_absolute(c, base) for c in content.get("training", [])]
    if not train:
        raise DataError(f"datalist {path}: no cases under 'training'")
    if "validation" in content:
        return CaseSplit(train, [_absolute(c, base) for c in content["validation"]])
    return _split(train, val_cases, seed)


def _absolute(case: Case, base: Path) -> Case:
    def resolve(p: str) -> str:
        return str(p if Path(p).is_absolute() else base / p)

    out = dict(case)
    for key in ("image", "label"):
        if key in out:
            out[key] = [resolve(p) for p in out[key]] if isinstance(out[key], list) else resolve(out[key])
    return out


def _split(cases: list[Case], val_cases: int, seed: int) -> CaseSplit:
    if len(cases) <= val_cases:
        raise DataError(f"only {len(cases)} case(s) found; need more than data.val_cases={val_cases}")
    order = np.random.default_rng(seed).permutation(len(cases))
    val = [cases[i] for i in sorted(order[:val_cases])]
    train = [cases[i] for i in sorted(order[val_cases:])]
    return CaseSplit(train, val)


def deterministic_transforms(roi: Sequence[int]) -> Compose:
    """Load all modalities as channels, orient to RAS, z-score the brain per channel, crop to it, pad to ``roi``.

    Output ``image``: float32 tensor (C, X, Y, Z) with every side >= the ROI side.
    """
    return Compose(
        [
            LoadImaged(keys="image", ensure_channel_first=True, image_only=True),
            Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
            CropForegroundd(keys="image", source_key="image", allow_smaller=True),
            SpatialPadd(keys="image", spatial_size=list(roi)),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        ]
    )


class SampleStream(torch.utils.data.Dataset):
    """Maps a global sample id to ``crops_per_volume`` random crops of one case.

    ``self[s]`` -> list of ``{"image": (C, *roi)}`` dicts, reproducible from ``(seed, s)``.
    """

    def __init__(self, cases: list[Case], cfg: DataConfig, seed: int):
        self.seed = seed
        self.n_cases = len(cases)
        base = deterministic_transforms(cfg.roi)
        if cfg.cache == "memory":
            self.volumes: Dataset = CacheDataset(cases, base, cache_rate=1.0, num_workers=max(cfg.num_workers, 1), progress=False)
        else:
            self.volumes = Dataset(cases, base)
        self.crop = RandSpatialCropSamplesd(keys="image", roi_size=list(cfg.roi), num_samples=cfg.crops_per_volume, random_size=False)

    def case_index(self, sample_id: int) -> int:
        epoch, position = divmod(sample_id, self.n_cases)
        return int(np.random.default_rng([self.seed, epoch]).permutation(self.n_cases)[position])

    def __len__(self) -> int:  # the stream is endless; this is one epoch
        return self.n_cases

    def __getitem__(self, sample_id: int) -> list[dict[str, torch.Tensor]]:
        volume = self.volumes[self.case_index(sample_id)]
        self.crop.set_random_state(seed=seed_for(self.seed, sample_id))
        return [{"image": crop["image"]} for crop in self.crop(volume)]


class StepSampler(Sampler[int]):
    """Yields the sample ids one process reads, step after step, from ``start_step`` on.

    Optimizer step ``t`` consumes ``world_size * accumulate`` micro-batches of ``batch_size``
    samples; micro-batch ``j = rank * accumulate + a`` holds ids
    ``t * global_batch + j * batch_size + [0, batch_size)``.
    """

    def __init__(self, start_step: int, batch_size: int, accumulate: int = 1, rank: int = 0, world_size: int = 1):
        self.start_step, self.batch_size, self.accumulate = start_step, batch_size, accumulate
        self.rank, self.world_size = rank, world_size

    def micro_batch_ids(self, step: int, a: int) -> range:
        j = self.rank * self.accumulate + a
        first = (step * self.world_size * self.accumulate + j) * self.batch_size
        return range(first, first + self.batch_size)

    def __iter__(self) -> Iterator[int]:
        step = self.start_step
        while True:
            for a in range(self.accumulate):
                yield from self.micro_batch_ids(step, a)
            step += 1


def train_loader(stream: SampleStream, sampler: StepSampler, num_workers: int) -> DataLoader:
    """Micro-batches of ``batch_size * crops_per_volume`` crops: ``{"image": (N, C, *roi)}``."""
    return DataLoader(
        stream,
        batch_size=sampler.batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=list_data_collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def validation_crops(cases: list[Case], cfg: DataConfig) -> list[torch.Tensor]:
    """One centre crop per validation case, loaded once: list of (C, *roi) tensors."""
    transform = Compose([deterministic_transforms(cfg.roi), CenterSpatialCropd(keys="image", roi_size=list(cfg.roi))])
    return [transform(case)["image"] for case in cases]
