"""The little of NVFlare's runtime that a filter or controller touches in a unit test: an engine, a workspace, a context."""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext


class FakeWorkspace:
    def __init__(self, root: Path):
        self.root = root

    def get_run_dir(self, job_id: str) -> str:
        return str(self.root / job_id)


class FakeEngine:
    """What the filter and the controller ask of NVFlare's engine: a workspace and an event sink."""

    def __init__(self, root: Path):
        self.workspace = FakeWorkspace(root)

    def get_workspace(self):
        return self.workspace

    def fire_event(self, event_type, fl_ctx):  # the filter's error log fires an event
        pass


def site_context(root: Path, app: Path | None = None, job_id: str = "job1", site: str = "site-1") -> FLContext:
    """An ``FLContext`` of ``site`` running ``job_id`` with its workspace at ``root`` (and its app folder ``app``)."""
    ctx = FLContext()
    ctx.set_prop(ReservedKey.ENGINE, FakeEngine(root), private=True, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=True, sticky=False)
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=True, sticky=False)
    if app is not None:
        ctx.set_prop(FLContextKey.APP_ROOT, str(app), private=True, sticky=False)
    return ctx
