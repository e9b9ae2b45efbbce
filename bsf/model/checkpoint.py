"""Weight import/export: every foreign checkpoint layout goes through :func:`import_weights`.

This project's state-dict keys are MONAI's: the encoder is ``swinViT.*`` in both
:class:`~bsf.model.ssl_model.SSLModel` and ``SwinUNETR``. :func:`normalize_checkpoint_keys`
maps the known foreign layouts onto them; :func:`import_weights` loads one scope of keys and
reports (or refuses) every key that does not match. Nothing is ever loaded with a silent
``strict=False``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor, nn

from bsf.errors import CheckpointError, ConfigError
from bsf.io import atomic_torch_save
from bsf.model.provenance import META_KEY, ModelDescription

__all__ = [
    "ENCODER_PREFIX",
    "SCOPES",
    "ImportReport",
    "select_weights",
    "normalize_checkpoint_keys",
    "read_checkpoint",
    "check_finite",
    "import_weights",
    "export_encoder",
    "save_encoder",
]

logger = logging.getLogger(__name__)

ENCODER_PREFIX = "swinViT."
SCOPES = ("encoder", "all")

#: A checkpoint file, an already-loaded checkpoint object, or a state dict.
CheckpointSource = Union[str, os.PathLike, Mapping[str, Any]]

# --- The key mapping (see normalize_checkpoint_keys) -------------------------------------
# Wrappers around the state dict: {"state_dict": sd, ...} (MONAI / BrainSegFounder SSL,
# also carrying "epoch", "optimizer", ...) and {"model": sd, ...} (NVFlare PTFileModelPersistor).
_WRAPPER_KEYS = ("state_dict", "model")
# Prefixes added by wrappers: DDP / DataParallel ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Older fine-tuning code named the encoder swin_vit.
_ENCODER_ALIASES = {"swin_vit.": ENCODER_PREFIX}
# Top-level children of MONAI's SwinTransformer: a key starting with one of them is an encoder
# key saved without the "swinViT." prefix (MONAI's model_swinvit.pt, or a bare encoder).
_SWIN_CHILDREN = ("patch_embed.", "pos_drop.") + tuple(
    f"layers{i}{c}." for i in range(1, 5) for c in ("", "c")
)
# model_swinvit.pt was written by an older Swin MLP with fc1/fc2; MONAI names them linear1/2.
_ENCODER_RENAMES = {".mlp.fc1.": ".mlp.linear1.", ".mlp.fc2.": ".mlp.linear2."}


@dataclass
class ImportReport:
    """What :func:`import_weights` did with each key of the imported scope.

    Attributes:
        loaded: keys copied into the model.
        missing: model keys of the scope that the checkpoint lacks.
        unexpected: checkpoint keys in the scope that the model lacks.
        shape_mismatch: ``(key, checkpoint_shape, model_shape)`` for keys present in both.
        ignored: checkpoint keys outside the scope (e.g. SSL heads when importing the encoder).
        scope: the imported scope, ``"encoder"`` or ``"all"``.
        source: the checkpoint path, when the source was a path.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    scope: str = "encoder"
    source: str | None = None

    @property
    def ok(self) -> bool:
        """True when every key of the scope matched in name and shape."""
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def summary(self) -> str:
        """Counts on the first line, then every unmatched key (one category per line)."""
        where = f"{self.source}: " if self.source else ""
        lines = [
            f"{where}scope {self.scope!r}: loaded {len(self.loaded)}, missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}, shape mismatch {len(self.shape_mismatch)}, "
            f"ignored (outside scope) {len(self.ignored)}"
        ]
        if self.missing:
            lines.append("  missing (in the model, not in the checkpoint): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append("  unexpected (in the checkpoint, not in the model): " + ", ".join(self.unexpected))
        if self.shape_mismatch:
            lines.append(
                "  shape mismatch (checkpoint vs model): "
                + ", ".join(f"{k} {tuple(c)} vs {tuple(m)}" for k, c, m in self.shape_mismatch)
            )
        return "\n".join(lines)


def select_weights(state_dict: Mapping[str, Tensor], scope: str) -> dict[str, Tensor]:
    """Keys of one scope: ``"encoder"`` (``swinViT.*`` only) or ``"all"``.

    Raises:
        ConfigError: for any other scope.
    """
    if scope == "encoder":
        return {k: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIX)}
    if scope == "all":
        return dict(state_dict)
    raise ConfigError(f"unknown weight scope {scope!r}; valid scopes: {', '.join(SCOPES)}")


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """Load a ``.pt`` file that a user or another site may have placed, without running code from it.

    ``torch.load(weights_only=True)`` only rebuilds tensors and plain containers (dict, list, tuple, str,
    numbers): a pickle that names any other class or callable is refused, so a planted file cannot
    execute anything. ``what`` names the file's role in the error message (``"model"``, ``"checkpoint"``).

    Raises:
        CheckpointError: missing file, or a file that is damaged or holds anything but tensors and
            plain containers (the message names the file and torch's reason).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{what} {path}: is a folder, not a checkpoint file") from None
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"{what} {path}: cannot be read safely ({type(exc).__name__}: {exc})") from None


def check_finite(state: Mapping[str, Any], origin: str) -> None:
    """Refuse a state dict whose floating tensors hold NaN or Inf, naming ``origin`` and the first bad tensors.

    Args:
        state: key -> tensor or NumPy array (other values are ignored).
        origin: the file (or object) the state came from, for the message.

    Raises:
        CheckpointError: ``"<origin>: tensor <key> holds NaN/Inf (n of m values) ..."``.
    """
    bad: list[str] = []
    for key, value in state.items():
        tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        if not isinstance(tensor, Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad.append(f"{key} ({int((~finite).sum())} of {finite.numel()} values)")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CheckpointError(f"{origin}: weights hold NaN/Inf: tensor {', '.join(bad[:3])}{more}; refusing to use them")


def _unwrap(obj: Any, origin: str) -> Mapping[str, Any]:
    """Peel ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers down to a bare state dict."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{origin}: expected a dict of tensors, got {type(obj).__name__}")
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    raise CheckpointError(f"{origin}: too many nested 'state_dict'/'model' wrappers")


