"""Input-channel adaptation of a pretrained encoder, by modality name (between stages).

Stage 1 pretrains on UK Biobank with 2 channels ``(t1, flair)``; BraTS needs 4 channels
``(flair, t1ce, t1, t2)`` and ATLAS 1 channel ``(t1,)``. Only the first layer,
``swinViT.patch_embed.proj.weight`` of shape ``(feature_size, C, 2, 2, 2)``, depends on the
number of input channels. :func:`adapt_input_channels` rebuilds its channel axis by name:

* a target modality present in the source receives that source channel's filters, copied
  exactly (pretrained filters are never re-initialised);
* a target modality absent from the source is Kaiming-normal initialised
  (``std = sqrt(2 / fan_in)``, ``fan_in = C_target * 2 * 2 * 2``, i.e. what
  ``nn.init.kaiming_normal_`` gives for the adapted conv), drawn from a ``torch.Generator``
  seeded with ``seed``, so every site and every rerun gets the same weights;
* a source modality absent from the target is dropped (its filters go);
* the bias and every other key pass through untouched.

Consequences the tests check: with the new channels' inputs set to zero the adapted encoder
computes exactly what the source encoder computes on the shared channels (the dropped channels
counting as zero inputs), e.g. BraTS with T1ce = T2 = 0 equals Stage 1 on (T1, FLAIR), and
ATLAS on T1 equals Stage 1 on (T1, FLAIR = 0).

Single-modality mode (one modality fed to several input channels, e.g. target ``("t1", "t1")``,
or ``("t1",) -> ("t1", "t1")`` "by repetition") — the choice made here, ``duplicate="split"``
(default): a source channel copied into ``k`` target channels is copied into each of them scaled
by ``1 / k``. When all ``k`` channels then carry the same image ``x``, the first layer computes
``sum_k (W / k) * x + b = W * x + b``, the source's response to ``x`` in that channel alone (the
other source channels zero). So ``(t1, flair) -> (t1, t1)`` with input ``[T1, T1]`` reproduces
the Stage 1 model on ``[T1, 0]``, which is also what the ATLAS ``(t1,)`` adaptation reproduces:
the representation the encoder starts from does not depend on how many channels carry T1.
Exact copies (``duplicate="copy"``) would instead scale the first-layer response by ``k``
(``k * W * x``, the bias not scaled), an input distribution the pretrained encoder never saw.
The paper's literal reading ("the 2 input channels can both carry it") — keeping the
``(t1, flair)`` embedding unchanged and feeding T1 into the FLAIR slot — is not a by-name
adaptation and is not offered: it applies FLAIR filters to a T1 image.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from bsf.errors import CheckpointError, ConfigError
from bsf.federation.modality import MODALITY_ORDER, PATCH_EMBED_WEIGHT
from bsf.model.checkpoint import normalize_checkpoint_keys, save_encoder, select_weights

__all__ = [
    "PATCH_EMBED_WEIGHT",
    "MODALITY_ALIASES",
    "MODALITY_ORDER",
    "STAGE1_MODALITIES",
    "BRATS_MODALITIES",
    "ATLAS_MODALITIES",
    "AdaptationReport",
    "canonical_modality",
    "canonical_modalities",
    "union_modalities",
    "plan_channel_adaptation",
    "adapt_input_channels",
    "adapt_checkpoint",
]

logger = logging.getLogger(__name__)

#: Accepted spellings (lower case; ``-`` and spaces read as ``_``) -> canonical modality name (one of
#: :data:`MODALITY_ORDER`, the fixed channel order of a modality-aware model; ``PATCH_EMBED_WEIGHT``, the only
#: encoder tensor whose shape depends on the number of input channels, is defined beside it).
MODALITY_ALIASES: dict[str, str] = {
    **dict.fromkeys(("t1", "t1w", "t1n"), "t1"),
    **dict.fromkeys(("flair", "t2_flair", "t2flair", "t2f"), "flair"),
    **dict.fromkeys(("t1ce", "t1c", "t1gd", "t1_ce", "t1_gd"), "t1ce"),
    **dict.fromkeys(("t2", "t2w"), "t2"),
}
#: Channel orders of the three data sets (canonical names).
STAGE1_MODALITIES = ("t1", "flair")
BRATS_MODALITIES = ("flair", "t1ce", "t1", "t2")
ATLAS_MODALITIES = ("t1",)

_DUPLICATE_MODES = ("split", "copy")


def canonical_modality(name: str) -> str:
    """The canonical name (``t1``, ``t1ce``, ``t2``, ``flair``) of one modality spelling.

    Raises:
        ConfigError: an unknown name; the message lists the accepted spellings.
    """
    if not isinstance(name, str):
        raise ConfigError(f"modality names must be strings, got {name!r}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    try:
        return MODALITY_ALIASES[key]
    except KeyError:
        raise ConfigError(f"unknown modality {name!r}; {_valid_names()}") from None


def canonical_modalities(names: Sequence[str], what: str = "modalities") -> tuple[str, ...]:
    """Canonical names of a channel list, reporting every unknown name at once.

    Raises:
        ConfigError: ``names`` is a bare string or empty, or holds unknown names.
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ConfigError(f"{what} must be a list of modality names, got {names!r}")
    if not names:
        raise ConfigError(f"{what} is empty: at least one modality is needed")
    out, unknown = [], []
    for name in names:
        try:
            out.append(canonical_modality(name))
        except ConfigError:
            unknown.append(name)
    if unknown:
        raise ConfigError(f"unknown modalities in {what}: {', '.join(map(repr, unknown))}; {_valid_names()}")
    return tuple(out)


