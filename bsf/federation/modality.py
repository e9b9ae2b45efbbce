"""One federation over sites holding different MRI modalities: the canonical channel names, and the aggregation
rule that averages each modality's first-layer filters over the sites that hold it.

A modality-aware global model (``model.modalities``) takes one input channel per modality of the federation's
union, in :data:`MODALITY_ORDER`; a site feeds the channels it holds (``data.modalities``) and leaves the others
empty (zeros). The first layer, ``swinViT.patch_embed.proj.weight`` of shape ``(F, C, 2, 2, 2)``, is the only tensor
whose slices belong to one modality: slice ``[:, c]`` sees channel ``c`` only. A site without modality ``c`` never
sees it, so its slice ``[:, c]`` moves only through weight decay, towards zero: averaging it in would pull the
filters of the sites that do hold ``c`` towards that untouched value. The rule (:class:`ChannelMean`):

    W[:, c] = sum_{s holds c} w_s * W_s[:, c] / sum_{s holds c} w_s

with the site weights ``w_s`` of the job's weighting (steps, cases, uniform) (:class:`ModalityAggregation` applies it
in the server's aggregator). A channel no accepted site holds in
a round is averaged over all of them (what plain FedAvg does; with differences they are the weight-decay drift of
every site). Every other tensor is averaged over all sites, as before. Pure NumPy, no NVFlare, no torch: the
server's aggregator (:class:`bsf.fl.aggregation.CheckedFedAvgAggregator`) and the result guard use it.

A site says what it holds in its result meta under :data:`META_MODALITIES`: a list of canonical names, e.g.
``["t1", "flair"]`` (:func:`held_channels` checks it against the model's channels).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from bsf.errors import BSFError

__all__ = [
    "MODALITY_ORDER",
    "META_MODALITIES",
    "PATCH_EMBED_WEIGHT",
    "ModalityMetaError",
    "ChannelMean",
    "ModalityAggregation",
    "held_channels",
    "ordered",
]

#: Every canonical modality name, in the fixed channel order of a modality-aware model (``model.modalities``
#: lists a subset of these, in this order). Spellings (``t1w``, ``t2f``, ...) map to them in
#: :data:`bsf.model.adapt.MODALITY_ALIASES`.
MODALITY_ORDER: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
#: The result-meta key by which a site names the modalities it holds (a list of canonical names).
META_MODALITIES = "modalities"
#: The first layer: its input-channel axis (1) is the one that belongs to modalities.
PATCH_EMBED_WEIGHT = "swinViT.patch_embed.proj.weight"


class ModalityMetaError(BSFError):
    """A site's ``modalities`` claim is malformed or names channels the model does not have."""


