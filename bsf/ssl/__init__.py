"""Self-supervised pretext tasks: rotated, corrupted views and the three-part SSL loss."""

from bsf.ssl.loss import SSLLoss
from bsf.ssl.views import Corruption, CorruptionConfig, SSLViews, corrupt, make_ssl_views, rotate90

__all__ = ["Corruption", "CorruptionConfig", "SSLLoss", "SSLViews", "corrupt", "make_ssl_views", "rotate90"]