def union_modalities(*groups: Sequence[str]) -> tuple[str, ...]:
    """The channels of a modality-aware model for sites holding ``groups``: their union in :data:`MODALITY_ORDER`.

    ``union_modalities(["t1", "flair"], ["flair", "t1ce", "t1", "t2"], ["t1w"])`` -> ``("t1", "t1ce", "t2", "flair")``.

    Raises:
        ConfigError: an unknown name, or no group.
    """
    if not groups:
        raise ConfigError("union_modalities needs at least one list of modalities")
    names = {m for i, group in enumerate(groups) for m in canonical_modalities(group, f"modalities of group {i}")}
    return tuple(m for m in MODALITY_ORDER if m in names)


def _valid_names() -> str:
    groups: dict[str, list[str]] = {}
    for alias, canon in MODALITY_ALIASES.items():
        groups.setdefault(canon, []).append(alias)
    return "valid names: " + "; ".join(f"{c} ({', '.join(a)})" for c, a in groups.items())


@dataclass
class AdaptationReport:
    """What :func:`adapt_input_channels` does with each input channel, for logging.

    Attributes:
        source_modalities: canonical source channel order.
        target_modalities: canonical target channel order.
        copied: ``(target_index, source_index, modality, scale)`` per target channel that
            receives pretrained filters (``scale`` is 1, or ``1/k`` for a modality duplicated
            into ``k`` channels with ``duplicate="split"``).
        initialised: ``(target_index, modality)`` per Kaiming-initialised target channel.
        dropped: ``(source_index, modality)`` per source channel used by no target channel.
        seed: the generator seed of the initialised channels.
        init_std: the Kaiming std used (set once the weight's shape is known).
        duplicate: ``"split"`` or ``"copy"`` (see the module docstring).
    """

    source_modalities: tuple[str, ...]
    target_modalities: tuple[str, ...]
    copied: list[tuple[int, int, str, float]] = field(default_factory=list)
    initialised: list[tuple[int, str]] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)
    seed: int = 0
    init_std: float | None = None
    duplicate: str = "split"

    @property
    def identity(self) -> bool:
        """True when the adaptation leaves the weight unchanged (same channels, same order)."""
        return self.source_modalities == self.target_modalities

    def summary(self) -> str:
        """One line: the channel mapping, e.g. ``(t1, flair) -> (flair, t1ce, t1, t2): ...``."""
        head = f"({', '.join(self.source_modalities)}) -> ({', '.join(self.target_modalities)})"
        parts = []
        for t, s, m, scale in self.copied:
            parts.append(f"{t}:{m} <- source {s}" + ("" if scale == 1.0 else f" x {scale:g}"))
        for t, m in self.initialised:
            std = "" if self.init_std is None else f", std {self.init_std:.4g}"
            parts.append(f"{t}:{m} Kaiming (seed {self.seed}{std})")
        for s, m in self.dropped:
            parts.append(f"source {s}:{m} dropped")
        return f"{head}: " + "; ".join(parts)


