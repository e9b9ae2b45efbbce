"""SwinUNETR sizes, the SSL model, and encoder weight import/export (keys ``swinViT.*``)."""

from bsf.model.adapt import (
    AdaptationReport,
    adapt_checkpoint,
    adapt_input_channels,
    canonical_modalities,
    canonical_modality,
    plan_channel_adaptation,
)
from bsf.model.checkpoint import (
    ENCODER_PREFIX,
    ImportReport,
    check_finite,
    export_encoder,
    import_weights,
    normalize_checkpoint_keys,
    read_checkpoint,
    save_encoder,
    select_weights,
)
from bsf.model.shapes import InputShapeError, check_input_shape
from bsf.model.sizes import MODEL_SIZES, ModelSize, build_swin_unetr, count_parameters, get_size
from bsf.model.ssl_model import SSLModel, SSLOutput

__all__ = [
    "AdaptationReport",
    "adapt_checkpoint",
    "adapt_input_channels",
    "canonical_modalities",
    "canonical_modality",
    "plan_channel_adaptation",
    "ENCODER_PREFIX",
    "MODEL_SIZES",
    "ImportReport",
    "InputShapeError",
    "ModelSize",
    "SSLModel",
    "SSLOutput",
    "build_swin_unetr",
    "check_finite",
    "check_input_shape",
    "count_parameters",
    "export_encoder",
    "get_size",
    "import_weights",
    "normalize_checkpoint_keys",
    "read_checkpoint",
    "save_encoder",
    "select_weights",
]
