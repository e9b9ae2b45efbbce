"""What a round exchanges, and how long its transfer may take on a site's uplink.

**Exchanged keys.** The global part of the model (``scope``) minus its constant buffers: the Swin blocks'
``relative_position_index`` (one ``(w^3, w^3)`` int64 table per block, rebuilt from the window size whenever the
model is built from its config, never trained). At Small they are 12.4 % of the encoder's state-dict elements and
1.4 M of 11.4 M; sending them every round, as float32, both ways, only costs bandwidth. The server keeps them in its
saved global model (:class:`bsf.fl.persistor.BSFModelPersistor` excludes them from what it sends with
``exclude_vars``), so ``FL_global_model.pt`` stays a complete checkpoint for ``bsf predict``, export and resume.

**Timeouts.** :func:`transfer_timeouts` derives NVFlare's result-submission and task-download timeouts from the
round's payload and the link speed the lead documents (``federation.uplink_mbit``), instead of NVFlare's defaults.
:func:`streaming_timeouts` derives, from the same link speed, the byte-streaming settings every participant's
``comm_config.json`` needs so that NVFlare's reliable streams do not retransmit (and then give up on) chunks that
are merely queued behind the rest of a flow-control window on a slow link.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, TypeVar

from bsf.errors import ConfigError

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
    ``transfer_dtype`` (float16: half). NVFlare's framing is not included (see benchmarks/RESULTS.md).

    A model across tasks (``federation.tasks``): down, the shared tensors and every task's head; up, the shared
    tensors and the largest task's head (a site sends its own task's only)."""
    from bsf.federation.task_heads import for_task, merge_task_models

    tasks = config.federation.tasks if config.federation else []
    if tasks:
        per_task = {task: exchanged_shapes(for_task(config, task), scope) for task in tasks}
        down = element_count(merge_task_models(per_task).values())
        up = max(element_count(shapes.values()) for shapes in per_task.values())
    else:
        down = up = element_count(exchanged_shapes(config, scope).values())
    return 4 * down, (2 if transfer_dtype == "float16" else 4) * up


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


# NVFlare 2.9's byte streaming (nvflare/fuel/f3/streaming/stream_const.py and byte_streamer.py), which the kits keep.
MIB = 1024 * 1024
#: ``STREAM_CHUNK_SIZE``: one stream frame.
STREAM_CHUNK_BYTES = 1 * MIB
#: ``STREAM_WINDOW_SIZE``: a sender stops while more than this is unacknowledged.
STREAM_WINDOW_BYTES = 64 * MIB
#: ``STREAM_ACK_INTERVAL``: the receiver acknowledges after consuming this much (or the stream's end).
STREAM_ACK_INTERVAL_BYTES = 16 * MIB
#: Data a healthy stream may have sent past a chunk before that chunk's acknowledgement returns: a full window
#: (plus the chunk itself) ahead of it in the link, then up to one acknowledgement interval more.
STREAM_IN_FLIGHT_BYTES = STREAM_WINDOW_BYTES + STREAM_CHUNK_BYTES + STREAM_ACK_INTERVAL_BYTES
#: NVFlare's defaults (seconds), never lowered: ``streaming_retry_wait``, ``streaming_retry_timeout``,
#: ``streaming_ack_progress_timeout``, ``streaming_ack_wait``, ``streaming_read_timeout``.
MIN_RETRY_WAIT = 5.0
MIN_RETRY_TIMEOUT = 60.0
MIN_ACK_PROGRESS_TIMEOUT = 60.0
MIN_ACK_WAIT = 300
MIN_READ_TIMEOUT = 300
#: A receiver keeps a finished stream (to re-acknowledge retried chunks) for the sender's retry window, capped at
#: this (``MAX_COMPLETED_TASK_TTL`` in nvflare/fuel/f3/streaming/byte_receiver.py) unless its own config says more.
MAX_RETRY_WINDOW = 3600.0


