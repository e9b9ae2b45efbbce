"""What a round exchanges, and how long its transfer may take on a site's uplink.

**Exchanged keys.** The global part of the model (``scope``) minus its constant buffers: the Swin blocks'
``relative_position_index`` (one ``(w^3, w^3)`` int64 table per block, rebuilt from the window size whenever the
model is built from its config, never trained). At Small they are 12.4 % of the encoder's state-dict elements and
1.4 M of 11.4 M; sending them every round, as float32, both ways, only costs bandwidth. The server keeps them in its
saved global model (:class:`bsf.fl.persistor.BSFModelPersistor` excludes them from what it sends with
``exclude_vars``), so ``FL_global_model.pt`` stays a complete checkpoint for ``bsf predict``, export and resume.

**Timeouts.** :func:`transfer_timeouts` derives NVFlare's result-submission and task-download timeouts from the
round's payload and the link speed the lead documents (``federation.uplink_mbit``), instead of NVFlare's defaults.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, TypeVar

#: State-dict keys never exchanged: constant buffers rebuilt from the model config (a regex, NVFlare's ``exclude_vars``).
CONSTANT_BUFFERS = r"\.relative_position_index$"
_CONSTANT = re.compile(CONSTANT_BUFFERS)

V = TypeVar("V")


def is_exchanged(key: str) -> bool:
    """Whether a state-dict key of the global part travels in a round (False for constant buffers)."""
    return _CONSTANT.search(key) is None


def exchanged(weights: Mapping[str, V]) -> dict[str, V]:
    """``weights`` without the constant buffers (same order)."""
    return {k: v for k, v in weights.items() if is_exchanged(k)}


def element_count(shapes: Iterable[tuple[int, ...]]) -> int:
    """Total elements of tensors with these shapes."""
    return sum(math.prod(s) for s in shapes)


def exchanged_shapes(config: Any, scope: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors a round of ``config``'s model exchanges for ``scope`` (the model is built on the CPU,
    nothing loaded, the caller's random state untouched). Stage 1/2: the SSL model; Stage 3: the SwinUNETR."""
    import torch

    from bsf.model import SSLModel, build_swin_unetr, select_weights

    m = config.model
    with torch.random.fork_rng(devices=[]):
        if config.stage == "ssl":
            model = SSLModel(m.size, m.in_channels)
        else:
            model = build_swin_unetr(m.size, m.in_channels, m.out_channels)
    return {k: tuple(v.shape) for k, v in exchanged(select_weights(model.state_dict(), scope)).items()}


def round_bytes(config: Any, scope: str, transfer_dtype: str) -> tuple[int, int]:
    """``(down, up)`` bytes of one round's tensors at a site: the global part as float32 down, the update up in
    ``transfer_dtype`` (float16: half). NVFlare's framing is not included (see benchmarks/RESULTS.md)."""
    elements = element_count(exchanged_shapes(config, scope).values())
    return 4 * elements, (2 if transfer_dtype == "float16" else 4) * elements


#: Margin on a computed transfer time: TCP/TLS and NVFlare framing, a link shared with other traffic.
TRANSFER_MARGIN = 2.0
#: Never below NVFlare 2.9's own defaults (seconds), which suffice on fast links.
MIN_SUBMIT_TIMEOUT = 300.0
MIN_DOWNLOAD_TIMEOUT = 300.0


@dataclass(frozen=True)
class TransferTimeouts:
    """Seconds NVFlare may spend on one round's transfers at a site.

    ``upload_seconds``/``download_seconds``: the payload at the link speed (before the margin).
    ``submit``: result submission (site -> server, uplink); ``download``: the global model (server -> site).
    """

    upload_seconds: float
    download_seconds: float
    submit: float
    download: float


def transfer_seconds(payload_bytes: int, mbit_per_s: float) -> float:
    """Seconds to move ``payload_bytes`` at ``mbit_per_s`` (10^6 bit/s)."""
    return payload_bytes * 8 / (mbit_per_s * 1e6)


def transfer_timeouts(
    down_bytes: int, up_bytes: int, uplink_mbit: float, downlink_mbit: float | None = None
) -> TransferTimeouts:
    """Timeouts for a round that sends ``down_bytes`` to a site and ``up_bytes`` back.

    ``submit = max(MIN_SUBMIT_TIMEOUT, TRANSFER_MARGIN * up_bytes * 8 / (uplink_mbit 10^6))``, likewise the download
    with ``downlink_mbit`` (default: the uplink's speed, the slower direction of most hospital links). E.g. a Small
    Stage 3 round (whole SwinUNETR minus constant buffers, 64.1 M float32 elements = 256 MB each way) at 100 Mbit/s:
    20.5 s of transfer, 300 s timeouts (the minimum); at 10 Mbit/s 205 s, timeouts 410 s.
    """
    downlink_mbit = downlink_mbit or uplink_mbit
    up = transfer_seconds(up_bytes, uplink_mbit)
    down = transfer_seconds(down_bytes, downlink_mbit)
    return TransferTimeouts(
        upload_seconds=up,
        download_seconds=down,
        submit=max(MIN_SUBMIT_TIMEOUT, TRANSFER_MARGIN * up),
        download=max(MIN_DOWNLOAD_TIMEOUT, TRANSFER_MARGIN * down),
    )
