"""A real NVFlare deployment on this machine (POC mode): provisioned kits, server and client processes, mTLS.

:class:`PocDeployment` drives NVFlare's own tools: ``nvflare poc prepare -i project.yml`` provisions
the kits from a project file derived from ``provisioning/project.yml`` (same builders, so the same
site policies; the server on free local ports; the requested sites), ``nvflare poc start -p NAME``
starts each participant (each in its own session so one site can be stopped alone), and the admin
API (``new_secure_session``) submits jobs, waits for them and downloads their results.
``nvflare poc stop`` stops everything; whatever still runs afterwards (or after a failure) is ended
by process id (:mod:`bsf.fl.deploy.processes`). Use it as a context manager::

    with PocDeployment(root, sites=["site-1", "site-2"]) as poc:
        poc.start()
        job_id = poc.submit(job_folder)
        poc.wait(job_id)
        run = poc.download(job_id, out)   # the server's run folder: app_server/FL_global_model.pt, ...
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from bsf.fl.deploy.processes import is_alive, kill_under, processes_under
from bsf.errors import BSFError

log = logging.getLogger(__name__)

PROJECT_FILE = Path(__file__).resolve().parents[3] / "provisioning" / "project.yml"
POC_PROJECT = "bsfpoc"
SERVER = "server"
#: NVFlare's builder of the TenSEAL contexts (the server's without the secret key); before the signature builder
HE_BUILDER = "nvflare.lighter.impl.he.HEBuilder"
SIGNATURE_BUILDER = "nvflare.lighter.impl.signature.SignatureBuilder"


class DeploymentError(BSFError):
    """The local deployment could not be prepared, started or driven; the message says which step and site."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on the loopback interface right now."""
    sockets, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def with_he_builder(builders: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``builders`` with NVFlare's :data:`HE_BUILDER` (once), before the signature builder so the contexts are signed."""
    out = [dict(b) for b in builders]
    if any(b.get("path") == HE_BUILDER for b in out):
        return out
    paths = [b.get("path") for b in out]
    at = paths.index(SIGNATURE_BUILDER) if SIGNATURE_BUILDER in paths else len(out)
    out.insert(at, {"path": HE_BUILDER, "args": {}})
    return out


def poc_project(
    template: Mapping[str, Any], sites: Sequence[str], ports: tuple[int, int],
    site_configs: Mapping[str, str] | None = None, heartbeat_timeout: float | None = None, he: bool = False,
    server_host: str | None = None, uplink_mbit: float | None = None,
) -> dict[str, Any]:
    """The project file for a local deployment: ``template``'s builders and admin, a ``server`` on ``ports``
    (federated learning, admin), CPU clients named ``sites`` (with ``site_configs[site]`` as their data config);
    ``he``: also the TenSEAL contexts of encrypted jobs (:func:`with_he_builder`); ``server_host``: the sites reach
    the server at that host name (in its certificate too) instead of ``localhost``; ``heartbeat_timeout``,
    ``uplink_mbit``: the project builder's arguments (:class:`bsf.fl.deploy.builder.BSFKitBuilder`)."""
    project = copy.deepcopy(dict(template))
    admins = [p for p in project.get("participants", []) if p.get("type") == "admin"]
    if not admins:
        raise DeploymentError("the project template has no admin participant")
    participants: list[dict[str, Any]] = [
        {"name": SERVER, "type": "server", "org": "consortium", "fed_learn_port": ports[0], "admin_port": ports[1]}
    ]
    if server_host:
        participants[0]["host_names"] = [server_host]
    for i, site in enumerate(sites):
        entry: dict[str, Any] = {"name": site, "type": "client", "org": f"org{i + 1}"}
        if server_host:
            entry["connect_to"] = {"host": server_host}
        if site_configs and site_configs.get(site):
            entry["bsf_site_config"] = str(Path(site_configs[site]).resolve())
        participants.append(entry)
    participants.append(admins[0])
    project.update(name=POC_PROJECT, participants=participants)
    if he:
        project["builders"] = with_he_builder(project.get("builders", []))
    builder_args = {k: v for k, v in (("heartbeat_timeout", heartbeat_timeout), ("uplink_mbit", uplink_mbit))
                    if v is not None}
    for builder in project.get("builders", []):
        if builder_args and builder.get("path") == "bsf.fl.deploy.builder.BSFKitBuilder":
            builder.setdefault("args", {}).update(builder_args)
    return project


class PocDeployment:
    """Server + sites as real NVFlare processes on this machine (see module docstring).

    Args:
        root: folder for everything (kits, workspaces, logs); its own ``home/`` keeps NVFlare's user config.
        sites: client names.
        site_configs: site -> site YAML (copied into the kit as ``local/bsf_site.yaml``); none: synthetic data.
        project: the project file whose builders and admin are used.
        heartbeat_timeout: seconds before the server drops a silent site.
        env: extra environment for every process (e.g. ``OMP_NUM_THREADS``, ``NVFLARE_*`` settings).
        he: provision the TenSEAL contexts, for jobs with ``federation.encryption: he``.
        server_host: the host name the sites connect to (default ``localhost``), e.g. the server's address on a
            shaped link (``benchmarks/shaped_link.py``).
        launchers: participant -> command prefix its start runs under (e.g. ``["ip", "netns", "exec", "ns1"]``).
        uplink_mbit: the sites' link (Mbit/s): every kit's ``local/comm_config.json`` gets NVFlare's streaming
            timeouts for it (:func:`bsf.fl.deploy.kit.write_comm_config`); none: NVFlare's defaults.
    """

    def __init__(
        self, root: str | os.PathLike, sites: Sequence[str] = ("site-1", "site-2"),
        site_configs: Mapping[str, str] | None = None, project: str | os.PathLike = PROJECT_FILE,
        heartbeat_timeout: float | None = None, env: Mapping[str, str] | None = None, he: bool = False,
        server_host: str | None = None, launchers: Mapping[str, Sequence[str]] | None = None,
        uplink_mbit: float | None = None,
    ):
        self.root = Path(root).resolve()
        self.sites = list(sites)
        self.site_configs = dict(site_configs or {})
        self.project_template = Path(project)
        self.heartbeat_timeout = heartbeat_timeout
        self.he = he
        self.server_host = server_host
        self.uplink_mbit = uplink_mbit
        self.launchers = {name: list(prefix) for name, prefix in (launchers or {}).items()}
        self.workspace = self.root / "poc"
        self.env = dict(os.environ)
        self.env.update(
            HOME=str(self.root / "home"), NVFLARE_POC_WORKSPACE=str(self.workspace),
            PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        )
        self.env.update(env or {})
        self.admin = ""
        self.ports: tuple[int, int] = (0, 0)
        self._session = None

    # ------------------------------------------------------------------ paths
    @property
    def nvflare(self) -> str:
        return str(Path(sys.executable).with_name("nvflare"))

    @property
    def prod(self) -> Path:
        return self.workspace / POC_PROJECT / "prod_00"

    def kit(self, name: str) -> Path:
        """A participant's startup kit (and, in POC mode, its workspace)."""
        return self.prod / name

    # ------------------------------------------------------------------ steps
    def _run(self, args: list[str], step: str, timeout: float = 120) -> str:
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise DeploymentError(f"{step} failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
        return proc.stdout

    def prepare(self) -> Path:
        """Provision the kits (``nvflare poc prepare -i``); returns the project file used."""
        if not self.project_template.is_file():
            raise DeploymentError(f"project file {self.project_template}: no such file")
        template = yaml.safe_load(self.project_template.read_text())
        self.admin = next(p["name"] for p in template["participants"] if p.get("type") == "admin")
        self.ports = tuple(free_ports(2))
        project = poc_project(template, self.sites, self.ports, self.site_configs, self.heartbeat_timeout, he=self.he,
                              server_host=self.server_host, uplink_mbit=self.uplink_mbit)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "home").mkdir(exist_ok=True)
        project_file = self.root / "project.yml"
        project_file.write_text(yaml.safe_dump(project, sort_keys=False))
        self._run([self.nvflare, "poc", "prepare", "-i", str(project_file), "--force"], "nvflare poc prepare")
        log.info("POC kits in %s (server ports %s)", self.prod, self.ports)
        return project_file

    def _clear_stale_pid_files(self, name: str) -> None:
        """Remove pid files of a participant that was killed (its start script refuses to run beside them)."""
        for file_name in ("daemon_pid.fl", "pid.fl"):
            path = self.kit(name) / file_name
            try:
                pid = int(path.read_text().strip())
            except (OSError, ValueError):
                pid = None
            if path.is_file() and (pid is None or not is_alive(pid)):
                path.unlink()

    def _wait_ports_free(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while True:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        s.bind(("127.0.0.1", port))
                        break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise DeploymentError(f"server port {port} is still in use after {timeout:.0f} s") from None
                time.sleep(0.5)

    def start_participant(self, name: str) -> None:
        """Start one participant (``nvflare poc start -p NAME``) in a session of its own."""
        if processes_under(self.kit(name)):
            raise DeploymentError(f"{name} is already running (processes {processes_under(self.kit(name))})")
        self._clear_stale_pid_files(name)
        if name == SERVER:
            self._wait_ports_free()
        log_file = open(self.root / f"start_{name}.log", "a")
        with log_file:
            proc = subprocess.Popen(
                [*self.launchers.get(name, []), self.nvflare, "poc", "start", "-p", name, "--no-wait"], env=self.env,
                start_new_session=True,
                stdout=log_file, stderr=subprocess.STDOUT,
            )
            if proc.wait(timeout=120) != 0:
                raise DeploymentError(f"nvflare poc start -p {name} failed; see {log_file.name}")

    def start(self, timeout: float = 180) -> None:
        """Start the server, then every site; return once all sites are connected."""
        self.start_participant(SERVER)
        for site in self.sites:
            self.start_participant(site)
        self.wait_for_sites(self.sites, timeout)

    def session(self):
        """The lead's admin session (mutual TLS with the lead's certificate), opened once."""
        if self._session is None:
            from nvflare.fuel.flare_api.flare_api import new_secure_session

            self._session = new_secure_session(self.admin, str(self.kit(self.admin)), timeout=120)
        return self._session

    def connected_sites(self) -> list[str]:
        return sorted(c.name for c in self.session().get_connected_client_list())

    def wait_for_sites(self, sites: Sequence[str], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            connected = self.connected_sites()
            if set(sites) <= set(connected):
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"sites {sorted(set(sites) - set(connected))} did not connect within {timeout:.0f} s; "
                                      f"see {self.prod}/<site>/log.txt")
            time.sleep(1)

    def submit(self, job_folder: str | os.PathLike) -> str:
        job_id = self.session().submit_job(str(job_folder))
        log.info("submitted %s as job %s", job_folder, job_id)
        return job_id

    def status(self, job_id: str) -> str:
        return str(self.session().get_job_meta(job_id).get("status", ""))

    def wait(self, job_id: str, timeout: float = 900, unanswered_s: float = 120) -> str:
        """Wait for a job to end; returns its final status (e.g. ``FINISHED:COMPLETED``).

        A status poll the server leaves unanswered (NVFlare's admin commands wait 5 s; a server relaying models
        over slow site links can take longer, seen at 10 Mbit/s in benchmarks/shaped_link.py) is retried; only
        ``unanswered_s`` seconds without any answer end the wait with NVFlare's ``NoConnection``.
        """
        from nvflare.fuel.flare_api.api_spec import JobTimeout, NoConnection

        deadline = time.monotonic() + timeout
        answered = time.monotonic()
        while True:
            try:
                status = self.status(job_id)
                answered = time.monotonic()
            except NoConnection:
                if time.monotonic() - answered > unanswered_s:
                    raise
                log.warning("job %s: the server did not answer a status poll; asking again", job_id)
                status = ""
            if status.startswith("FINISHED") or status == "ABORTED":  # NVFlare's terminal statuses
                return status
            if time.monotonic() > deadline:
                raise JobTimeout(f"job {job_id} did not finish within {timeout}s")
            time.sleep(2)

    def download(self, job_id: str, out: str | os.PathLike) -> Path:
        """Download a finished job's result; returns the server's run folder in it (``app_server/``, metrics, logs)."""
        out = Path(out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        folder = Path(self.session().download_job_result(job_id, str(out)))
        return folder / "workspace"

    # ------------------------------------------------------------------ faults and shutdown
    def kill(self, name: str) -> list[int]:
        """End a participant at once (its watchdog, its process and its job processes), as a crash would."""
        return kill_under(self.kit(name))

    def close_session(self) -> None:
        if self._session is not None:
            try:
                self._session.close()
            except Exception:  # the server may already be gone
                pass
            self._session = None

    def stop(self) -> None:
        """Stop everything: ``nvflare poc stop``, then end whatever is left by process id."""
        self.close_session()
        if processes_under(self.workspace):
            try:
                self._run([self.nvflare, "poc", "stop"], "nvflare poc stop", timeout=60)
            except (DeploymentError, subprocess.TimeoutExpired) as exc:
                log.warning("%s; ending the processes directly", exc)
        ended = kill_under(self.workspace)
        if ended:
            log.info("ended %d leftover process(es): %s", len(ended), ended)

    def __enter__(self) -> "PocDeployment":
        self.prepare()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
