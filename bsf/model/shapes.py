"""Input-shape checks shared by the SSL model and the segmentation model."""

from __future__ import annotations

from collections.abc import Sequence

from bsf.errors import BSFError

__all__ = ["InputShapeError", "MIN_SIDE", "SIDE_MULTIPLE", "check_input_shape"]

#: Every spatial side must be a multiple of this (patch 2, then 4 halvings: 2**5).
SIDE_MULTIPLE = 32
#: Below this the bottleneck is 1x1x1 and instance norm fails in training.
MIN_SIDE = 64


class InputShapeError(BSFError, ValueError):
    """A model input has the wrong rank, channel count or spatial size."""


def check_input_shape(shape: Sequence[int], in_channels: int) -> None:
    """Check that ``shape`` is ``(B, C, D, H, W)`` with ``C == in_channels`` and usable sides.

    Every spatial side must be divisible by 32 and at least 64.

    Raises:
        InputShapeError: naming the shape and what is wrong with it.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 5:
        raise InputShapeError(f"expected input of shape (B, C, D, H, W), got {shape}")
    if shape[1] != in_channels:
        raise InputShapeError(f"input {shape} has {shape[1]} channels, the model expects {in_channels}")
    bad = [s for s in shape[2:] if s % SIDE_MULTIPLE or s < MIN_SIDE]
    if bad:
        raise InputShapeError(
            f"input {shape}: every spatial side must be divisible by {SIDE_MULTIPLE} and at least "
            f"{MIN_SIDE}; bad sides {bad}"
        )
