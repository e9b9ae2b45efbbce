"""NVFlare provisioning builder that makes every kit of ``provisioning/project.yml`` a BrainSegFounder-FL kit.

List it in ``project.yml`` after NVFlare's ``StaticFileBuilder`` (which writes ``resources.json.default``)::

    - path: bsf.fl.deploy.builder.BSFKitBuilder
      args: {heartbeat_timeout: 120, uplink_mbit: 10}

Per client participant it reads these optional properties::

    - name: ukb-site
      type: client
      org: ukb
      capacity: {num_of_gpus: 1, mem_per_gpu_in_GiB: 40}   # NVFlare's own key: GPUs in resources.json
      bsf_site_config: sites/ukb.yaml                     # copied to local/bsf_site.yaml (relative to the current folder)
      bsf_privacy: none                                   # none | percentile | svt (differential privacy)

and writes ``local/resources.json``, ``privacy.json``, ``authorization.json`` (and ``bsf_site.yaml``);
see :mod:`bsf.fl.deploy.kit`. The server gets ``local/resources.json`` with this project's classes. With
``uplink_mbit`` (the slowest site link, Mbit/s) the server and every site also get ``local/comm_config.json`` with
NVFlare's byte-streaming timeouts for that link (:func:`bsf.fl.deploy.kit.write_comm_config`).
"""

from __future__ import annotations

from pathlib import Path

from nvflare.lighter.spec import Builder

from bsf.fl.deploy.kit import write_client_local, write_comm_config, write_server_local
from bsf.errors import ConfigError

PROP_SITE_CONFIG = "bsf_site_config"
PROP_PRIVACY = "bsf_privacy"


class BSFKitBuilder(Builder):
    """Adds this project's site policies to provisioned kits (see module docstring).

    Args:
        heartbeat_timeout: seconds without a client heartbeat before the server drops the client
            (NVFlare's default is 600); a lost site is noticed this much later.
        uplink_mbit: the slowest participant's link (Mbit/s); none: NVFlare's streaming defaults (fast links).
    """

    def __init__(self, heartbeat_timeout: float | None = None, uplink_mbit: float | None = None):
        self.heartbeat_timeout = heartbeat_timeout
        self.uplink_mbit = uplink_mbit

    def build(self, project, ctx):
        server = project.get_server()
        if server is not None:
            write_server_local(ctx.get_local_dir(server), self.heartbeat_timeout)
        if self.uplink_mbit is not None:
            for participant in ([server] if server is not None else []) + list(project.get_clients()):
                write_comm_config(ctx.get_local_dir(participant), self.uplink_mbit)
        for client in project.get_clients():
            site_config = client.get_prop(PROP_SITE_CONFIG)
            if site_config is not None and not Path(site_config).is_file():
                raise ConfigError(f"project.yml: {client.name}.{PROP_SITE_CONFIG}: {site_config} not found "
                                  f"(relative paths are read from {Path.cwd()})")
            write_client_local(
                ctx.get_local_dir(client), client.name, site_config, dp=client.get_prop(PROP_PRIVACY) or "none"
            )