def _to_tensor(key: str, value: Any, origin: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):  # e.g. FLModel params that went through numpy
        return torch.from_numpy(value)
    raise CheckpointError(f"{origin}: entry {key!r} is a {type(value).__name__}, not a tensor")


def _normalize_key(key: str) -> str:
    """Map one foreign key onto this project's layout (see :func:`normalize_checkpoint_keys`)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    for alias, target in _ENCODER_ALIASES.items():
        if key.startswith(alias):
            key = target + key[len(alias) :]
    if key.startswith(_SWIN_CHILDREN):
        key = ENCODER_PREFIX + key
    if key.startswith(ENCODER_PREFIX):
        for old, new in _ENCODER_RENAMES.items():
            key = key.replace(old, new)
    return key


def normalize_checkpoint_keys(obj: CheckpointSource, origin: str | None = None) -> dict[str, Tensor]:
    """Read a checkpoint and return its state dict in this project's key layout.

    ``obj`` is a path (loaded with ``torch.load(weights_only=True, map_location="cpu")``) or an
    already-loaded object (``origin``: the file it came from, named in errors). Wrappers are peeled first: ``{"state_dict": sd, ...}`` and
    ``{"model": sd, ...}`` (NVFlare persistor); a bare state dict is used as is.
    Then each key is mapped::

        (a) public BrainSegFounder / MONAI SSL (SSLHead) checkpoint, with or without DDP:
            module.swinViT.layers1.0.blocks.0.attn.qkv.weight -> swinViT.layers1.0.blocks.0.attn.qkv.weight
            module.rotation_head.weight                       -> rotation_head.weight
            module.conv.0.weight                              -> conv.0.weight
        (b) MONAI model_swinvit.pt (encoder saved without "swinViT."; old MLP names):
            module.patch_embed.proj.weight                    -> swinViT.patch_embed.proj.weight
            module.layers2.0.blocks.1.mlp.fc1.weight          -> swinViT.layers2.0.blocks.1.mlp.linear1.weight
            module.norm.weight                                -> norm.weight (MONAI's encoder has no
                                                                 final-norm parameters: outside the
                                                                 encoder scope, reported as ignored)
        (c) any DDP / torch.compile wrapper prefix, repeated or not:
            module.encoder1.layer.conv1.conv.weight           -> encoder1.layer.conv1.conv.weight
            _orig_mod.swinViT.patch_embed.proj.bias           -> swinViT.patch_embed.proj.bias
        (d) older fine-tuning code's encoder name:
            swin_vit.patch_embed.proj.weight                  -> swinViT.patch_embed.proj.weight

    Keys already in this layout pass unchanged. NumPy arrays become tensors.

    Raises:
        CheckpointError: unreadable file, a non-tensor entry, two keys mapping to the same key, or a
            floating tensor holding NaN/Inf (named, with the file).
    """
    origin = origin or (os.fspath(obj) if isinstance(obj, (str, os.PathLike)) else "checkpoint")
    loaded = read_checkpoint(obj) if isinstance(obj, (str, os.PathLike)) else obj
    state = _unwrap(loaded, origin)
    out: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{origin}: state-dict key {key!r} is not a string")
        new_key = _normalize_key(key)
        if new_key in out:
            raise CheckpointError(f"{origin}: keys {sources[new_key]!r} and {key!r} both map to {new_key!r}")
        out[new_key] = _to_tensor(key, value, origin)
        sources[new_key] = key
    check_finite(out, origin)
    return out


def _compare(
    model_state: Mapping[str, Tensor], ckpt: Mapping[str, Tensor], scope: str, source: str | None
) -> ImportReport:
    model_scope = select_weights(model_state, scope)
    ckpt_scope = select_weights(ckpt, scope)
    report = ImportReport(scope=scope, source=source)
    report.ignored = sorted(k for k in ckpt if k not in ckpt_scope)
    report.missing = sorted(k for k in model_scope if k not in ckpt_scope)
    report.unexpected = sorted(k for k in ckpt_scope if k not in model_scope)
    for key in sorted(k for k in ckpt_scope if k in model_scope):
        c_shape, m_shape = tuple(ckpt_scope[key].shape), tuple(model_scope[key].shape)
        if c_shape == m_shape:
            report.loaded.append(key)
        else:
            report.shape_mismatch.append((key, c_shape, m_shape))
    return report


def import_weights(
    model: nn.Module, source: CheckpointSource, *, scope: str = "encoder", strict: bool = True
) -> ImportReport:
    """Load the ``scope`` keys of a checkpoint into ``model`` and report every key.

    Works for any model with ``swinViT.*`` keys (``SSLModel``, ``SwinUNETR``). Keys outside the
    scope are left untouched in the model. The merged full state is loaded with
    ``load_state_dict(strict=True)``.

    Args:
        model: the model to load into (in place).
        source: checkpoint path, loaded checkpoint or state dict in any layout that
            :func:`normalize_checkpoint_keys` knows.
        scope: ``"encoder"`` (``swinViT.*`` only) or ``"all"``.
        strict: if True, raise unless every scope key matches in name and shape; if False,
            load what matches and log every unmatched key at WARNING.

    Returns:
        The :class:`ImportReport`.

    Raises:
        CheckpointError: (strict) listing every missing, unexpected and mismatched key.
        ConfigError: unknown scope.
    """
    if scope not in SCOPES:
        raise ConfigError(f"unknown weight scope {scope!r}; valid scopes: {', '.join(SCOPES)}")
    source_name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    ckpt = normalize_checkpoint_keys(source)
    model_state = model.state_dict()
    if not select_weights(model_state, scope):
        raise CheckpointError(f"{type(model).__name__} has no weights in scope {scope!r}")
    report = _compare(model_state, ckpt, scope, source_name)

    if not report.ok:
        message = "checkpoint does not match the model\n" + report.summary()
        if not report.loaded and not select_weights(ckpt, scope):
            heads = sorted({k.split(".", 1)[0] for k in ckpt})
            message += f"\n  the checkpoint has no keys in scope {scope!r}; its top-level names: {', '.join(heads)}"
        if strict:
            raise CheckpointError(message)
        logger.warning("importing with strict=False: %s", message)
        for key in report.missing:
            logger.warning("missing in checkpoint, left as is: %s", key)
        for key in report.unexpected:
            logger.warning("not in the model, skipped: %s", key)
        for key, c_shape, m_shape in report.shape_mismatch:
            logger.warning("shape mismatch, skipped: %s checkpoint %s vs model %s", key, c_shape, m_shape)

    merged = dict(model_state)
    merged.update({k: ckpt[k] for k in report.loaded})
    model.load_state_dict(merged, strict=True)
    if report.ignored:
        logger.info("ignored %d checkpoint keys outside scope %r", len(report.ignored), scope)
    logger.info("imported weights: %s", report.summary().splitlines()[0])
    return report


def export_encoder(model: nn.Module) -> dict[str, Tensor]:
    """The encoder weights (``swinViT.*``) as detached CPU clones.

    Raises:
        CheckpointError: the model has no ``swinViT.*`` keys.
    """
    return _encoder_copy(model.state_dict(), type(model).__name__)


def _encoder_copy(state: Mapping[str, Tensor], origin: str) -> dict[str, Tensor]:
    encoder = select_weights(state, "encoder")
    if not encoder:
        raise CheckpointError(f"{origin} has no encoder ({ENCODER_PREFIX}*) weights")
    return {k: v.detach().to("cpu", copy=True) for k, v in encoder.items()}


def save_encoder(
    model_or_state: nn.Module | Mapping[str, Any], path: str | os.PathLike, description: ModelDescription | None = None
) -> Path:
    """Write ``{"state_dict": {swinViT.*: tensor}}`` to ``path`` atomically, with ``description`` under
    :data:`~bsf.model.provenance.META_KEY` when given (the modality of each input channel, the stage kind, the data set).

    Args:
        model_or_state: a model, or a state dict / checkpoint in any layout that
            :func:`normalize_checkpoint_keys` knows.
        path: destination file; its directory is created if needed.
        description: what the next stage needs to adapt the encoder's channels without being told.

    Returns:
        The written path.
    """
    if isinstance(model_or_state, nn.Module):
        encoder = export_encoder(model_or_state)
    else:
        encoder = _encoder_copy(normalize_checkpoint_keys(model_or_state), "state dict")
    saved: dict[str, Any] = {"state_dict": encoder}
    if description is not None:
        saved[META_KEY] = description.to_dict()
    atomic_torch_save(saved, path)
    logger.info("saved %d encoder tensors to %s", len(encoder), path)
    return Path(path)
