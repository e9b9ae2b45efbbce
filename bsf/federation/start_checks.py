"""Refuse a federated job that cannot run before round 0, in one line: too few sites for its ``min_clients``, and
(where the sites' configurations are visible, as in a simulation) a site whose configuration does not load.

A job's site configuration error would otherwise surface inside NVFlare, at every site and round, as tracebacks;
a job with fewer sites than ``min_clients`` would train every round and never aggregate one.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from bsf.errors import ConfigError
from bsf.federation.site_config import load_with_site, resolve_site


def check_site_count(job: str, min_clients: int, sites: Sequence[str], how: str = "") -> None:
    """:class:`ConfigError` unless at least ``min_clients`` sites take part; ``how`` says how to give more."""
    if len(sites) < min_clients:
        given = f"{len(sites)} site{'s' if len(sites) != 1 else ''}" + (f" ({', '.join(sites)})" if sites else "")
        more = f"give {min_clients} sites{f' ({how})' if how else ''}"
        raise ConfigError(f"job {job}: federation.min_clients={min_clients} but {given} take part; {more}, or lower federation.min_clients")


def check_site_configs(job: str, run_config: str | os.PathLike, sites: Sequence[str], environ: Mapping[str, str] | None = None) -> None:
    """Load ``run_config`` with each site's configuration as the site will (:func:`resolve_site`, then
    :func:`load_with_site`); the first that fails is a :class:`ConfigError` naming the job, the site and the key."""
    for site in sites:
        try:
            load_with_site(run_config, resolve_site(site, environ=environ))
        except ConfigError as exc:
            raise ConfigError(f"job {job}: site {site} cannot start: {exc}") from None