def plan_channel_adaptation(
    source_modalities: Sequence[str],
    target_modalities: Sequence[str],
    *,
    seed: int = 0,
    allow_no_overlap: bool = False,
    duplicate: str = "split",
) -> AdaptationReport:
    """The channel mapping :func:`adapt_input_channels` applies, without touching weights.

    Raises:
        ConfigError: unknown modality names; a modality repeated in the source; an unknown
            ``duplicate`` mode; no target modality in the source (nothing pretrained would be
            kept) unless ``allow_no_overlap``.
    """
    if duplicate not in _DUPLICATE_MODES:
        raise ConfigError(f"duplicate must be one of {', '.join(_DUPLICATE_MODES)}, got {duplicate!r}")
    source = canonical_modalities(source_modalities, "source modalities")
    target = canonical_modalities(target_modalities, "target modalities")
    repeated = sorted({m for m in source if source.count(m) > 1})
    if repeated:
        raise ConfigError(
            f"source modalities {list(source_modalities)!r} repeat {', '.join(repeated)}: "
            "a source channel must name one modality once"
        )
    if not allow_no_overlap and not set(source) & set(target):
        raise ConfigError(
            f"no target modality ({', '.join(target)}) is in the source ({', '.join(source)}): "
            "every input channel would be re-initialised and nothing pretrained kept in the patch "
            "embedding; pass allow_no_overlap=True if that is intended"
        )
    report = AdaptationReport(source, target, seed=int(seed), duplicate=duplicate)
    for t, m in enumerate(target):
        if m in source:
            k = target.count(m) if duplicate == "split" else 1
            report.copied.append((t, source.index(m), m, 1.0 / k))
        else:
            report.initialised.append((t, m))
    report.dropped = [(s, m) for s, m in enumerate(source) if m not in target]
    return report


def _kaiming_std(weight_shape: Sequence[int], in_channels: int) -> float:
    fan_in = in_channels * math.prod(weight_shape[2:])
    return math.sqrt(2.0 / fan_in)  # gain sqrt(2): kaiming_normal_(a=0, mode="fan_in")


def _adapt(
    state_dict: Mapping[str, Tensor],
    source_modalities: Sequence[str],
    target_modalities: Sequence[str],
    *,
    seed: int,
    allow_no_overlap: bool,
    duplicate: str,
) -> tuple[dict[str, Tensor], AdaptationReport]:
    report = plan_channel_adaptation(
        source_modalities, target_modalities, seed=seed, allow_no_overlap=allow_no_overlap, duplicate=duplicate
    )
    if PATCH_EMBED_WEIGHT not in state_dict:
        heads = sorted({k.split(".", 1)[0] for k in state_dict})
        raise CheckpointError(
            f"state dict has no {PATCH_EMBED_WEIGHT!r} (top-level names: {', '.join(heads) or 'none'}); "
            "map foreign layouts with normalize_checkpoint_keys first"
        )
    weight = state_dict[PATCH_EMBED_WEIGHT]
    if not isinstance(weight, Tensor) or weight.ndim != 5:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise CheckpointError(f"{PATCH_EMBED_WEIGHT} should be a 5-D conv weight (out, in, d, h, w), got {shape}")
    n_source = len(report.source_modalities)
    if weight.shape[1] != n_source:
        raise ConfigError(
            f"{PATCH_EMBED_WEIGHT} has {weight.shape[1]} input channels but {n_source} source modalities "
            f"were given ({', '.join(report.source_modalities)})"
        )

    n_target = len(report.target_modalities)
    shape = (weight.shape[0], n_target, *weight.shape[2:])
    new = torch.empty(shape, dtype=weight.dtype, device=weight.device)
    report.init_std = _kaiming_std(shape, n_target)
    if report.initialised:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        # One draw of the full target shape: the values of target channel t depend only on
        # (seed, shape, t), not on which other channels happen to be copied.
        init = torch.randn(shape, generator=generator, dtype=torch.float64) * report.init_std
        for t, _ in report.initialised:
            new[:, t] = init[:, t].to(dtype=weight.dtype, device=weight.device)
    source_weight = weight.detach()
    for t, s, _, scale in report.copied:
        new[:, t] = source_weight[:, s] if scale == 1.0 else source_weight[:, s] * scale

    out = dict(state_dict)
    out[PATCH_EMBED_WEIGHT] = new
    return out, report


