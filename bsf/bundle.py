"""``bsf bundle export``: a fine-tuned model as a MONAI bundle that MONAI alone can run (no ``bsf`` needed).

Layout written::

    DIR/configs/metadata.json    MONAI bundle metadata: versions, input channels, output labels, the bsf config
    DIR/configs/inference.json   SwinUNETR + the training preprocessing + sliding-window inference + label map
    DIR/models/model.pt          the network's state_dict (MONAI SwinUNETR keys)
    DIR/docs/README.md           how to run it

``inference.json`` reproduces ``bsf predict``: LoadImaged -> the training preprocessing of ``data.transforms`` (by default
Orientationd RAS -> CropForegroundd -> NormalizeIntensityd (brain, per channel)) -> SpatialPadd(roi); SlidingWindowInferer (roi, overlap, Gaussian); sigmoid,
threshold, regions -> labels (BraTS 1/2/4 or 3, ATLAS 0/1); Invertd back to the input's grid; SaveImaged with
the input's affine. The windows and threshold are :class:`bsf.inference.WindowSettings` of the model's config, the
ones ``bsf predict`` and validation use. It needs no pytorch-ignite: ``run`` is a plain loop over the dataset.

A folder that already holds files is refused unless ``force`` (``bsf bundle export --force``), which replaces the
four files above and leaves any others; the model file itself is never overwritten. Run the bundle with::

    python -c "from monai.bundle import run; run(config_file='DIR/configs/inference.json', \
        meta_file='DIR/configs/metadata.json', bundle_root='DIR', image=['flair.nii.gz', ...], output_dir='out')"
    python -m monai.bundle run --config_file DIR/configs/inference.json --bundle_root DIR ...   # needs `pip install fire`
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

import monai
import nibabel
import numpy as np
import torch

from bsf.data.transforms import preprocessing_steps
from bsf.inference import WindowSettings
from bsf.io import atomic_path, atomic_torch_save, atomic_write_json
from bsf.model import get_size
from bsf.outputs import check_output_file, check_output_folder, reported_write
from bsf.predict import FinetunedModel

log = logging.getLogger(__name__)

__all__ = ["export_bundle", "inference_config", "metadata"]

BUNDLE_VERSION = "0.1.0"
METADATA_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
_CHANNEL_NAMES = {"flair": "FLAIR", "t1ce": "T1ce (T1 + gadolinium)", "t1": "T1", "t2": "T2", "t1w": "T1w"}


def _postprocess_expression(finetuned: FinetunedModel) -> str:
    """The Lambdad function turning thresholded regions (K, X, Y, Z) into a label map (1, X, Y, Z)."""
    if finetuned.dataset == "brats":
        et = finetuned.et_label()
        # ET -> et; else TC -> 1; else WT -> 2; else 0 (same as bsf.predict.regions_to_labels)
        return (
            f"$lambda x: torch.where(x[2:3] > 0, {et}.0, torch.where(x[0:1] > 0, 1.0, "
            "torch.where(x[1:2] > 0, 2.0, 0.0)))"
        )
    return "$lambda x: (x[0:1] > 0).float()"


def inference_config(finetuned: FinetunedModel) -> dict[str, Any]:
    """The content of ``configs/inference.json`` for ``finetuned``."""
    config = finetuned.config
    m = config.model
    size = get_size(m.size)
    windows = WindowSettings.from_config(config)
    return {
        "imports": ["$import glob", "$import os", "$import numpy as np", "$import torch", "$import monai"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": ".",
        "data_list_file_path": "$@bundle_root + '/datalist.json'",
        "data_list_key": "testing",
        "image": None,
        "datalist": (
            "$[{'image': @image}] if @image else "
            "monai.data.load_decathlon_datalist(@data_list_file_path, True, @data_list_key, @dataset_dir)"
        ),
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {
            "_target_": "monai.networks.nets.SwinUNETR",
            "in_channels": m.in_channels,
            "out_channels": m.out_channels,
            "feature_size": size.feature_size,
            "depths": list(size.depths),
            "num_heads": list(size.num_heads),
            "window_size": size.window_size,
            "drop_rate": float(m.dropout),
            "spatial_dims": 3,
            "use_v2": False,
        },
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "load_weights": "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "ensure_channel_first": True, "image_only": True},
                # the training preprocessing (data.transforms), step for step
                *({"_target_": name, **kwargs} for name, kwargs in preprocessing_steps(config.data)),
                {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(windows.roi),
            "sw_batch_size": windows.sw_batch_size,
            "overlap": windows.overlap,
            "mode": windows.mode,
            "progress": True,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": windows.threshold},
                {"_target_": "Lambdad", "keys": "pred", "func": _postprocess_expression(finetuned)},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "output_dtype": "$np.uint8",
                    # after Invertd the affine is the input's own: this "resampling" is the identity, kept exact by nearest
                    "resample": True,
                    "mode": "nearest",
                    "separate_folder": False,
                    "print_log": True,
                },
            ],
        },
        "predict": (
            "$lambda d: @postprocessing({**d, 'pred': @inferer(d['image'][None].to(@device), @network)[0].cpu()})"
        ),
        "initialize": ["$@load_weights", "$@network.eval()", "$torch.set_grad_enabled(False)"],
        "run": ["$[@predict(d) for d in @dataset]"],
        "finalize": ["$torch.set_grad_enabled(True)"],
    }


def metadata(finetuned: FinetunedModel) -> dict[str, Any]:
    """The content of ``configs/metadata.json``."""
    config = finetuned.config
    roi = [int(v) for v in config.data.roi]
    modalities = finetuned.modalities
    if finetuned.dataset == "brats":
        et = finetuned.et_label()
        task = "Brain tumour segmentation (BraTS): TC, WT, ET regions written as a label map"
        labels = {"0": "background", "1": "necrotic / non-enhancing tumour core (TC minus ET)", "2": "oedema (WT minus TC)", str(et): "enhancing tumour (ET)"}
        regions = {"0": "TC (tumour core)", "1": "WT (whole tumour)", "2": "ET (enhancing tumour)"}
    else:
        task = "Stroke lesion segmentation (ATLAS v2.0) from T1w"
        labels = {"0": "background", "1": "lesion"}
        regions = {"0": "lesion"}
    return {
        "schema": METADATA_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by bsf from {finetuned.path.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": nibabel.__version__, "einops": _version("einops")},
        "name": f"BrainSegFounder-FL SwinUNETR ({finetuned.dataset})",
        "task": task,
        "description": (
            "SwinUNETR fine-tuned with BrainSegFounder-FL (Stage 3). Inputs are whole NIfTI volumes in the channel order "
            f"{', '.join(modalities)}; preprocessing, sliding-window inference and the label map match `bsf predict`."
        ),
        "authors": "BrainSegFounder-FL",
        "copyright": "see the project's licence",
        "data_source": "BraTS 2021 / 2023" if finetuned.dataset == "brats" else "ATLAS v2.0",
        "data_type": "nifti",
        "image_classes": f"{len(modalities)} MRI channel(s): {', '.join(modalities)}",
        "label_classes": labels,
        "pred_classes": labels,
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR",
                    "num_channels": len(modalities),
                    "spatial_shape": roi,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {str(i): _CHANNEL_NAMES.get(name, name) for i, name in enumerate(modalities)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": config.model.out_channels,
                    "spatial_shape": roi,
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": regions,
                }
            },
        },
        "bsf": {"source_model": str(finetuned.path), "config_source": finetuned.config_source, "config": config.to_dict(), "python": platform.python_version()},
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


_README = """# {name}

