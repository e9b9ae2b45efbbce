"""Prediction with a fine-tuned (Stage 3) model: load it without guessing its config, segment one case, write a label map.

The route from input files to a label map in the input's own grid::

    NIfTI files (model's modality order) --deterministic training transforms (data.transforms), no label-->
        by default orientation RAS -> crop to the brain -> z-score (brain, per channel) -> pad to the ROI
    --sliding-window inference (bsf.inference: data.roi, finetune.sw_overlap, Gaussian blending)--> sigmoid probabilities
    --threshold finetune.threshold--> regions (BraTS TC, WT, ET; ATLAS lesion)
    --regions_to_labels--> label map (BraTS 0/1/2/4, or 3 for ET with 2023+ naming; ATLAS 0/1)
    --MONAI inverse of pad, crop and orientation--> the input's shape, written with the input's affine and header.

Crop, pad and reorientation move voxels without interpolation, so the inversion is exact (a ``data.transforms.spacing``
resample is inverted by nearest-neighbour interpolation).

Before any voxel is read, every input's header is checked (:func:`check_headers`: readable NIfTI, 3-D, sane spacing
and affine, not truncated, one grid, real numbers, at most ``max_voxels`` voxels), so a header claiming gigabytes
fails with its file named before memory is committed. Once read, an input whose every voxel is 0 (no brain, as
``bsf data check`` calls it) is refused before inference, naming the file (:func:`check_not_empty`). The output is
checked before the work too (:func:`check_prediction_output`): never one of the inputs nor one of the case's own
files beside them (its label, its other modalities: :func:`case_own_files`), even with ``force``, and an existing
file only with ``force``.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureTyped, InvertibleTransform, Invertd
from torch import nn

from bsf.config import DataConfig, RunConfig, load_config
from bsf.data.check import EMPTY_IMAGE, ERROR, case_header_problems
from bsf.data.pipeline import CheckedLoadd, CompactImaged, as_data_error, deterministic_transforms
from bsf.data.transforms import INTENSITY_ONLY, ModelChannelsd
from bsf.engine.engine import resolve_device
from bsf.engine.stage_model import input_modalities
from bsf.errors import CheckpointError, ConfigError, DataError
from bsf.inference import build_network, segment
from bsf.io import atomic_path
from bsf.model import import_weights, read_checkpoint
from bsf.model.adapt import MODALITY_ALIASES, canonical_modality
from bsf.outputs import check_output_file, reported_write

log = logging.getLogger(__name__)

__all__ = [
    "BRATS_FILE_SUFFIXES",
    "DEFAULT_MAX_VOXELS",
    "CaseInputs",
    "FinetunedModel",
    "Prediction",
    "case_own_files",
    "check_input_paths",
    "check_headers",
    "check_not_empty",
    "check_prediction_output",
    "inference_transforms",
    "load_finetuned",
    "predict_case",
    "predict_to_file",
    "regions_to_labels",
    "resolve_inputs",
    "save_label_map",
]

#: file-name suffixes of each BraTS modality: 2021 naming first, then 2023+ (t2f, t1c, t1n, t2w)
BRATS_FILE_SUFFIXES: dict[str, tuple[str, str]] = {
    "flair": ("flair", "t2f"),
    "t1ce": ("t1ce", "t1c"),
    "t1": ("t1", "t1n"),
    "t2": ("t2", "t2w"),
}
NIFTI_EXTENSIONS = (".nii.gz", ".nii")
ATLAS_T1W = "_T1w"
#: how the name (before .nii/.nii.gz, after a "_" or "-") of a case's own file ends: a BraTS modality (2021 and 2023+
#: names), the ATLAS T1w, or a label (BraTS ``_seg``, ATLAS ``_label-L_desc-T1lesion_mask``, ``_label``)
CASE_FILE_ENDINGS = (*(name for names in BRATS_FILE_SUFFIXES.values() for name in names), "t1w", "seg", "mask", "label", "labels")
#: where :func:`load_finetuned` looks, beside the model file, for the config of a weights-only checkpoint
CONFIG_NEIGHBOURS = ("checkpoint_last.pt", "summary.json", "config/bsf_run.yaml")
#: most voxels per input file a reader accepts (``--max-voxels``): 2**26 = 67 million, e.g. 406^3, 7.5 times a BraTS
#: volume (240 x 240 x 155); one float32 channel of it takes 256 MiB, and inference holds a few copies per channel
DEFAULT_MAX_VOXELS = 2**26
#: NumPy dtype kinds of voxels a reader accepts: integers and real floats (no complex, RGB or other records)
VOXEL_KINDS = "iuf"


# ------------------------------------------------------------------------------------------ model
@dataclass
class FinetunedModel:
    """A fine-tuned SwinUNETR in eval mode, with the config it was trained under."""

    model: nn.Module
    config: RunConfig
    path: Path
    config_source: str  # where the config came from: the checkpoint, a neighbour file, or --config
    device: torch.device

    @property
    def dataset(self) -> str:
        return self.config.data.dataset

    @property
    def modalities(self) -> list[str]:
        """The model's input channels by modality name, in order."""
        return input_modalities(self.config)

    def et_label(self, brats2023_names: bool = False) -> int:
        """Label written for enhancing tumour: 3 with ``finetune.label_format=brats2023``, or ``auto`` and 2023+ file names; else 4."""
        fmt = self.config.finetune.label_format
        return 3 if fmt == "brats2023" or (fmt == "auto" and brats2023_names) else 4