def adapt_input_channels(
    state_dict: Mapping[str, Tensor],
    source_modalities: Sequence[str],
    target_modalities: Sequence[str],
    *,
    seed: int = 0,
    allow_no_overlap: bool = False,
    duplicate: str = "split",
) -> dict[str, Tensor]:
    """A copy of ``state_dict`` whose patch embedding takes ``target_modalities`` as input channels.

    See the module docstring for the rules. Only ``swinViT.patch_embed.proj.weight`` changes
    (a new tensor; the input is not modified); every other entry, the patch-embedding bias
    included, is passed through as the same object.

    Args:
        state_dict: a state dict in this project's layout (``swinViT.*``); an encoder, an SSL
            model or a SwinUNETR state dict. Foreign layouts: run ``normalize_checkpoint_keys``.
        source_modalities: the modality of each input channel of ``state_dict``, in order.
        target_modalities: the modality of each input channel wanted, in order. Names are
            case-insensitive with aliases (``t1w`` = ``t1``, ``t2-flair``/``t2f`` = ``flair``,
            ``t1c``/``t1gd`` = ``t1ce``, ``t2w`` = ``t2``).
        seed: seed of the ``torch.Generator`` drawing the Kaiming-initialised channels.
        allow_no_overlap: allow a target sharing no modality with the source.
        duplicate: a modality in several target channels: ``"split"`` (each copy scaled by
            ``1/k``; default) or ``"copy"`` (exact copies).

    Returns:
        The adapted state dict. The mapping is logged at INFO; :func:`plan_channel_adaptation`
        returns it as an :class:`AdaptationReport`.

    Raises:
        ConfigError: see :func:`plan_channel_adaptation`; the weight's channel count differs
            from ``len(source_modalities)``.
        CheckpointError: no (5-D) patch-embedding weight in ``state_dict``.
    """
    out, report = _adapt(
        state_dict,
        source_modalities,
        target_modalities,
        seed=seed,
        allow_no_overlap=allow_no_overlap,
        duplicate=duplicate,
    )
    logger.info("channel adaptation %s", report.summary())
    return out


def adapt_checkpoint(
    source_path: str | os.PathLike,
    out_path: str | os.PathLike,
    source_modalities: Sequence[str],
    target_modalities: Sequence[str],
    seed: int = 0,
    *,
    allow_no_overlap: bool = False,
    duplicate: str = "split",
) -> AdaptationReport:
    """Read a checkpoint (any layout ``normalize_checkpoint_keys`` knows), adapt its encoder's
    input channels and write ``{"state_dict": {swinViT.*: tensor}}`` atomically to ``out_path``.

    Only the encoder (``swinViT.*``) is written: the SSL heads and any decoder depend on the
    channel count (reconstruction head) or belong to another task.

    Returns:
        The :class:`AdaptationReport` (also logged at INFO).

    Raises:
        CheckpointError: unreadable checkpoint, or one without encoder weights.
        ConfigError: see :func:`adapt_input_channels`.
    """
    encoder = select_weights(normalize_checkpoint_keys(source_path), "encoder")
    if not encoder:
        raise CheckpointError(f"{os.fspath(source_path)}: no encoder (swinViT.*) weights")
    try:
        adapted, report = _adapt(
            encoder,
            source_modalities,
            target_modalities,
            seed=seed,
            allow_no_overlap=allow_no_overlap,
            duplicate=duplicate,
        )
    except (ConfigError, CheckpointError) as exc:
        raise type(exc)(f"{os.fspath(source_path)}: {exc}") from None
    save_encoder(adapted, Path(out_path))
    logger.info("channel adaptation %s; wrote %s", report.summary(), out_path)
    return report
