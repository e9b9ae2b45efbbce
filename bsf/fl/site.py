"""Where a site's data lives: site configuration for real and simulated sites.

A *site config* is a small YAML file that says what data a site has and where, as run-config
sections that override the job's run config, plus an optional synthetic-data request::

    data:                      # any keys of the run config's `data` section
      dataset: ukb
      root: /data/ukb          # the site's own files; never leave the site
      datalist: null
    train:                     # only the keys in SITE_TRAIN_KEYS
      device: auto
    overrides: []              # expert: extra dotted overrides, e.g. ["data.num_workers=4"]
    synthetic:                 # used only when data.root is empty
      subjects: 4
      spacing: 3.0

A site finds its config, first match wins:

1. ``$BSF_SITE_CONFIG``: a site config, or a *site map* ``{sites: {<site>: <config or path>, "*": ...}}``
   (``simulator/sites.yaml`` is one; paths are relative to the map file);
2. ``<site workspace>/local/bsf_site.yaml`` (real sites: next to ``resources.json``);
3. nothing: the site synthesises a small data set of the job's kind for itself (the run config's
   ``data.dataset``: UKB-like for Stage 1, BraTS-like or ATLAS-like for Stages 2 and 3) in
   ``<site workspace>/bsf_data/synthetic-<dataset>-...``, seeded by its name, and logs that it did.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from bsf.errors import ConfigError

log = logging.getLogger(__name__)

ENV_SITE_CONFIG = "BSF_SITE_CONFIG"
LOCAL_SITE_FILE = "bsf_site.yaml"
SYNTH_FOLDER = "bsf_data"
SITE_KEYS = {"data", "train", "overrides", "synthetic"}
SITE_TRAIN_KEYS = {"device", "precision", "progress", "log_every"}
SYNTH_KEYS = {"subjects", "spacing", "seed"}
DEFAULT_SYNTHETIC = {"subjects": 4, "spacing": 3.0}


@dataclass
class SiteSetup:
    """What a site adds to the job's run config: dotted overrides, and where they came from."""

    site: str
    overrides: list[str] = field(default_factory=list)
    source: str = "synthetic (no site configuration found)"
    synthetic: dict[str, Any] | None = None


def site_seed(site: str) -> int:
    """A stable seed from a site name (the same on every machine and Python version)."""
    return zlib.crc32(site.encode("utf-8")) & 0x7FFFFFFF


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"site config {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"site config {path}: not valid YAML ({exc})") from None


def _select_from_map(raw: Mapping[str, Any], site: str, origin: Path) -> tuple[Any, str] | None:
    sites = raw["sites"] or {}
    if not isinstance(sites, Mapping):
        raise ConfigError(f"site map {origin}: 'sites' must map site names to configs")
    entry = sites.get(site, sites.get("*"))
    if entry is None:
        return None
    label = f"{origin} [{site if site in sites else '*'}]"
    if isinstance(entry, str):
        path = Path(entry)
        if not path.is_absolute():
            path = origin.parent / path
        return _read_yaml(path), f"{path} (via {label})"
    return entry, label