def _neighbour_config(path: Path) -> tuple[Any, str] | None:
    """The training config stored beside a weights-only checkpoint (see :data:`CONFIG_NEIGHBOURS`)."""
    import json

    for name in CONFIG_NEIGHBOURS:
        candidate = path.parent / name
        if not candidate.is_file() or candidate.resolve() == path.resolve():
            continue
        if candidate.suffix == ".pt":
            state = read_checkpoint(candidate, "config checkpoint")
            if isinstance(state, Mapping) and isinstance(state.get("config"), Mapping):
                return dict(state["config"]), str(candidate)
        elif candidate.suffix == ".json":
            try:
                summary = json.loads(candidate.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{candidate}: cannot read its config ({exc})") from None
            if isinstance(summary, Mapping) and isinstance(summary.get("config"), Mapping):
                return dict(summary["config"]), str(candidate)
        else:
            return candidate, str(candidate)
    return None


def load_finetuned(
    model_path: str | os.PathLike,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    *,
    device: str | torch.device = "cpu",
) -> FinetunedModel:
    """Load a fine-tuned model and the config that describes it; its weights are loaded strictly.

    Args:
        model_path: ``checkpoint_last.pt`` (carries its ``"config"``), ``checkpoint_best.pt`` or an NVFlare
            ``FL_global_model.pt`` / ``best_FL_global_model.pt`` (``{"model": state_dict}``), or any layout
            :func:`bsf.model.import_weights` reads.
        config: a YAML path, preset name or mapping; ``None`` takes the checkpoint's own ``"config"``, else the one
            stored beside it: ``checkpoint_last.pt``, ``summary.json`` (a ``bsf train`` output folder), or
            ``config/bsf_run.yaml`` (an NVFlare ``app_server`` folder).
        overrides: ``section.key=value`` strings applied on top (e.g. ``finetune.threshold=0.4``).
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device``.

    Raises:
        CheckpointError: the file is missing/unreadable, no config can be found, or a weight key or shape differs
            from the model the config builds (every unmatched key is listed).
        ConfigError: the config is not a fine-tuning (``stage: finetune``) config.
    """
    path = Path(model_path)
    if not path.is_file():
        raise CheckpointError(f"model {path}: no such file")
    state = read_checkpoint(path, "model")
    if config is not None:
        source: Any = config
        origin = str(config) if not isinstance(config, Mapping) else "the given config"
    elif isinstance(state, Mapping) and isinstance(state.get("config"), Mapping):
        source, origin = dict(state["config"]), str(path)
    else:
        found = _neighbour_config(path)
        if found is None:
            raise CheckpointError(
                f"model {path}: carries no config and none lies beside it ({', '.join(CONFIG_NEIGHBOURS)}); "
                "pass the training config with --config (and key=value overrides)"
            )
        source, origin = found
    run_config = load_config(source, overrides)
    if run_config.stage != "finetune":
        raise ConfigError(
            f"model {path}: its config ({origin}) is a stage {run_config.stage!r} model; "
            "predict/evaluate/bundle need a fine-tuned segmentation model (stage: finetune)"
        )
    expected = {"brats": 3, "atlas": 1}.get(run_config.data.dataset)
    if expected is not None and run_config.model.out_channels != expected:
        raise ConfigError(f"model.out_channels={run_config.model.out_channels} but a {run_config.data.dataset} model has {expected}")
    network = build_network(run_config)
    try:
        import_weights(network, state, scope="all", strict=True)
    except CheckpointError as exc:
        raise CheckpointError(f"model {path} does not match the config from {origin}: {exc}") from None
    target = device if isinstance(device, torch.device) else resolve_device(device)
    network.to(target).eval()
    log.info("loaded %s (config from %s, %s %s -> %d outputs) on %s", path, origin, run_config.data.dataset,
             input_modalities(run_config), run_config.model.out_channels, target)
    return FinetunedModel(network, run_config, path, origin, target)


# ----------------------------------------------------------------------------------------- inputs
@dataclass
class CaseInputs:
    """One case's image files: in the model's channel order, or named (``modalities``), a subset of the model's channels."""

    files: list[Path]
    brats2023_names: bool = False  # found through the 2023+ names (t2f, t1c, t1n, t2w)
    modalities: list[str] | None = None  # the modality of each file (given as name=path); None: the model's channels


def _named_input(item: str | os.PathLike) -> tuple[str, Path] | None:
    """``"t1=/x/a.nii.gz"`` -> ``("t1", Path("/x/a.nii.gz"))`` (canonical name); None for a plain path (also one with
    a ``=`` in it that exists as it is)."""
    text = os.fspath(item)
    name, sep, path = text.partition("=")
    if not sep or Path(text).exists() or name.strip().lower().replace("-", "_") not in MODALITY_ALIASES:
        return None
    return canonical_modality(name), Path(path)


def _named_inputs(inputs: Sequence[str | os.PathLike], config: RunConfig) -> CaseInputs:
    """Inputs given as ``modality=path``: each a model channel, none twice; the channels not given stay empty."""
    named = [_named_input(item) for item in inputs]
    if any(entry is None for entry in named):
        plain = [os.fspath(item) for item, entry in zip(inputs, named) if entry is None]
        raise DataError(f"inputs mix modality=path with plain paths ({', '.join(plain)}); name every file, e.g. t1=case_t1.nii.gz")
    channels = input_modalities(config)
    names = [name for name, _ in named]
    foreign = [name for name in names if name not in channels]
    if foreign:
        raise DataError(f"input modalities {foreign}: the model's channels are {', '.join(channels)}")
    if len(set(names)) != len(names):
        raise DataError(f"input modalities {names}: a modality is given twice")
    for _, path in named:
        if not path.is_file() or not _is_nifti(path):
            raise DataError(f"input file {path}: {'no such file' if not path.exists() else 'not a NIfTI file (.nii or .nii.gz)'}")
    return CaseInputs([path for _, path in named], modalities=names)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_EXTENSIONS)


