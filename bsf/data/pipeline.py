"""From a data folder to a deterministic, resumable stream of training crops.

The stream is a pure function of ``(seed, sample_id)``: sample ``s`` belongs to epoch
``s // n_cases``, whose case order is a seeded permutation, and its random crop is seeded from
``(seed, s)``. A run therefore resumes exactly from its step count alone, and worker count or
process count never changes what a given sample is.
"""

from __future__ import annotations

import logging
import os
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset, list_data_collate
from monai.utils import convert_to_tensor
from monai.transforms import CenterSpatialCropd, Compose, EnsureTyped, LoadImaged, Transform
from torch.utils.data import DataLoader, Sampler

from bsf.data.cases import list_cases
from bsf.data.transforms import build_steps, model_channels, preprocessing_steps, steps_key
from bsf.config import DataConfig
from bsf.errors import DataError
from bsf.io import atomic_torch_save, sweep_stale_temp_files

log = logging.getLogger(__name__)

Case = dict[str, Any]


def seed_for(*keys: int) -> int:
    """A 31-bit seed derived from integer keys (stable across processes and platforms)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] >> 1)


@dataclass
class CaseSplit:
    train: list[Case]
    val: list[Case]


def training_split(cfg: DataConfig, seed: int, label_format: str = "auto") -> CaseSplit:
    """The checked (training, validation) cases of ``cfg``: listed by :func:`bsf.data.cases.list_cases` (a datalist
    JSON, else the folder layout under ``data.root``; ``data.modalities``; ``data.fold``), then checked; without a
    validation list (a data folder, a datalist without one), ``data.val_cases`` seeded cases are held out.

    Paths in the result are absolute. Every case passes :func:`bsf.data.check.check_cases` (headers, and voxels
    when ``data.check`` is "full"): broken cases stop the run with a :class:`DataError` naming each file and
    problem, or are left out and logged when ``data.skip_broken`` is set. ``label_format``: the run config's
    ``finetune.label_format`` (:func:`bsf.data.labels.label_rule`).
    """
    cases = list_cases(cfg.dataset, datalist=cfg.datalist, root=cfg.root, modalities=cfg.modalities, fold=cfg.fold)
    train = _checked(cases.training, cfg, cases.source, cases.labels, label_format)
    if cases.validation is None:
        return _split(train, cfg.val_cases, seed)
    val = _checked(cases.validation, cfg, cases.source, cases.labels, label_format, role="validation") if cases.validation else []
    return CaseSplit(train, val)


def _checked(cases: list[Case], cfg: DataConfig, where: str, labels: list[int] | None, label_format: str, role: str = "training") -> list[Case]:
    """``cases`` that pass the pre-training check; DataError (or, with ``skip_broken``, a logged skip) for the rest."""
    from bsf.data.check import check_cases  # local: keeps the module import light

    report = check_cases(
        cases,
        data=cfg.check == "full",
        workers=max(1, cfg.num_workers),
        dataset=cfg.dataset,
        labels=labels,
        label_format=label_format,
        memo_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
    )
    for problem in report.warnings:
        log.warning("%s: %s", problem.file or problem.case, problem.problem)
    if report.ok:
        return cases
    if not cfg.skip_broken:
        fix = "fix them" if len(report.broken) == len(cases) else "fix them, or set data.skip_broken=true to leave them out"
        raise DataError(f"{where}: {len(report.broken)} of {len(cases)} {role} case(s) broken; {fix}: " + report.one_line())
    log.warning("%s: leaving out %d broken %s case(s) (data.skip_broken):", where, len(report.broken), role)
    for problem in report.errors:
        log.warning("  %s: %s", problem.file or problem.case, problem.problem)
    kept = [c for i, c in enumerate(cases) if i not in report.broken]
    if role == "training" and not kept:
        raise DataError(f"{where}: every training case is broken: " + report.one_line())
    return kept


def _split(cases: list[Case], val_cases: int, seed: int) -> CaseSplit:
    if len(cases) <= val_cases:
        raise DataError(f"only {len(cases)} case(s) found; need more than data.val_cases={val_cases}")
    order = np.random.default_rng(seed).permutation(len(cases))
    val = [cases[i] for i in sorted(order[:val_cases])]
    train = [cases[i] for i in sorted(order[val_cases:])]
    return CaseSplit(train, val)


class CheckedLoadd(Transform):
    """``LoadImaged`` of ``image`` (and ``label`` when present), channels first, that turns any read failure,
    and non-finite voxels, into a :class:`DataError` naming the file and the problem (a MONAI/nibabel
    traceback names neither well).

    A MONAI ``Transform`` (and not random), so Cache/PersistentDataset cache everything after it too."""

    def __init__(self, with_label: bool = False) -> None:
        self.keys = ["image", "label"] if with_label else ["image"]
        self.load = LoadImaged(keys=self.keys, ensure_channel_first=True, image_only=True)

    def __call__(self, data: Case) -> Case:
        files = [f for key in self.keys for f in (data[key] if isinstance(data[key], list) else [data[key]])]
        try:
            out = self.load(data)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file named
            raise DataError(_load_failure(files, exc)) from None
        image = out["image"]
        finite = torch.isfinite(image.reshape(image.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            images = data["image"] if isinstance(data["image"], list) else [data["image"]]
            bad = [images[i] if len(images) == image.shape[0] else ", ".join(images) for i in range(image.shape[0]) if not finite[i]]
            raise DataError(f"{bad[0]}: holds NaN or Inf voxels")
        return out


def _load_failure(files: list[str], exc: Exception) -> str:
    """The first file of a failed load that shows a problem, with the problem; else the raw error."""
    from bsf.data.check import file_data_problems, file_header

    for name in files:
        header, problems = file_header(Path(name))
        if header is None or problems:
            text = problems[0][1] if problems else "unreadable"
            return f"{name}: {text}"
        problems = file_data_problems(Path(name), "image", None)
        if problems:
            return f"{name}: {problems[0][1]}"
    return f"{', '.join(files)}: cannot load ({type(exc).__name__}: {exc})"


def as_data_error(exc: BaseException) -> BaseException:
    """The :class:`DataError` inside MONAI's ``RuntimeError("applying transform ...")`` wrapping, else ``exc``."""
    seen = exc
    while seen is not None:
        if isinstance(seen, DataError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def deterministic_transforms(cfg: DataConfig, label_transform: Transform | None = None) -> Compose:
    """Load all modalities as channels, then ``data.transforms``' deterministic steps (by default: orient to RAS,
    crop to the brain, z-score it per channel), pad to ``data.roi``.

    Output ``image``: float32 tensor (C, X, Y, Z) with every side >= the ROI side. With a
    ``label_transform`` the case's ``label`` is loaded too, converted by it right after loading
    (e.g. BraTS labels -> TC/WT/ET channels), and moved with the image.
    """
    keys = _keys(label_transform)
    return Compose(
        [
            CheckedLoadd(with_label=label_transform is not None),
            *([label_transform] if label_transform is not None else []),
            *build_steps(preprocessing_steps(cfg, keys)),
            EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
            CompactImaged(keys),
        ]
    )


def _keys(label_transform: Transform | None) -> list[str]:
    return ["image", "label"] if label_transform is not None else ["image"]


class CompactImaged(Transform):
    """Make each of ``keys`` an owning, contiguous tensor: the foreground crop is a view of the whole grid,
    and a persistent cache would otherwise save (and read back) the uncropped storage."""

    def __init__(self, keys: Sequence[str] = ("image",)) -> None:
        self.keys = list(keys)

    def __call__(self, data: Case) -> Case:
        out = dict(data)
        for key in self.keys:
            tensor = out[key]
            if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() or not tensor.is_contiguous():
                out[key] = tensor.contiguous().clone() if tensor.is_contiguous() else tensor.contiguous()
        return out


#: bump when the code of deterministic_transforms changes (its settings are in the cache key already):
#: persistent cache entries of older versions are not reused
PREPROCESS_VERSION = 4


def preprocessing_key(cfg: DataConfig, label_transform: Transform | None = None) -> str:
    """What a preprocessed volume depends on besides its files: :data:`PREPROCESS_VERSION`, every deterministic
    ``data.transforms`` setting and the ROI (as :func:`bsf.data.transforms.preprocessing_steps`), and the label
    conversion (none for SSL, whose cached volumes carry no label)."""
    label = "none"
    if label_transform is not None:
        settings = {k: v for k, v in sorted(vars(label_transform).items()) if isinstance(v, (str, int, float, bool))}
        label = f"{type(label_transform).__name__}{settings}"
    return f"v{PREPROCESS_VERSION}|{steps_key(preprocessing_steps(cfg, _keys(label_transform)))}|label={label}"


def persistent_dataset(cases: list[Case], transform: Compose, cache_dir: str, key: str) -> Dataset:
    """MONAI ``PersistentDataset``: each case's preprocessed volume is written once to ``cache_dir`` as a .pt file.

    The cache entry's name hashes the case entry, each file's size and modification time, and ``key``
    (:func:`preprocessing_key`), so a replaced file or a changed setting gets a new entry.
    Size: the float32 volume after the foreground crop (BraTS ~70 MB a case, 143 MB uncropped).
    Temporary files that crashed runs left in ``cache_dir`` are swept first (:func:`bsf.io.sweep_stale_temp_files`).
    """
    if not cache_dir:
        raise DataError("data.cache=persistent needs data.cache_dir (a folder on fast local disk)")
    folder = Path(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"data.cache_dir {folder}: cannot create ({exc.strerror or exc})") from None
    sweep_stale_temp_files(folder)
    stamped = [{**case, "_stamp": f"{key}|{_stamp(case)}"} for case in cases]
    return MappedPersistentDataset(stamped, transform, cache_dir=folder)


class MappedPersistentDataset(PersistentDataset):
    """MONAI ``PersistentDataset`` that memory-maps a cache hit (``torch.load(mmap=True)``) instead of reading it whole,
    loads only tensors and plain containers (``weights_only=True``: an entry planted in the cache runs no code), and
    writes entries crash-safely.

    The random crops that follow then copy only the voxels they cover, from the page cache, and no whole-volume
    buffer is allocated per read: 1.2-1.7x (UKB) and 2.6x (BraTS) warm crops/s per worker, same values (benchmarks/RESULTS.md).
    An entry is written through :func:`bsf.io.atomic_torch_save` (temporary file beside it, fsync, rename; MONAI's own
    path moves it from the system temp folder, a copy when that is another disk), so a crash never leaves a
    half-written entry. An entry that fails to load anyway (cut short by a full disk, damaged, or not a
    tensors-only file) is removed with a warning naming it, and recomputed.
    """

    def _entry(self, item_transformed: Case) -> Path:
        """The cache file of an item: MONAI's name (hash of the item + hash of the transforms)."""
        return self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"

    def _cachecheck(self, item_transformed: Case) -> Any:
        entry = self._entry(item_transformed)
        if entry.is_file():
            cached = _load_entry(entry)
            if cached is not None:
                return cached
        volume = self._pre_transform(deepcopy(item_transformed))  # keep the original: it was hashed
        try:
            atomic_torch_save(convert_to_tensor(volume, convert_numeric=False, track_meta=self.track_meta), entry)
        except OSError as exc:  # a full or read-only cache disk costs the speed-up, not the run
            log.warning("persistent cache entry %s cannot be written (%s); going on without it", entry, exc.strerror or exc)
        return volume


def _load_entry(entry: Path) -> Any:
    """The content of cache file ``entry``, memory-mapped, tensors and plain containers only; None (and the file
    removed, with a warning) when it cannot be loaded so."""
    try:
        return torch.load(entry, weights_only=True, mmap=True)
    except PermissionError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated zip, bad magic, unpickling refused: all mean "recompute"
        log.warning("persistent cache entry %s cannot be loaded (%s: %s); removing it and recomputing", entry, type(exc).__name__, exc)
        entry.unlink(missing_ok=True)
        return None


def _stamp(case: Case) -> str:
    parts = []
    files = case["image"] if isinstance(case["image"], list) else [case["image"]]
    for name in [*files, *([case["label"]] if case.get("label") else [])]:
        try:
            st = os.stat(name)
            parts.append(f"{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            parts.append("?")
    return ",".join(parts)


class SampleStream(torch.utils.data.Dataset):
    """Maps a global sample id to the random crops of one case.

    ``self[s]`` -> list of ``{"image": (C, *roi)[, "label": (K, *roi)]}`` dicts from ``random_transform``
    (which must return a list, e.g. ``RandSpatialCropSamplesd`` first), reproducible from ``(seed, s)``.
    """

    def __init__(self, cases: list[Case], cfg: DataConfig, seed: int, random_transform: Compose, label_transform: Transform | None = None):
        self.seed = seed
        self.n_cases = len(cases)
        base = deterministic_transforms(cfg, label_transform)
        try:
            if cfg.cache == "memory":
                self.volumes: Dataset = CacheDataset(cases, base, cache_rate=1.0, num_workers=max(cfg.num_workers, 1), progress=False)
            elif cfg.cache == "persistent":
                self.volumes = persistent_dataset(cases, base, cfg.cache_dir, preprocessing_key(cfg, label_transform))
            else:
                self.volumes = Dataset(cases, base)
        except RuntimeError as exc:
            raise as_data_error(exc) from None
        self.random_transform = random_transform

    def case_index(self, sample_id: int) -> int:
        epoch, position = divmod(sample_id, self.n_cases)
        return int(np.random.default_rng([self.seed, epoch]).permutation(self.n_cases)[position])

    def __len__(self) -> int:  # the stream is endless; this is one epoch
        return self.n_cases

    def __getitem__(self, sample_id: int) -> list[dict[str, torch.Tensor]]:
        try:
            volume = self.volumes[self.case_index(sample_id)]
        except RuntimeError as exc:
            raise as_data_error(exc) from None
        self.random_transform.set_random_state(seed=seed_for(self.seed, sample_id))
        keys = [k for k in ("image", "label") if k in volume]
        return [{k: crop[k] for k in keys} for crop in self.random_transform(volume)]


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


def validation_volumes(
    cases: list[Case], cfg: DataConfig, label_transform: Transform | None = None, channels: Sequence[str] = ()
) -> list[Case]:
    """Each validation case preprocessed like training data, uncropped: ``{"image": (C, X, Y, Z)[, "label"]}``;
    with the model's ``channels`` (by modality name), the modalities it does not hold as empty channels."""
    transform = deterministic_transforms(cfg, label_transform)
    layout = model_channels(cfg, channels)
    try:
        volumes = [transform(case) for case in cases]
    except RuntimeError as exc:
        raise as_data_error(exc) from None
    return volumes if layout is None else [layout(volume) for volume in volumes]


def validation_crops(cases: list[Case], cfg: DataConfig, channels: Sequence[str] = ()) -> list[torch.Tensor]:
    """One centre crop per validation case, loaded once: list of (C, *roi) tensors (C: the model's ``channels``)."""
    crop = CenterSpatialCropd(keys="image", roi_size=list(cfg.roi))
    return [crop(volume)["image"] for volume in validation_volumes(cases, cfg, channels=channels)]