@dataclass(frozen=True)
class StreamingTimeouts:
    """NVFlare byte-streaming settings (seconds) for a link; :meth:`comm_config` gives them by NVFlare's names.

    ``in_flight_seconds``: :data:`STREAM_IN_FLIGHT_BYTES` at the link speed, the longest a chunk of a healthy
    stream waits for its acknowledgement. ``retry_wait``: a sender resends an unacknowledged chunk after this;
    ``retry_timeout``: and gives the stream up this long after the first resend; ``ack_progress_timeout`` /
    ``ack_wait``: a sender with a full window gives up after this long without acknowledgement progress / in one
    wait; ``read_timeout``: a receiver gives up after waiting this long for the next chunk.
    """

    in_flight_seconds: float
    retry_wait: float
    retry_timeout: float
    ack_progress_timeout: float
    ack_wait: int
    read_timeout: int

    def comm_config(self) -> dict[str, float | int]:
        """The settings as ``comm_config.json`` keys (read by ``nvflare.fuel.f3.comm_config.CommConfigurator``)."""
        return {
            "streaming_retry_wait": self.retry_wait,
            "streaming_retry_timeout": self.retry_timeout,
            "streaming_ack_progress_timeout": self.ack_progress_timeout,
            "streaming_ack_wait": self.ack_wait,
            "streaming_read_timeout": self.read_timeout,
        }


def streaming_timeouts(link_mbit: float) -> StreamingTimeouts:
    """NVFlare's streaming settings for a participant whose link moves ``link_mbit`` (10^6 bit/s).

    On a reliable stream (every download-service reply, i.e. every model and update, is one) NVFlare resends each
    chunk not acknowledged within ``streaming_retry_wait`` (default 5 s) and fails the stream when one is still
    unacknowledged ``streaming_retry_timeout`` (60 s) after its first resend. A chunk's acknowledgement waits for
    the data ahead of it: up to :data:`STREAM_IN_FLIGHT_BYTES` (81 MiB: the 64 MiB window, the chunk, a 16 MiB
    acknowledgement interval), 68 s at 10 Mbit/s. Every resend queues another copy behind the same window, so once
    the in-flight time passes the retry wait the link carries mostly copies and streams die (the 10 Mbit/s shaped
    run in benchmarks/RESULTS.md). So, with ``t = TRANSFER_MARGIN * STREAM_IN_FLIGHT_BYTES * 8 / (link_mbit 10^6)``
    (rounded up to whole seconds)::

        retry_wait = max(5, t); retry_timeout = max(60, t); ack_progress_timeout = max(60, t)
        ack_wait = max(300, t); read_timeout = max(300, retry_wait + retry_timeout)

    E.g. 10 Mbit/s: t = 136 s (wait, timeout, progress 136 s, ack wait 300 s, read 300 s); 100 Mbit/s: retry
    wait 14 s, the rest NVFlare's defaults. The payload enters through the window: any message over 64 MiB fills
    it (a Small SwinUNETR's two largest tensors, 60.75 MiB each, nearly do), and one kit serves every stage, so the
    bound does not depend on the job. A link so slow that ``retry_wait + retry_timeout`` exceeds
    :data:`MAX_RETRY_WINDOW` (below about 0.76 Mbit/s) is refused: NVFlare would not honour that retry window at a
    receiver whose own config is not raised.
    """
    if not link_mbit or link_mbit <= 0:
        raise ConfigError(f"uplink_mbit must be > 0 (Mbit/s), got {link_mbit}")
    in_flight = transfer_seconds(STREAM_IN_FLIGHT_BYTES, link_mbit)
    t = math.ceil(TRANSFER_MARGIN * in_flight)
    retry_wait, retry_timeout = float(max(MIN_RETRY_WAIT, t)), float(max(MIN_RETRY_TIMEOUT, t))
    if retry_wait + retry_timeout > MAX_RETRY_WINDOW:
        raise ConfigError(
            f"uplink_mbit {link_mbit:g}: NVFlare's streams would need a {retry_wait + retry_timeout:.0f} s retry "
            f"window (more than its {MAX_RETRY_WINDOW:.0f} s cap); a link this slow needs a smaller streaming window"
        )
    return StreamingTimeouts(
        in_flight_seconds=in_flight,
        retry_wait=retry_wait,
        retry_timeout=retry_timeout,
        ack_progress_timeout=float(max(MIN_ACK_PROGRESS_TIMEOUT, t)),
        ack_wait=max(MIN_ACK_WAIT, t),
        read_timeout=max(MIN_READ_TIMEOUT, math.ceil(retry_wait + retry_timeout)),
    )
