"""Write a site's (or the server's) ``local/`` policies into a startup kit, and check a site config for it.

Used at provisioning (:class:`bsf.fl.deploy.builder.BSFKitBuilder`, from ``project.yml``) and by a site
admin on a kit they received (``bsf deploy site-kit KIT --site-config sites/ukb.yaml``). The files:

* ``local/resources.json``: NVFlare's ``resources.json.default`` + GPUs + this project's classes;
* ``local/privacy.json``: the result guard (and an optional differential-privacy filter);
* ``local/authorization.json``: BYOC jobs only from the project admin and ``lead`` users;
* ``local/bsf_site.yaml``: the site's data configuration (validated exactly as the site will read it);
* ``local/comm_config.json`` (server and sites, when provisioned for a link speed): NVFlare's byte-streaming
  retry and acknowledgement timeouts for that link (:func:`write_comm_config`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from bsf.errors import ConfigError
from bsf.fl.deploy.policies import authorization_policy, extend_allow_list, privacy_policy, set_gpu_resources
from bsf.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

RESOURCES = "resources.json"
RESOURCES_DEFAULT = "resources.json.default"
PRIVACY = "privacy.json"
AUTHORIZATION = "authorization.json"
COMM_CONFIG = "comm_config.json"


def _read_resources(local: Path) -> dict[str, Any]:
    for name in (RESOURCES, RESOURCES_DEFAULT):
        path = local / name
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    raise ConfigError(f"{local}: neither {RESOURCES} nor {RESOURCES_DEFAULT} (is this a provisioned startup kit?)")


def check_site_config(path: str | os.PathLike, site: str) -> str:
    """Validate a site YAML as the site's client will read it (keys, and values merged into the default run config);
    returns a one-line summary, ending with the modalities the site holds (``data.modalities``, default its data
    set's full set: what it feeds a modality-aware model)."""
    from bsf.data.transforms import held_modalities
    from bsf.federation.site_config import ENV_SITE_CONFIG, load_with_site, resolve_site

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"site config {path}: no such file")
    site_config = resolve_site(site, workspace=None, environ={ENV_SITE_CONFIG: str(path)})
    data = load_with_site(None, site_config).data
    held = f"modalities {', '.join(held_modalities(data))}"
    if site_config.synthesises:
        return (f"{path}: no data root or datalist; the site will SYNTHESISE {site_config.synthetic.subjects} "
                f"{data.dataset}-like subjects; {held}")
    named = {key: site_config.setting(key) for key in ("data.dataset", "data.root", "data.datalist")}
    return f"{path}: " + ", ".join(f"{key}={value}" for key, value in named.items() if value is not None) + f"; {held}"


def write_client_local(
    local: str | os.PathLike, site: str, site_config: str | os.PathLike | None = None,
    num_gpus: int | None = None, gpu_mem_gib: float | None = None, dp: str = "none",
) -> list[Path]:
    """Write a client kit's ``local/`` policies (see module docstring); returns the files written."""
    local = Path(local)
    if not local.is_dir():
        raise ConfigError(f"{local}: no such folder (expected a startup kit's local/ folder)")
    resources = extend_allow_list(_read_resources(local))
    if num_gpus is not None:
        resources = set_gpu_resources(resources, num_gpus, gpu_mem_gib or 0)
    written = [local / RESOURCES, local / PRIVACY, local / AUTHORIZATION]
    atomic_write_json(resources, local / RESOURCES)
    atomic_write_json(privacy_policy(dp), local / PRIVACY)
    atomic_write_json(authorization_policy(), local / AUTHORIZATION)
    if site_config is not None:
        from bsf.federation.site_config import LOCAL_SITE_FILE

        log.info("site %s: %s", site, check_site_config(site_config, site))
        with atomic_path(local / LOCAL_SITE_FILE) as tmp:
            shutil.copyfile(site_config, tmp)
        written.append(local / LOCAL_SITE_FILE)
    return written


def write_server_local(local: str | os.PathLike, heartbeat_timeout: float | None = None) -> list[Path]:
    """The server kit's resources: this project's classes, optionally the client heartbeat timeout.

    Written to ``resources.json`` and to ``resources.json.default`` too: NVFlare's POC mode rebuilds the
    server's ``resources.json`` from the default file (to point its storage into the POC workspace).
    """
    local = Path(local)
    resources = extend_allow_list(_read_resources(local))
    if heartbeat_timeout is not None:
        for server in resources.get("servers", []):
            server["heart_beat_timeout"] = heartbeat_timeout
    for name in (RESOURCES, RESOURCES_DEFAULT):
        atomic_write_json(resources, local / name)
    return [local / RESOURCES, local / RESOURCES_DEFAULT]


def write_comm_config(local: str | os.PathLike, uplink_mbit: float) -> Path:
    """Set NVFlare's byte-streaming timeouts for a ``uplink_mbit`` link in a kit's ``local/comm_config.json``
    (:func:`bsf.federation.payload.streaming_timeouts`; other keys already there are kept). NVFlare's server,
    client and job processes read it from their workspace (``CommConfigurator``); returns the file."""
    from bsf.federation.payload import streaming_timeouts

    path = Path(local) / COMM_CONFIG
    config: dict[str, Any] = {}
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    timeouts = streaming_timeouts(uplink_mbit)
    config.update(timeouts.comm_config())
    atomic_write_json(config, path)
    log.info("%s: streaming timeouts for %g Mbit/s (%.0f s in flight per window): %s", path, uplink_mbit,
             timeouts.in_flight_seconds, timeouts.comm_config())
    return path


def prepare_site_kit(kit: str | os.PathLike, site_config: str | os.PathLike, num_gpus: int = 0,
                     gpu_mem_gib: float = 0, dp: str = "none") -> list[Path]:
    """A site admin's step: make a received startup kit this project's site, with its data configuration."""
    kit = Path(kit)
    fed_client = kit / "startup" / "fed_client.json"
    if not fed_client.is_file():
        raise ConfigError(f"{kit}: not a client startup kit (no startup/fed_client.json)")
    site = kit.name
    try:
        site = json.loads(fed_client.read_text())["client"].get("fqsn") or site
    except (json.JSONDecodeError, KeyError, TypeError):
        pass
    return write_client_local(kit / "local", site, site_config, num_gpus, gpu_mem_gib, dp)
