"""``bsf site check``: validate a site's YAML (the format of :mod:`bsf.federation.site_config`) and the data it points at.

Checks, in order: the YAML's keys (strictly, through the run config), the paths (data root, datalist,
cache folder), that the cases can be found, their channel count against the job's model (a modality-aware
model: against the modalities the site holds), then a header
check of every file (``full=True`` also decodes the voxels). Reports the cache size the data needs, and
the preflight (:mod:`bsf.federation.preflight`: RAM, GPU memory, cache disk and CPU cores the job needs
against this machine's); ``bsf site preflight`` runs that part alone.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from bsf.errors import BSFError
from bsf.federation.preflight import (
    Machine, PreflightReport, case_bytes, existing_parent, requirements, site_cases, this_machine,
)
from bsf.federation.site_config import ENV_SITE_CONFIG, load_with_site, resolve_site

GB = 1024**3


@dataclass
class SiteReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    check_table: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        out = list(self.lines)
        if self.check_table:
            out += ["", self.check_table]
        out += [f"problem: {p}" for p in self.problems]
        out.append("site check: OK" if self.ok else f"site check: {len(self.problems)} problem(s)")
        return "\n".join(out)

    def failure(self) -> str:
        return f"{len(self.problems)} problem(s) (listed above)"


def check_site(
    path: str | Path,
    *,
    overrides: Sequence[str] = (),
    site: str = "site-1",
    config: str | None = None,
    full: bool = False,
    workers: int = 4,
    machine: Machine | None = None,
) -> SiteReport:
    """Validate the site config at ``path`` merged into the job's run config ``config`` (None: the defaults), with
    ``overrides`` (``key=value`` strings) on top; raises :class:`bsf.errors.ConfigError` on bad keys/values.
    ``machine``: what the preflight compares with (default: this machine)."""
    site_config, cfg = site_job_config(path, overrides=overrides, site=site, config=config)
    data = cfg.data
    report = SiteReport([f"site config {path}: data set {data.dataset}"])
    if site_config.synthesises:
        report.lines.append(f"no data.root or data.datalist: the site synthesises data ({site_config.synthetic})")
        return report
    if data.root and not Path(data.root).is_dir():
        report.problems.append(f"data.root {data.root}: no such folder")
    if data.datalist and not Path(data.datalist).is_file():
        report.problems.append(f"data.datalist {data.datalist}: no such file")
    if not data.root and not data.datalist:
        report.problems.append("neither data.root nor data.datalist is set")
    _check_cache_folder(data.cache, data.cache_dir, report)
    if report.problems:
        return report
    try:
        cases, base = _site_cases(cfg)
    except BSFError as exc:
        report.problems.append(str(exc))
        return report
    report.lines.append(f"{len(cases)} case(s) from {'datalist ' + data.datalist if data.datalist else 'folder ' + data.root}")
    channels = {len(c["image"]) if isinstance(c["image"], list) else 1 for c in cases}
    report.lines.append(f"channels per case: {', '.join(map(str, sorted(channels)))}" + (f" ({', '.join(data.modalities)})" if data.modalities else ""))
    if config is not None:
        _check_channels(cfg, channels, report)
    per_case = case_bytes(cases)
    report.lines.append(_cache_estimate(per_case, len(cases), data.cache, data.cache_dir))
    preflight = requirements(cfg, machine or this_machine(cfg), len(cases), per_case)
    report.lines += preflight.text().splitlines()
    report.problems += preflight.problems
    from bsf.data.check import check_cases

    result = check_cases(cases, base, data=full, workers=workers, dataset=data.dataset, memo_dir=Path(data.cache_dir) if data.cache_dir else None)
    report.lines.append(result.summary())
    if result.problems:
        report.check_table = result.table(base)
    if not result.ok:
        hint = " (or set data.skip_broken: true)" if not data.skip_broken else " (data.skip_broken is set: training leaves them out)"
        report.problems.append(f"{len(result.broken)} broken case(s); run `bsf data check --write-clean`{hint}")
    return report


def _check_channels(cfg, channels: set[int], report: SiteReport) -> None:
    """A case's image files against the job's model: one per ``model.in_channels``, or with a modality-aware model
    (``model.modalities``) one per modality this site holds (``data.modalities``, default its data set's), the
    model's other channels left empty."""
    from bsf.data.transforms import held_modalities

    if not cfg.model.modalities:
        if channels != {cfg.model.in_channels}:
            report.problems.append(
                f"cases have {sorted(channels)} image channel(s) but the job's model.in_channels is {cfg.model.in_channels}"
            )
        return
    held = held_modalities(cfg.data)
    empty = [m for m in cfg.model.modalities if m not in held]
    report.lines.append(
        f"model channels {', '.join(cfg.model.modalities)}: this site fills {', '.join(held)}"
        + (f"; empty: {', '.join(empty)}" if empty else "")
    )
    if channels != {len(held)}:
        report.problems.append(
            f"cases have {sorted(channels)} image channel(s) but this site holds {len(held)} modalit"
            f"{'y' if len(held) == 1 else 'ies'} ({', '.join(held)}; data.modalities) of the job's model.modalities"
        )


def _site_cases(cfg) -> tuple[list[dict], Path]:
    """Every case the site's config lists (training and validation alike) and the folder their paths resolve against."""
    from bsf.data.cases import list_cases

    data = cfg.data
    cases = list_cases(data.dataset, datalist=data.datalist, root=data.root, modalities=data.modalities, fold=data.fold)
    return cases.all_cases, cases.base


def _check_cache_folder(cache: str, cache_dir: str, report: SiteReport) -> None:
    if cache == "persistent" and not cache_dir:
        report.problems.append("data.cache is persistent but data.cache_dir is not set")
    if not cache_dir:
        return
    folder = Path(cache_dir)
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is None or not existing.is_dir():
        report.problems.append(f"data.cache_dir {folder}: cannot be created (no folder above it)")
    elif not _writable(existing):
        report.problems.append(f"data.cache_dir {folder}: {existing} is not writable")


def _writable(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK | os.X_OK)


def site_job_config(path: str | Path, *, overrides: Sequence[str] = (), site: str = "site-1", config: str | None = None):
    """The site config at ``path`` (``site``'s entry of a site map, with ``overrides``) and the run config of job
    ``config`` (None: the defaults) with it merged in."""
    path = Path(path)
    if not path.is_file():
        raise BSFError(f"site config {path}: no such file")
    site_config = resolve_site(site, environ={ENV_SITE_CONFIG: str(path)}).with_overrides(overrides)
    return site_config, load_with_site(config, site_config)


def preflight_site(path: str | Path, *, overrides: Sequence[str] = (), site: str = "site-1", config: str | None = None,
                   machine: Machine | None = None) -> PreflightReport:
    """``bsf site preflight``: what job ``config`` needs at the site of ``path`` against ``machine`` (default: this one)."""
    _, cfg = site_job_config(path, overrides=overrides, site=site, config=config)
    return requirements(cfg, machine or this_machine(cfg), *site_cases(cfg))


def _cache_estimate(per_case: int, n_cases: int, cache: str, cache_dir: str) -> str:
    """Upper bound of the cache size: float32 volume of the first readable case times the number of cases."""
    total = per_case * n_cases
    text = f"cache {cache}: about {per_case / 1e6:.0f} MB a case, {total / GB:.1f} GiB for all (float32, before the foreground crop)"
    if cache == "persistent" and cache_dir:
        existing = existing_parent(cache_dir)
        if existing is not None:
            text += f"; {shutil.disk_usage(existing).free / GB:.0f} GiB free at {existing}"
    return text