def _overrides_from(raw: Any, origin: str) -> tuple[list[str], dict[str, Any] | None]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"site config {origin}: top level must be a mapping")
    unknown = sorted(set(raw) - SITE_KEYS)
    if unknown:
        raise ConfigError(f"site config {origin}: unknown key {unknown[0]!r} (valid: {', '.join(sorted(SITE_KEYS))})")
    overrides: list[str] = []
    data = raw.get("data") or {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"site config {origin}: 'data' must be a mapping")
    for key, value in data.items():
        overrides.append(f"data.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    train = raw.get("train") or {}
    if not isinstance(train, Mapping):
        raise ConfigError(f"site config {origin}: 'train' must be a mapping")
    for key, value in train.items():
        if key not in SITE_TRAIN_KEYS:
            raise ConfigError(
                f"site config {origin}: train.{key} cannot be set per site (allowed: {', '.join(sorted(SITE_TRAIN_KEYS))})"
            )
        overrides.append(f"train.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    extra = raw.get("overrides") or []
    if not isinstance(extra, list) or not all(isinstance(x, str) and "=" in x for x in extra):
        raise ConfigError(f"site config {origin}: 'overrides' must be a list of 'section.key=value' strings")
    overrides.extend(extra)
    synthetic = raw.get("synthetic")
    if synthetic is not None:
        if not isinstance(synthetic, Mapping) or set(synthetic) - SYNTH_KEYS:
            raise ConfigError(f"site config {origin}: 'synthetic' takes only {', '.join(sorted(SYNTH_KEYS))}")
        synthetic = {**DEFAULT_SYNTHETIC, **synthetic}
    return overrides, synthetic


def resolve_site(site: str, workspace: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> SiteSetup:
    """Find ``site``'s configuration (see the module docstring for the order)."""
    environ = os.environ if environ is None else environ
    raw: Any = None
    source = ""
    env_path = environ.get(ENV_SITE_CONFIG)
    if env_path:
        path = Path(env_path).expanduser()
        loaded = _read_yaml(path)
        if isinstance(loaded, Mapping) and "sites" in loaded:
            picked = _select_from_map(loaded, site, path)
            if picked is not None:
                raw, source = picked
            else:
                log.info("site %s is not listed in %s=%s", site, ENV_SITE_CONFIG, path)
        else:
            raw, source = loaded, f"{path} (from ${ENV_SITE_CONFIG})"
    if raw is None and workspace is not None:
        local = Path(workspace) / "local" / LOCAL_SITE_FILE
        if local.is_file():
            raw, source = _read_yaml(local), str(local)
    if raw is None:
        return SiteSetup(site=site, synthetic=dict(DEFAULT_SYNTHETIC))
    overrides, synthetic = _overrides_from(raw, source)
    setup = SiteSetup(site=site, overrides=overrides, source=source, synthetic=synthetic)
    has_root = any(o.startswith("data.root=") and o.split("=", 1)[1] not in ("", "''", '""', "null") for o in overrides)
    has_datalist = any(o.startswith("data.datalist=") and o.split("=", 1)[1] not in ("", "null") for o in overrides)
    if not has_root and not has_datalist and setup.synthetic is None:
        setup.synthetic = dict(DEFAULT_SYNTHETIC)
    if has_root or has_datalist:
        setup.synthetic = None
    return setup


def prepare_site_data(setup: SiteSetup, dataset: str, workspace: str | os.PathLike) -> list[str]:
    """Synthesise the site's data set if it asks for one (or has none); return the overrides that point at it.

    ``dataset`` is the job's (``ukb``, ``brats`` or ``atlas``, after the site's own overrides), so a
    Stage 2/3 BraTS job's site synthesises BraTS-like cases with tumour labels, an ATLAS job's
    site ATLAS-like T1w images with lesion masks. The set is written once under
    ``<workspace>/bsf_data/`` and reused by later runs.
    """
    if setup.synthetic is None:
        return list(setup.overrides)
    from bsf.data.synth import synthesize  # heavy import only when needed

    subjects = int(setup.synthetic["subjects"])
    spacing = float(setup.synthetic["spacing"])
    seed = int(setup.synthetic.get("seed") if setup.synthetic.get("seed") is not None else site_seed(setup.site))
    out = Path(workspace) / SYNTH_FOLDER / f"synthetic-{dataset}-n{subjects}-s{spacing:g}-seed{seed}"
    marker = out / ".complete"
    if marker.is_file():
        log.info("site %s: no data configured; reusing its synthetic %s set in %s", setup.site, dataset, out)
    else:
        log.warning(
            "site %s: no data configured (%s); SYNTHESISING %d %s-like subjects at %g mm (seed %d) in %s",
            setup.site, setup.source, subjects, dataset, spacing, seed, out,
        )
        synthesize(dataset, subjects, out, spacing=spacing, seed=seed)
        marker.write_text("ok\n")
    return [*setup.overrides, f"data.dataset={dataset}", f"data.root={out}", "data.datalist=null"]