def ordered(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` (canonical, no repeats) sorted into :data:`MODALITY_ORDER`."""
    unknown = [n for n in names if n not in MODALITY_ORDER]
    if unknown:
        raise ModalityMetaError(f"unknown modality names {unknown}; canonical names: {', '.join(MODALITY_ORDER)}")
    return tuple(m for m in MODALITY_ORDER if m in names)


def held_channels(claim: Any, channels: Sequence[str]) -> np.ndarray:
    """The boolean mask ``(C,)`` of ``channels`` that a site's ``modalities`` claim says it holds.

    Args:
        claim: the site's meta value: a non-empty list of distinct canonical names, each one of ``channels``.
        channels: the model's input channels by name (``model.modalities``), in order.

    Raises:
        ModalityMetaError: ``claim`` is not such a list (naming what is wrong).
    """
    if not isinstance(claim, (list, tuple)) or not claim:
        raise ModalityMetaError(f"meta {META_MODALITIES!r} must be a non-empty list of modality names, got {type(claim).__name__}")
    if any(type(name) is not str for name in claim):
        raise ModalityMetaError(f"meta {META_MODALITIES!r} must hold strings only")
    foreign = [name for name in claim if name not in channels]
    if foreign:
        raise ModalityMetaError(
            f"meta {META_MODALITIES!r} names {foreign[:4]}, not among the model's channels ({', '.join(channels)})"
        )
    if len(set(claim)) != len(claim):
        raise ModalityMetaError(f"meta {META_MODALITIES!r} repeats a modality: {list(claim)}")
    return np.array([c in claim for c in channels], dtype=bool)


class ChannelMean:
    """Running weighted mean of one ``(F, C, ...)`` tensor, each input channel ``c`` over the sites holding it.

    Accumulated in float64; :meth:`result` is float32. A channel no added site holds is the mean over all of them.
    """

    def __init__(self) -> None:
        self._held_sum: np.ndarray | None = None  # (F, C, ...): sum of w_s * W_s over the sites holding each channel
        self._all_sum: np.ndarray | None = None  # (F, C, ...): sum of w_s * W_s over all sites
        self._held_weight: np.ndarray | None = None  # (C,): sum of w_s over the sites holding each channel
        self._all_weight = 0.0

    def add(self, value: Any, weight: float, held: np.ndarray) -> None:
        """Add one site's tensor ``value`` ``(F, C, ...)`` with a positive finite ``weight`` and its mask ``held`` ``(C,)``."""
        if weight <= 0 or not math.isfinite(weight):
            raise ValueError(f"weight must be positive and finite, got {weight}")
        arr = np.asarray(value, dtype=np.float64)
        held = np.asarray(held, dtype=bool)
        if arr.ndim < 2 or held.shape != (arr.shape[1],):
            raise ValueError(f"held mask {held.shape} does not match the channel axis of a tensor of shape {arr.shape}")
        if self._all_sum is None:
            self._held_sum, self._all_sum = np.zeros_like(arr), np.zeros_like(arr)
            self._held_weight = np.zeros(arr.shape[1])
        channel = held.reshape(1, -1, *([1] * (arr.ndim - 2)))
        self._held_sum += np.where(channel, arr * weight, 0.0)
        self._all_sum += arr * weight
        self._held_weight += held * weight
        self._all_weight += weight

    @property
    def channel_weights(self) -> list[float]:
        """The summed weight of the sites holding each channel (0: no site held it; its mean is over all sites)."""
        return [] if self._held_weight is None else [float(w) for w in self._held_weight]

    def result(self) -> np.ndarray | None:
        """The per-channel weighted mean (float32, the inputs' shape); ``None`` before any :meth:`add`."""
        if self._all_sum is None:
            return None
        held_weight = self._held_weight.reshape(1, -1, *([1] * (self._all_sum.ndim - 2)))
        safe = np.where(held_weight > 0, held_weight, 1.0)
        out = np.where(held_weight > 0, self._held_sum / safe, self._all_sum / self._all_weight)
        return out.astype(np.float32)


class ModalityAggregation:
    """The per-modality part of a round's aggregation, beside the aggregator's plain weighted mean.

    For each accepted update the aggregator calls :meth:`held` (the site's claim -> mask), then :meth:`take`,
    which keeps the first layer for :class:`ChannelMean` and returns the other tensors for the plain mean;
    :meth:`finish` puts the per-modality first layer back into the round's result.

    Args:
        channels: the model's input channels by name (``model.modalities``), in :data:`MODALITY_ORDER`.
        key: the tensor whose axis 1 is the input channel (:data:`PATCH_EMBED_WEIGHT`).
    """

    def __init__(self, channels: Sequence[str], key: str = PATCH_EMBED_WEIGHT) -> None:
        channels = list(channels)
        if not channels or ordered(channels) != tuple(channels) or len(set(channels)) != len(channels):
            raise ModalityMetaError(
                f"the model's modalities {channels} must be distinct canonical names in the order {', '.join(MODALITY_ORDER)}"
            )
        self.channels, self.key = channels, key
        self.reset()

    def reset(self) -> None:
        """Forget the round's updates."""
        self._mean = ChannelMean()
        self.sites: dict[str, list[str]] = {}

    def held(self, meta: Any) -> np.ndarray:
        """The mask ``(C,)`` of the channels a result's meta says its site holds; every channel when it says nothing.

        Raises:
            ModalityMetaError: a malformed claim (see :func:`held_channels`).
        """
        claim = (meta or {}).get(META_MODALITIES)
        if claim is None:
            return np.ones(len(self.channels), dtype=bool)
        return held_channels(claim, self.channels)

    def take(self, params: Any, weight: float, held: np.ndarray, site: str) -> dict[str, Any]:
        """``params`` without the first layer, which joins the per-modality mean with ``weight`` and ``held``."""
        if self.key not in params:
            return dict(params)
        value = np.asarray(params[self.key])
        if value.ndim < 2 or value.shape[1] != len(self.channels):
            raise ModalityMetaError(
                f"{self.key} has shape {value.shape}; the model's {len(self.channels)} modalities need axis 1 of that size"
            )
        self._mean.add(value, weight, held)
        self.sites[site] = [c for c, h in zip(self.channels, held) if h]
        return {k: v for k, v in params.items() if k != self.key}

    def finish(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with the per-modality mean of the first layer (unchanged when no update carried it)."""
        first = self._mean.result()
        return params if first is None else {**params, self.key: first}

    def round_meta(self) -> dict[str, Any]:
        """For the round record: the modalities each site held, and the summed weight of each modality's sites."""
        return {"sites": dict(self.sites), "weights": dict(zip(self.channels, self._mean.channel_weights))}
