"""Which sites run a job: a real consortium runs each stage only at the sites holding its data.

The exported jobs deploy to every connected site (``@ALL``), right for the simulator and POC runs.
:func:`target_sites` rewrites a job folder's ``meta.json`` so the server and the named sites run it
(e.g. Stage 1 at ``ukb-site`` only, Stage 2/3 BraTS at ``brats-site-a`` and ``brats-site-b``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from bsf.errors import ConfigError

SERVER = "server"  # NVFlare's name for the server in a deploy map


def target_sites(job_dir: str | os.PathLike, sites: Sequence[str]) -> dict:
    """Deploy the job in ``job_dir`` to the server and ``sites`` only; returns the new ``meta.json``."""
    meta_path = Path(job_dir) / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"{job_dir}: no meta.json (not an exported job folder)")
    meta = json.loads(meta_path.read_text())
    sites = list(dict.fromkeys(sites))
    if not sites:
        raise ConfigError("name at least one site")
    if meta.get("min_clients", 1) > len(sites):
        raise ConfigError(
            f"{meta_path}: min_clients is {meta['min_clients']} but only {len(sites)} site(s) are named; "
            "export the job with --min-clients to match"
        )
    apps = list(meta.get("deploy_map", {"app": []}))
    if len(apps) != 1:
        raise ConfigError(f"{meta_path}: expected one app in deploy_map, found {apps}")
    meta["deploy_map"] = {apps[0]: [SERVER, *sites]}
    meta_path.write_text(json.dumps(meta, indent=4))
    return meta
