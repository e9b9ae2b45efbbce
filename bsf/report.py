"""Pictures a person would rather look at than read: loss curves and SSL slice triples (PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bsf.io import atomic_path  # noqa: E402

LOSS_PARTS = ("loss", "rotation", "contrastive", "reconstruction")


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (shorter at the start), same length as ``values``."""
    x = np.asarray(values, dtype=float)
    cumsum = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    start = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[start]) / (idx - start)


def plot_ssl_run(steps: list[dict[str, float]], validations: list[dict[str, float]], triple: dict[str, np.ndarray], path: str | Path) -> Path:
    """One PNG: a panel per loss part (raw + smoothed, validation points) and an input / corrupted / reconstruction slice row.

    ``triple`` maps ``input``, ``corrupted``, ``reconstruction`` to 2-D slices (H, W).
    """
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    x = [r["step"] for r in steps]
    for ax, part in zip(axes[0], LOSS_PARTS):
        y = [r[part] for r in steps]
        ax.plot(x, y, color="0.75", lw=0.8, label="per step")
        ax.plot(x, moving_average(y, 10), color="C0", lw=2, label="mean of 10")
        val_key = "val_loss" if part == "loss" else ("val_reconstruction_l1" if part == "reconstruction" else f"val_{part}")
        vx = [v["step"] for v in validations if val_key in v]
        if vx:
            ax.plot(vx, [v[val_key] for v in validations if val_key in v], "o-", color="C3", label="validation")
        ax.set_title(part)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    for ax, (name, image) in zip(axes[1], triple.items()):
        ax.imshow(np.rot90(image), cmap="gray")
        ax.set_title(name)
        ax.axis("off")
    axes[1][3].axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return Path(path)


def middle_slice(volume: torch.Tensor) -> np.ndarray:
    """(C, X, Y, Z) -> the first channel's middle axial slice (X, Y)."""
    return volume[0, :, :, volume.shape[-1] // 2].detach().float().cpu().numpy()