def _stem(path: Path) -> str:
    name = path.name
    for ext in NIFTI_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _modality_matches(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _is_nifti(p) and _stem(p).lower().endswith((f"_{suffix}", f"-{suffix}")))


def _brats_folder(folder: Path, modalities: Sequence[str]) -> CaseInputs:
    files, used_2023 = [], False
    for modality in modalities:
        if modality not in BRATS_FILE_SUFFIXES:
            raise ConfigError(f"modality {modality!r} is not a BraTS modality ({', '.join(BRATS_FILE_SUFFIXES)})")
        found: list[Path] = []
        for i, suffix in enumerate(BRATS_FILE_SUFFIXES[modality]):
            matches = _modality_matches(folder, suffix)
            if len(matches) > 1:
                raise DataError(f"case folder {folder}: {len(matches)} {modality} images ({', '.join(m.name for m in matches)}); give the files explicitly")
            if matches:
                found, used_2023 = matches, used_2023 or i == 1
                break
        if not found:
            names = " or ".join(f"*_{s}.nii.gz / *-{s}.nii.gz" for s in BRATS_FILE_SUFFIXES[modality])
            raise DataError(f"case folder {folder}: no {modality} image ({names})")
        files.append(found[0])
    return CaseInputs(files, used_2023)


def _atlas_folder(folder: Path) -> CaseInputs:
    found = sorted(p for p in folder.rglob(f"*{ATLAS_T1W}.nii*") if _is_nifti(p))
    if len(found) != 1:
        what = "no" if not found else f"{len(found)}"
        raise DataError(f"case folder {folder}: {what} T1w image(s) (*{ATLAS_T1W}.nii.gz){'' if not found else '; give the file explicitly'}")
    return CaseInputs(found)


