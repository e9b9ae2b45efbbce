"""Where a site's data lives: site configuration for real and simulated sites.

A *site config* is a small YAML file that says what data a site has and where, as run-config
sections merged into the job's run config, plus an optional synthetic-data request::

    data:                      # any keys of the run config's `data` section
      dataset: ukb
      root: /data/ukb          # the site's own files; never leave the site
      datalist: null
    train:                     # only the keys in SITE_TRAIN_KEYS
      device: auto
    overrides: []              # expert: extra dotted settings, e.g. ["data.transforms.spacing=[1.0, 1.0, 1.0]"]
    synthetic:                 # used only when neither data.root nor data.datalist is set
      subjects: 4
      spacing: 3.0
      scanner: {noise: 2.0}    # optional: a different scanner's look (bsf.data.synth.ScannerProfile)

It is read into a :class:`SiteConfig`: its top-level, ``data``, ``train`` and ``synthetic`` keys are checked
here (an unknown one is an error naming the file and the key); the values are type-checked by the run
config's own loader when :func:`load_with_site` sets them in the job's raw run-config mapping, before it
is validated (``bsf.config.load_config(settings=...)``), so nothing is re-encoded as text on the way.

A site finds its config, first match wins:

1. ``$BSF_SITE_CONFIG``: a site config, or a *site map* ``{sites: {<site>: <config or path>, "*": ...}}``
   (``simulator/sites.yaml`` is one; paths are relative to the map file);
2. ``<site workspace>/local/bsf_site.yaml`` (real sites: next to ``resources.json``);
3. nothing: the site synthesises a small data set of the job's kind for itself (the run config's
   ``data.dataset``: UKB-like for Stage 1, BraTS-like or ATLAS-like for Stages 2 and 3) in
   ``<site workspace>/bsf_data/synthetic-<dataset>-...``, seeded by its name, and logs that it did.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from bsf.config import DataConfig, RunConfig, load_config, parse_override
from bsf.errors import ConfigError

log = logging.getLogger(__name__)

ENV_SITE_CONFIG = "BSF_SITE_CONFIG"
LOCAL_SITE_FILE = "bsf_site.yaml"
SYNTH_FOLDER = "bsf_data"
SITE_KEYS = ("data", "train", "overrides", "synthetic")
SITE_DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataConfig))
SITE_TRAIN_KEYS = ("device", "precision", "progress", "log_every")
NO_SITE_CONFIG = "synthetic (no site configuration found)"


@dataclass(frozen=True)
class SyntheticData:
    """The small data set a site without data synthesises for itself (``synthetic:`` in its config)."""

    subjects: int = 4
    spacing: float = 3.0  # mm
    seed: int | None = None  # None: seeded by the site's name (:func:`site_seed`)
    scanner: Any = None  # a bsf.data.synth.ScannerProfile (None: the usual images)

    @classmethod
    def from_yaml(cls, raw: Any, origin: str) -> "SyntheticData":
        """Check the ``synthetic:`` mapping of the site config ``origin``; a bad key or value is named."""
        if raw is None:
            return cls()
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(raw, Mapping):
            raise ConfigError(f"site config {origin}: 'synthetic' must be a mapping of {', '.join(names)}")
        _refuse_unknown(raw, names, origin, "synthetic")
        synthetic = cls(**raw)
        checks = [
            (_is_int(synthetic.subjects) and synthetic.subjects >= 1, "subjects", "a whole number >= 1"),
            (_is_number(synthetic.spacing) and synthetic.spacing > 0, "spacing", "a number of mm > 0"),
            (synthetic.seed is None or (_is_int(synthetic.seed) and synthetic.seed >= 0), "seed", "a whole number >= 0 or null"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(f"site config {origin}: synthetic.{key} must be {expected}, got {getattr(synthetic, key)!r}")
        if synthetic.scanner is not None:
            from bsf.data.synth import ScannerProfile  # heavy import only when a site sets one

            try:
                synthetic = dataclasses.replace(synthetic, scanner=ScannerProfile.from_mapping(synthetic.scanner))
            except ConfigError as exc:
                raise ConfigError(f"site config {origin}: synthetic.{exc}") from None
        return dataclasses.replace(synthetic, spacing=float(synthetic.spacing))

    def seed_for(self, site: str) -> int:
        """The seed of ``site``'s set: the configured one, else one derived from the site's name."""
        return site_seed(site) if self.seed is None else self.seed


@dataclass(frozen=True)
class SiteConfig:
    """One site's configuration, checked: what it sets in the job's run config, and where it came from.

    ``data`` and ``train`` are the site's sections (``train`` only :data:`SITE_TRAIN_KEYS`); ``overrides``
    maps the expert ``overrides:`` list's dotted keys to their parsed values. :meth:`settings` merges the
    three, in that order, as ``dotted.key -> value`` for :func:`bsf.config.load_config`.
    """

    site: str
    data: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    synthetic: SyntheticData = field(default_factory=SyntheticData)
    source: str = NO_SITE_CONFIG

    def settings(self) -> dict[str, Any]:
        """``dotted.key -> value`` of everything the site sets, in the order they are applied."""
        merged: dict[str, Any] = {}
        pairs = [*((f"data.{k}", v) for k, v in self.data.items()), *((f"train.{k}", v) for k, v in self.train.items()),
                 *self.overrides.items()]
        for key, value in pairs:
            _assign(merged, key, value)
        return merged

    def setting(self, key: str) -> Any:
        """The value the site sets for the dotted ``key`` (e.g. ``data.root``), or None if it sets none."""
        return self.settings().get(key)

    @property
    def synthesises(self) -> bool:
        """True when the site points at no data (neither ``data.root`` nor ``data.datalist``): it makes its own."""
        return not self.setting("data.root") and not self.setting("data.datalist")

    def with_overrides(self, items: Sequence[str]) -> "SiteConfig":
        """This config with ``section.key=value`` strings (e.g. a command line's) added after its own overrides."""
        overrides = dict(self.overrides)
        for item in items:
            _assign(overrides, *parse_override(item))
        return dataclasses.replace(self, overrides=overrides)


def site_seed(site: str) -> int:
    """A stable seed from a site name (the same on every machine and Python version)."""
    return zlib.crc32(site.encode("utf-8")) & 0x7FFFFFFF


def _assign(settings: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` last in ``settings``: a later setting of a key is also applied after everything before it."""
    settings.pop(key, None)
    settings[key] = value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refuse_unknown(section: Mapping[str, Any], valid: Sequence[str], origin: str, prefix: str) -> None:
    unknown = sorted(set(section) - set(valid), key=str)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"site config {origin}: unknown config key {key} (valid in this section: {', '.join(valid)})")


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"site config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"site config {path}: is a folder, expected a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"site config {path}: not a text (UTF-8) file") from None
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


def _section(raw: Mapping[str, Any], name: str, origin: str) -> Mapping[str, Any]:
    section = raw.get(name) or {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"site config {origin}: '{name}' must be a mapping")
    return section


def _parse_overrides(raw: Any, origin: str) -> dict[str, Any]:
    """The ``overrides:`` list as ``dotted.key -> parsed value`` (each string parsed once)."""
    items = raw or []
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ConfigError(f"site config {origin}: 'overrides' must be a list of 'section.key=value' strings")
    parsed: dict[str, Any] = {}
    for item in items:
        try:
            _assign(parsed, *parse_override(item))
        except ConfigError as exc:
            raise ConfigError(f"site config {origin}: {exc}") from None
    return parsed


def site_config_from(raw: Any, site: str, origin: str) -> SiteConfig:
    """Check a site config's mapping (read from ``origin``, named in every error) and type it."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"site config {origin}: top level must be a mapping")
    _refuse_unknown(raw, SITE_KEYS, origin, "")
    data = _section(raw, "data", origin)
    _refuse_unknown(data, SITE_DATA_KEYS, origin, "data")
    train = _section(raw, "train", origin)
    for key in train:
        if key not in SITE_TRAIN_KEYS:
            raise ConfigError(
                f"site config {origin}: train.{key} cannot be set per site (allowed: {', '.join(SITE_TRAIN_KEYS)})"
            )
    return SiteConfig(
        site=site, data=dict(data), train=dict(train), overrides=_parse_overrides(raw.get("overrides"), origin),
        synthetic=SyntheticData.from_yaml(raw.get("synthetic"), origin), source=origin,
    )


def resolve_site(site: str, workspace: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None) -> SiteConfig:
    """Find and check ``site``'s configuration (see the module docstring for the order)."""
    environ = os.environ if environ is None else environ
    env_path = environ.get(ENV_SITE_CONFIG)
    if env_path:
        path = Path(env_path).expanduser()
        loaded = _read_yaml(path)
        if not (isinstance(loaded, Mapping) and "sites" in loaded):
            return site_config_from(loaded, site, f"{path} (from ${ENV_SITE_CONFIG})")
        picked = _select_from_map(loaded, site, path)
        if picked is not None:
            return site_config_from(picked[0], site, picked[1])
        log.info("site %s is not listed in %s=%s", site, ENV_SITE_CONFIG, path)
    if workspace is not None:
        local = Path(workspace) / "local" / LOCAL_SITE_FILE
        if local.is_file():
            return site_config_from(_read_yaml(local), site, str(local))
    return SiteConfig(site=site)


def load_with_site(
    source: str | os.PathLike | None, site: SiteConfig, settings: Mapping[str, Any] | None = None
) -> RunConfig:
    """The run config ``source`` (a YAML path or preset) with ``site``'s settings, then ``settings``, merged in.

    Everything is set in the raw run-config mapping and validated once by :func:`bsf.config.load_config`;
    an error names the site config as well. ``source`` None (no job to compare with): the defaults, with
    ``model.in_channels`` taken from the site's ``data.modalities`` when it names them.
    """
    merged = site.settings()
    modalities = merged.get("data.modalities")
    if source is None and isinstance(modalities, list) and modalities:
        merged = {"model.in_channels": len(modalities), **merged}
    for key, value in (settings or {}).items():
        _assign(merged, key, value)
    try:
        return load_config(source, settings=merged)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (run config {source or 'defaults'} with site config {site.source})") from None


def prepare_site_data(site: SiteConfig, dataset: str, workspace: str | os.PathLike) -> SiteConfig:
    """Synthesise the site's data set if it points at none; return the site config pointing at it.

    ``dataset`` is the job's (``ukb``, ``brats`` or ``atlas``, after the site's own settings), so a
    Stage 2/3 BraTS job's site synthesises BraTS-like cases with tumour labels, an ATLAS job's
    site ATLAS-like T1w images with lesion masks. The set is written once under
    ``<workspace>/bsf_data/`` and reused by later runs. A site with data is returned as it is.
    """
    if not site.synthesises:
        return site
    from bsf.data.synth import DEFAULT_SCANNER, synthesize  # heavy import only when needed
    from bsf.io import atomic_write_text

    synthetic = site.synthetic
    seed = synthetic.seed_for(site.site)
    scanner = synthetic.scanner or DEFAULT_SCANNER
    name = f"synthetic-{dataset}-n{synthetic.subjects}-s{synthetic.spacing:g}-seed{seed}{scanner.tag}"
    out = Path(workspace) / SYNTH_FOLDER / name
    marker = out / ".complete"
    if marker.is_file():
        log.info("site %s: no data configured; reusing its synthetic %s set in %s", site.site, dataset, out)
    else:
        log.warning(
            "site %s: no data configured (%s); SYNTHESISING %d %s-like subjects at %g mm (seed %d) in %s",
            site.site, site.source, synthetic.subjects, dataset, synthetic.spacing, seed, out,
        )
        synthesize(dataset, synthetic.subjects, out, spacing=synthetic.spacing, seed=seed, scanner=scanner)
        atomic_write_text("ok\n", marker)
    data = {**site.data, "dataset": dataset, "root": str(out), "datalist": None}
    return dataclasses.replace(site, data=data)