Exported by `bsf bundle export` from `{source}`.

Input: one case as NIfTI files in the channel order **{modalities}** (one grid). Output: a label map in the
input's grid and affine, `<first input name>_seg.nii.gz` in `output_dir` ({labels}).

```bash
# one case (Python API; the same function `python -m monai.bundle run` calls, which needs `pip install fire`)
python -c "from monai.bundle import run; run(config_file='configs/inference.json', meta_file='configs/metadata.json', \\
    bundle_root='.', image={example}, output_dir='eval')"
# a datalist: {{"testing": [{{"image": [...]}}, ...]}} with paths relative to dataset_dir
python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\
    --bundle_root . --data_list_file_path datalist.json --dataset_dir /data
```
"""


#: the files a bundle consists of, relative to its folder
BUNDLE_FILES = ("models/model.pt", "configs/inference.json", "configs/metadata.json", "docs/README.md")


def export_bundle(finetuned: FinetunedModel, out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the bundle for ``finetuned`` into ``out_dir`` (created; each file written atomically).

    Raises:
        OutputError: ``out_dir`` is a file, already holds entries and ``force`` is not set, a bundle file would
            replace the model being exported (or a folder is in its way), or writing failed (named).
    """
    out = check_output_folder(out_dir, what="bundle folder", inputs=[finetuned.path], force=force)
    paths = {name: check_output_file(out / name, what="bundle file", inputs=[finetuned.path], force=True) for name in BUNDLE_FILES}
    state = {k: v.detach().to("cpu", copy=True) for k, v in finetuned.model.state_dict().items()}
    meta = metadata(finetuned)
    with reported_write(out, what="bundle folder"):
        atomic_torch_save(state, paths["models/model.pt"])
        atomic_write_json(inference_config(finetuned), paths["configs/inference.json"])
        atomic_write_json(meta, paths["configs/metadata.json"])
        with atomic_path(paths["docs/README.md"]) as tmp:
            tmp.write_text(_readme(finetuned, meta))
    log.info("wrote MONAI bundle %s (%d tensors)", out, len(state))
    return out


def _readme(finetuned: FinetunedModel, meta: dict[str, Any]) -> str:
    """``docs/README.md``: how to run the bundle on one case or a datalist."""
    modalities = finetuned.modalities
    return _README.format(
        name=meta["name"],
        source=finetuned.path,
        modalities=", ".join(modalities),
        labels=", ".join(f"{k} {v}" for k, v in meta["label_classes"].items()),
        example="[" + ", ".join(f"'{m}.nii.gz'" for m in modalities) + "]",
    )