def _plain_path(item: str | os.PathLike) -> Path:
    named = _named_input(item)
    return named[1] if named is not None else Path(item)


def case_own_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The case's own NIfTI files around ``inputs`` that a prediction never replaces: below an input folder, and
    beside an input file, each file whose name ends in ``_X`` or ``-X`` with ``X`` one of :data:`CASE_FILE_ENDINGS`
    (its label, its other modalities; another name, e.g. an earlier ``_pred.nii.gz``, is not one)."""
    endings = tuple(f"{sep}{name}" for name in CASE_FILE_ENDINGS for sep in "_-")
    found: list[Path] = []
    for path in map(_plain_path, inputs):
        candidates = path.rglob("*.nii*") if path.is_dir() else path.parent.glob("*.nii*") if path.is_file() else []
        found += [p for p in candidates if _is_nifti(p) and _stem(p).lower().endswith(endings) and p.is_file()]
    return found


def check_prediction_output(
    output: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, case: CaseInputs | None = None, force: bool = False
) -> Path:
    """``output`` as the label map to write for the case ``inputs`` (and its resolved ``case``), before any work.

    Raises:
        DataError: ``output`` does not end in ``.nii.gz`` or ``.nii``.
        OutputError: ``output`` is one of the inputs or one of the case's own files (:func:`case_own_files`), even with
            ``force``; a folder; an existing file without ``force``; or in a folder that cannot be created.
    """
    output = Path(output)
    if not output.name.lower().endswith(NIFTI_EXTENSIONS):
        raise DataError(f"output {output}: must end in .nii.gz or .nii")
    given = [*(case.files if case is not None else []), *map(_plain_path, inputs)]
    return check_output_file(output, inputs=given, keep=case_own_files(given), force=force)


def check_input_paths(inputs: Sequence[str | os.PathLike]) -> None:
    """DataError naming the first input path (plain, or of a ``modality=path``) that does not exist (checked before a
    model is loaded)."""
    if not inputs:
        raise DataError("no input: give a case folder or NIfTI files")
    for item in inputs:
        named = _named_input(item)
        path = named[1] if named is not None else Path(item)
        if not path.exists():
            raise DataError(f"input {'file' if _is_nifti(path) else 'file or folder'} {path}: no such file")


def resolve_inputs(inputs: Sequence[str | os.PathLike], config: RunConfig) -> CaseInputs:
    """The image files of one case, in the model's modality order.

    ``inputs`` is one case folder (BraTS: the four modalities found by their suffix, 2021 ``_flair``, ``_t1ce``,
    ``_t1``, ``_t2`` or 2023+ ``-t2f``, ``-t1c``, ``-t1n``, ``-t2w``; ATLAS: the one ``*_T1w.nii.gz`` below it),
    or NIfTI files already in the model's order (``model.modalities``, else ``data.modalities``, else the data set's
    full set), or named files ``modality=path`` (e.g. ``t1=a.nii.gz flair=b.nii.gz``), any subset of the model's
    channels: the others are fed as empty channels, the path a model trained with modality dropout knows.

    Raises:
        DataError: a missing file (named), a folder without a modality, or the wrong number of files.
    """
    if inputs and any(_named_input(item) is not None for item in inputs):
        return _named_inputs(inputs, config)
    paths = [Path(p) for p in inputs]
    modalities = input_modalities(config)
    if not paths:
        raise DataError(f"no input: give a case folder or {len(modalities)} NIfTI file(s) ({', '.join(modalities)})")
    if len(paths) == 1 and paths[0].is_dir():
        return _atlas_folder(paths[0]) if config.data.dataset == "atlas" else _brats_folder(paths[0], modalities)
    for path in paths:
        if path.is_dir():
            raise DataError(f"input {path}: is a folder; give one case folder alone, or NIfTI files")
        if not path.exists():
            raise DataError(f"input file {path}: no such file")
        if not _is_nifti(path):
            raise DataError(f"input file {path}: not a NIfTI file (.nii or .nii.gz)")
    if len(paths) != len(modalities):
        raise DataError(
            f"the model takes {len(modalities)} image(s) in the order {', '.join(modalities)}; got {len(paths)}: "
            + ", ".join(str(p) for p in paths)
        )
    brats2023 = config.data.dataset == "brats" and all(
        _stem(p).lower().endswith((f"-{BRATS_FILE_SUFFIXES[m][1]}", f"_{BRATS_FILE_SUFFIXES[m][1]}")) for p, m in zip(paths, modalities)
    )
    return CaseInputs(paths, brats2023)


def check_headers(
    files: Sequence[Path], label: Path | None = None, *, max_voxels: int = DEFAULT_MAX_VOXELS, case: str | None = None
) -> nib.spatialimages.SpatialImage:
    """Check one case's headers before any voxel is read; returns the first file's image (header only, lazy).

    The header checks of ``bsf data check`` (:func:`bsf.data.check.case_header_problems`: readable NIfTI, 3-D,
    positive spacing, a regular affine, not truncated, one grid for all files including ``label``), then per file
    a voxel count of at most ``max_voxels`` and integer or real-float voxels. Warnings are logged.

    Raises:
        DataError: naming the case (when given), each failing file and its problem.
    """
    entries = {"image": [str(f) for f in files], **({"label": str(label)} if label is not None else {})}
    problems = case_header_problems(entries)
    for problem in problems:
        if problem.severity != ERROR:
            log.warning("%s: %s", problem.file, problem.problem)
    errors = [f"{_role(p.file, label)} {p.file}: {p.problem}" for p in problems if p.severity == ERROR]
    images = {} if errors else {path: nib.load(path) for path in [*files, *([label] if label is not None else [])]}
    for path, image in images.items():
        errors += _size_problems(path, image, label, max_voxels)
    if errors:
        raise DataError((f"case {case}: " if case else "") + "; ".join(errors))
    return images[files[0]]


def _role(path: str | Path, label: Path | None) -> str:
    return "label file" if label is not None and str(path) == str(label) else "input file"


def _size_problems(path: Path, image: nib.spatialimages.SpatialImage, label: Path | None, max_voxels: int) -> list[str]:
    """What the header of ``path`` claims that a reader should not allocate: too many voxels, or non-real voxels."""
    found = []
    voxels = math.prod(int(n) for n in image.shape)
    if voxels > max_voxels:
        found.append(f"{_role(path, label)} {path}: its header claims {image.shape} = {voxels:,} voxels, more than the "
                     f"limit of {max_voxels:,} (--max-voxels)")
    dtype = image.get_data_dtype()
    if dtype.kind not in VOXEL_KINDS:
        found.append(f"{_role(path, label)} {path}: holds {dtype} voxels; expected integers or real floats")
    return found


# -------------------------------------------------------------------------------------- inference
def inference_transforms(data: DataConfig) -> Compose:
    """The training pipeline's deterministic transforms (:func:`bsf.data.pipeline.deterministic_transforms`, no label)
    minus its final tensor conversions, so that each spatial step stays recorded and can be inverted."""
    kept = []
    for transform in deterministic_transforms(data).transforms:
        if isinstance(transform, (EnsureTyped, CompactImaged)):
            continue
        if not isinstance(transform, (CheckedLoadd, InvertibleTransform, *INTENSITY_ONLY)):
            # a new step in the training pipeline must be invertible (or intensity-only) for predictions to map back
            raise TypeError(f"cannot invert the training transform {type(transform).__name__} for prediction")
        kept.append(transform)
    return Compose(kept)


def regions_to_labels(regions: np.ndarray | torch.Tensor, et_label: int = 4) -> np.ndarray:
    """Binary regions -> label map (uint8).

    BraTS ``(3, X, Y, Z)`` in the order TC, WT, ET: ET -> ``et_label`` (4, or 3 for 2023+), TC minus ET -> 1,
    WT minus TC -> 2, else 0. ATLAS ``(1, X, Y, Z)``: the lesion mask as 0/1.
    """
    r = regions.detach().cpu().numpy() if isinstance(regions, torch.Tensor) else np.asarray(regions)
    r = r.astype(bool)
    if r.ndim != 4 or r.shape[0] not in (1, 3):
        raise ValueError(f"regions must have shape (3, X, Y, Z) (TC, WT, ET) or (1, X, Y, Z); got {r.shape}")
    if r.shape[0] == 1:
        return r[0].astype(np.uint8)
    tc, wt, et = r
    labels = np.zeros(r.shape[1:], dtype=np.uint8)
    labels[wt] = 2
    labels[tc] = 1
    labels[et] = et_label
    return labels


@dataclass
class Prediction:
    """A case's label map in the input's grid (shape and affine of ``reference``)."""

    labels: np.ndarray  # uint8 (X, Y, Z)
    reference: nib.spatialimages.SpatialImage  # the first input file (header and affine of the output)
    et_label: int


def predict_case(
    finetuned: FinetunedModel,
    inputs: CaseInputs | Sequence[str | os.PathLike],
    *,
    progress: bool = False,
    et_label: int | None = None,
    model: nn.Module | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    case_name: str | None = None,
) -> Prediction:
    """Segment one case (see the module docstring). ``model`` replaces ``finetuned.model`` (tests); ``case_name``
    starts the message of a DataError (``bsf evaluate``: the case id).

    Raises:
        DataError: a header fails :func:`check_headers`, a file cannot be read, or an input is empty
            (:func:`check_not_empty`: no brain to segment).
    """
    case = inputs if isinstance(inputs, CaseInputs) else resolve_inputs(inputs, finetuned.config)
    reference = check_headers(case.files, max_voxels=max_voxels, case=case_name)
    config = finetuned.config
    transform = inference_transforms(config.data)
    loaded = 1 + next(i for i, t in enumerate(transform.transforms) if isinstance(t, CheckedLoadd))
    image_entry: str | list[str] = [str(f) for f in case.files] if len(case.files) > 1 else str(case.files[0])
    try:
        data = transform({"image": image_entry}, end=loaded)  # the voxels as read, before any step moves them
        check_not_empty(data["image"], case, finetuned.modalities, case_name=case_name)
        data = transform(data, start=loaded)
    except RuntimeError as exc:
        raise as_data_error(exc) from None
    image = data["image"]
    if image.shape[0] != len(case.files):
        raise DataError(f"{case.files[0]}: {image.shape[0]} channel(s) loaded from {len(case.files)} file(s); give 3-D images")
    network_input = image.as_tensor()
    if case.modalities is not None and case.modalities != finetuned.modalities:
        layout = ModelChannelsd(case.modalities, finetuned.modalities)
        if layout.missing():
            log.warning("missing modalities %s: fed as empty channels (the model's channels: %s)",
                        ", ".join(layout.missing()), ", ".join(finetuned.modalities))
        network_input = layout.expand(network_input)
    if network_input.shape[0] != config.model.in_channels:
        raise DataError(f"{case.files[0]}: {network_input.shape[0]} channel(s) loaded; the model takes {config.model.in_channels}")
    network = model if model is not None else finetuned.model
    regions = segment(network, network_input[None].to(finetuned.device), config, progress=progress)[0].cpu()
    et = et_label if et_label is not None else finetuned.et_label(case.brats2023_names)
    labels = regions_to_labels(regions, et)
    pred = MetaTensor(torch.from_numpy(labels[None].astype(np.float32)), meta=dict(image.meta))
    inverted = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=True)({"image": image, "pred": pred})["pred"]
    out = np.rint(np.asarray(inverted.detach().cpu())[0]).astype(np.uint8)
    if out.shape != tuple(reference.shape[:3]):
        raise RuntimeError(f"inverted prediction has shape {out.shape}, input {case.files[0]} has {reference.shape[:3]}")
    return Prediction(out, reference, et)


def check_not_empty(image: torch.Tensor, case: CaseInputs, modalities: Sequence[str] = (), *, case_name: str | None = None) -> None:
    """DataError naming each input file of ``case`` whose voxels (``image``, channels first, as read: one channel
    per file) are all 0: no brain, nothing to segment (a prediction would only show what the model makes of
    nothing). The same notion and words as ``bsf data check`` (:data:`EMPTY_IMAGE`).

    When only some of several inputs are empty the message says which, and how to predict without them: name the
    others (``modality=path``); the model then takes the left-out channels as missing (:class:`CaseInputs`).
    ``modalities``: the model's channels, naming each file's modality when the files come in its order.
    """
    flat = image.reshape(image.shape[0], -1)
    if flat.shape[0] != len(case.files):  # not one channel per file: judge the whole case
        holds = [bool(flat.any())] * len(case.files)
    else:
        holds = flat.any(dim=1).tolist()
    if all(holds):
        return
    names = case.modalities or list(modalities)
    if len(names) != len(case.files):
        names = [""] * len(case.files)
    empty = [f"{path} ({name})" if name else str(path) for path, name, held in zip(case.files, names, holds) if not held]
    plural = len(empty) > 1
    if case_name:  # bsf evaluate: a datalist's case
        hint = "; `bsf data check` finds such cases and --write-clean writes a datalist without them"
    elif any(holds) and all(names):
        others = " ".join(f"{name}={path}" for path, name, held in zip(case.files, names, holds) if held)
        hint = (f", while the other input(s) hold voxels; to predict without {'them' if plural else 'it'}, "
                f"give only the others: --input {others}")
    else:
        hint = ""
    prefix = f"case {case_name}: " if case_name else ""
    raise DataError(f"{prefix}input file{'s' if plural else ''} {', '.join(empty)}: {EMPTY_IMAGE}{hint}")


def save_label_map(labels: np.ndarray, reference: nib.spatialimages.SpatialImage, path: str | os.PathLike) -> Path:
    """Write ``labels`` (uint8, the reference's grid) as NIfTI with the reference's affine and header, atomically."""
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_EXTENSIONS):
        raise DataError(f"output {path}: must end in .nii.gz or .nii")
    if labels.shape != tuple(reference.shape[:3]):
        raise DataError(f"label map shape {labels.shape} differs from the reference grid {reference.shape[:3]}")
    header = reference.header.copy() if isinstance(reference, nib.Nifti1Image) else None
    image = nib.Nifti1Image(np.ascontiguousarray(labels, dtype=np.uint8), reference.affine, header)
    image.set_data_dtype(np.uint8)
    image.header.set_slope_inter(1.0, 0.0)
    if isinstance(reference, nib.Nifti1Image):
        image.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]))
        image.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]))
    payload = image.to_bytes()
    if path.name.lower().endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    with reported_write(path), atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return path


def predict_to_file(
    finetuned: FinetunedModel,
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    progress: bool = True,
    force: bool = False,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Prediction:
    """``bsf predict``: resolve the inputs, segment, write the label map to ``output`` (atomically).

    ``output`` is checked before the work (:func:`check_prediction_output`): it must end in ``.nii.gz`` or
    ``.nii``, must not be one of the inputs nor of the case's own files (its label, its other images; refused even
    with ``force``), and an existing file is replaced only with ``force`` (``bsf predict --force``).

    Raises:
        OutputError: the output cannot be written safely (see above), or writing it failed.
        DataError: an input is missing or its header fails :func:`check_headers`.
    """
    case = resolve_inputs(inputs, finetuned.config)
    output = check_prediction_output(output, inputs, case=case, force=force)
    for modality, path in zip(case.modalities or finetuned.modalities, case.files):
        log.info("input %s: %s", modality, path)
    prediction = predict_case(finetuned, case, progress=progress, max_voxels=max_voxels)
    save_label_map(prediction.labels, prediction.reference, output)
    return prediction


def label_counts(labels: np.ndarray) -> dict[int, int]:
    """Voxels per label value present."""
    values, counts = np.unique(labels, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}
