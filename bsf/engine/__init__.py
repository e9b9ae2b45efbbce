"""The training core shared by every driver."""

from bsf.config import RunConfig, load_config
from bsf.engine.engine import Engine, build_model, resolve_device

__all__ = ["Engine", "build_model", "RunConfig", "load_config", "resolve_device"]
