"""Issue 14: the real POC (server + N site processes, NVFlare over mutual TLS) with every site behind a shaped link.

Topology (Linux network namespaces; needs root, ``ip`` and ``tc``)::

    namespace <tag>_srv: the NVFlare server, the lead's admin session and this script's measuring half
        veth <tag>h<i>  10.251.<i>.1/30  --- tc tbf at --uplink-mbit (server -> site i: the site's download)
    namespace <tag>_s<i>: site-<i>'s NVFlare client and its job processes
        veth <tag>s<i>  10.251.<i>.2/30  --- tc tbf at --uplink-mbit (site i -> server: the site's upload)

The sites reach the server as ``server`` (``/etc/netns/<tag>_s<i>/hosts``; the kits are provisioned with
``connect_to: server`` and the name in the server's certificate), so every byte between a site and the server
crosses that site's shaped veth pair. Bytes on the wire are the veth's own counters (``/proc/net/dev`` of the
server's namespace, cross-checked against ``ip -s link`` in each site's namespace at the end): IP packets, so
TCP/TLS, gRPC and NVFlare framing included, nothing computed from tensor sizes.

Per round and site it reports the round's wall time (the server log's ``Round N started`` to the next), the
site's own seconds in it (load the global model, validate it, train: ``bsf_site/train_log.jsonl``), the bytes
down and up on the veth and the seconds the link was busy each way (0.5 s samples above 5 % of the link rate),
and the peak RSS (``VmHWM``) of the server's and each site's processes (parent and job process).

    nice -n 10 .venv/bin/python benchmarks/shaped_link.py --uplink-mbit 100 --rounds 2 --out /tmp/bsf_shaped
    nice -n 10 .venv/bin/python benchmarks/shaped_link.py --uplink-mbit 10 --plan-only   # what the job needs

The namespaces, veths and hosts files are removed on exit, also after Ctrl-C or a failure (``try/finally`` in
the outer half, which runs the measuring half as ``ip netns exec <tag>_srv python shaped_link.py --inner``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SUBNET = "10.251"
SERVER_HOST = "server"
JOB = "stage3_brats"
NETNS_ETC = Path("/etc/netns")
SAMPLE_S = 0.5
BUSY_FRACTION = 0.05  # a sample interval counts as transfer time above this share of the link rate


# ---------------------------------------------------------------------------------------------- the link
@dataclass(frozen=True)
class Topology:
    """Names of one run's namespaces and interfaces (``tag`` keeps concurrent runs apart)."""

    tag: str
    n_sites: int

    @property
    def server_ns(self) -> str:
        return f"{self.tag}_srv"

    def site_ns(self, i: int) -> str:
        return f"{self.tag}_s{i}"

    def site_dev(self, i: int) -> str:  # the site's end (<= 15 characters)
        return f"{self.tag}s{i}"

    def server_dev(self, i: int) -> str:  # the server's end of site i's link
        return f"{self.tag}h{i}"

    def server_ip(self, i: int) -> str:
        return f"{SUBNET}.{i}.1"

    def site_ip(self, i: int) -> str:
        return f"{SUBNET}.{i}.2"

    @property
    def sites(self) -> list[str]:
        return [f"site-{i}" for i in range(1, self.n_sites + 1)]


def _sh(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def shape(ns: str, dev: str, mbit: float) -> None:
    """Token bucket at ``mbit`` on ``dev``'s egress (burst: 10 ms of the rate, at least 15 kB; 200 ms of queue)."""
    burst = max(15_000, int(mbit * 1e6 / 8 / 100))
    _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
        "burst", str(burst), "latency", "200ms")


def build(topo: Topology, mbit: float) -> None:
    """Create the namespaces, the shaped veth pairs and the sites' hosts files."""
    _sh("ip", "netns", "add", topo.server_ns)
    _sh("ip", "-n", topo.server_ns, "link", "set", "lo", "up")
    for i in range(1, topo.n_sites + 1):
        ns, sdev, hdev = topo.site_ns(i), topo.site_dev(i), topo.server_dev(i)
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", sdev, "type", "veth", "peer", "name", hdev)
        _sh("ip", "link", "set", sdev, "netns", ns)
        _sh("ip", "link", "set", hdev, "netns", topo.server_ns)
        _sh("ip", "-n", ns, "addr", "add", f"{topo.site_ip(i)}/30", "dev", sdev)
        _sh("ip", "-n", topo.server_ns, "addr", "add", f"{topo.server_ip(i)}/30", "dev", hdev)
        for n, d in ((ns, sdev), (ns, "lo"), (topo.server_ns, hdev)):
            _sh("ip", "-n", n, "link", "set", d, "up")
        shape(ns, sdev, mbit)
        shape(topo.server_ns, hdev, mbit)
        hosts = NETNS_ETC / ns / "hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(f"127.0.0.1 localhost\n{topo.server_ip(i)} {SERVER_HOST}\n")


def tear_down(topo: Topology) -> None:
    """Remove whatever :func:`build` made (deleting a namespace deletes its veth ends); never raises."""
    for ns in [topo.site_ns(i) for i in range(1, topo.n_sites + 1)] + [topo.server_ns]:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    if NETNS_ETC.is_dir() and not any(NETNS_ETC.iterdir()):
        NETNS_ETC.rmdir()


def link_counters(ns: str, dev: str) -> dict[str, int]:
    """``ip -s link`` of ``dev`` in ``ns``: bytes and packets each way, and the qdisc's drops."""
    stats = json.loads(_sh("ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev))[0]["stats64"]
    qdisc = json.loads(_sh("ip", "netns", "exec", ns, "tc", "-s", "-j", "qdisc", "show", "dev", dev))[0]
    return {"rx_bytes": stats["rx"]["bytes"], "tx_bytes": stats["tx"]["bytes"],
            "rx_packets": stats["rx"]["packets"], "tx_packets": stats["tx"]["packets"],
            "tbf_drops": qdisc.get("drops", 0)}


# ---------------------------------------------------------------------------------------------- measuring
def net_dev() -> dict[str, tuple[int, int]]:
    """This namespace's interfaces: name -> (rx bytes, tx bytes)."""
    out = {}
    for line in Path("/proc/self/net/dev").read_text().splitlines()[2:]:
        name, data = line.split(":", 1)
        fields = data.split()
        out[name.strip()] = (int(fields[0]), int(fields[8]))
    return out


def vm_hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Every :data:`SAMPLE_S`: the server-side veth counters and each participant's processes' peak RSS."""

    def __init__(self, kits: dict[str, Path], devs: dict[str, str]):
        super().__init__(daemon=True)
        self.kits, self.devs = kits, devs
        self.series: list[tuple[float, dict[str, tuple[int, int]]]] = []
        self.peak_kib: dict[str, dict[str, int]] = {name: {"parent": 0, "job": 0} for name in kits}
        self._halt = threading.Event()

    def run(self) -> None:
        from bsf.fl.deploy.processes import processes_under

        while not self._halt.is_set():
            counters = net_dev()
            self.series.append((time.time(), {site: counters.get(dev, (0, 0)) for site, dev in self.devs.items()}))
            for name, kit in self.kits.items():
                for pid in processes_under(kit):
                    cmd = _cmdline(pid)
                    if "python" not in cmd:
                        continue  # the watchdog shell
                    kind = "job" if re.search(r"(client_train|server_train)\b", cmd) is None else "parent"
                    self.peak_kib[name][kind] = max(self.peak_kib[name][kind], vm_hwm_kib(pid))
            self._halt.wait(SAMPLE_S)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _log_time(line: str) -> float:
    return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def round_bounds(server_log: Path) -> list[tuple[float, float]]:
    """(start, end) of each round from the server's log: ``Round N started`` to the next one / ``Finished``."""
    lines = server_log.read_text(errors="replace").splitlines()
    stamped = [(i, ln) for i, ln in enumerate(lines) if re.match(r"\d{4}-\d\d-\d\d ", ln)]

    def stamp_before(index: int) -> float:
        return _log_time(next(ln for i, ln in reversed(stamped) if i < index))

    starts = [stamp_before(i) for i, ln in enumerate(lines) if re.search(r"Round \d+ started\.", ln)]
    ends = [stamp_before(i) for i, ln in enumerate(lines) if "Finished FedAvg" in ln] or [_log_time(stamped[-1][1])]
    return list(zip(starts, starts[1:] + ends[-1:]))


def window(series, site: str, start: float, end: float, mbit: float) -> dict[str, float]:
    """Bytes down/up on ``site``'s link within [start, end) and the seconds the link was busy each way."""
    inside = [(t, c[site]) for t, c in series if start - SAMPLE_S <= t <= end + SAMPLE_S]
    busy_bytes = BUSY_FRACTION * mbit * 1e6 / 8
    out = {"down_bytes": 0, "up_bytes": 0, "down_s": 0.0, "up_s": 0.0}
    for (t0, (rx0, tx0)), (t1, (rx1, tx1)) in zip(inside, inside[1:]):
        dt_s = t1 - t0
        down, up = tx1 - tx0, rx1 - rx0  # the server's end: it transmits the download, receives the upload
        out["down_bytes"] += down
        out["up_bytes"] += up
        out["down_s"] += dt_s if down > busy_bytes * dt_s else 0.0
        out["up_s"] += dt_s if up > busy_bytes * dt_s else 0.0
    return out


def site_seconds(kit: Path, job_id: str) -> dict[int, float]:
    path = kit / job_id / "bsf_site" / "train_log.jsonl"
    if not path.is_file():
        return {}
    return {int(e["round"]): float(e["seconds"]) for e in map(json.loads, path.read_text().splitlines()) if e}


# ---------------------------------------------------------------------------------------------- the job
def job_spec(args):
    """Stage 3 BraTS at ``--size`` with this run's rounds, steps, ROI, link and transfer dtype."""
    from bsf.fl.jobs import COMMITTED_JOBS

    base = COMMITTED_JOBS[JOB]
    overrides = [f"model.size={args.size}", f"data.roi=[{args.roi},{args.roi},{args.roi}]", "data.crops_per_volume=1",
                 *args.override]
    # Stage 3 from the seeded initialisation: no Stage 1/2 run first
    spec = replace(base, run_overrides=[*base.run_overrides, *overrides], require_pretrained=False)
    return spec.with_federation(
        rounds=args.rounds, local_steps=args.local_steps, min_clients=args.sites, cross_site_eval=False,
        uplink_mbit=args.uplink_mbit, transfer_dtype=args.transfer_dtype,
    )


def job_plan(spec) -> dict[str, float]:
    """What the job says it needs per site and round at its ``federation.uplink_mbit`` (as the export logs it)."""
    from bsf.engine import load_config
    from bsf.fl.jobs import job_run_config
    from bsf.federation.payload import round_bytes, streaming_timeouts, transfer_timeouts

    fed = spec.federation
    down, up = round_bytes(load_config(job_run_config(spec)), fed.scope, fed.transfer_dtype)
    t = transfer_timeouts(down, up, fed.uplink_mbit)
    return {"uplink_mbit": fed.uplink_mbit, "transfer_dtype": fed.transfer_dtype, "down_MB": down / 1e6,
            "up_MB": up / 1e6, "download_s": t.download_seconds, "upload_s": t.upload_seconds,
            "get_task_timeout_s": t.download, "submit_task_result_timeout_s": t.submit,
            "comm_config": streaming_timeouts(fed.uplink_mbit).comm_config()}


def inner(args) -> None:
    """Run in the server's namespace: the deployment, the job, the measurements; writes ``<out>/shaped_link.json``."""
    from bsf.fl.deploy.poc import PocDeployment
    from bsf.fl.jobs import export_job

    topo = Topology(args.tag, args.sites)
    out = Path(args.out).resolve()
    spec = job_spec(args)
    result = {"plan": job_plan(spec), "command": args.command, "sites": topo.sites}
    launchers = {site: ["ip", "netns", "exec", topo.site_ns(i)] for i, site in enumerate(topo.sites, 1)}
    began = time.time()
    with PocDeployment(out, sites=topo.sites, env={"OMP_NUM_THREADS": "1"}, server_host=SERVER_HOST,
                       launchers=launchers, uplink_mbit=args.uplink_mbit) as poc:
        kits = {name: poc.kit(name) for name in ["server", *topo.sites]}
        sampler = Sampler(kits, {site: topo.server_dev(i) for i, site in enumerate(topo.sites, 1)})
        sampler.start()
        try:
            poc.start()
            result["connected_s"] = time.time() - began
            job_id = poc.submit(export_job(spec, out / "jobs"))
            submitted = time.time()
            result["status"] = poc.wait(job_id, timeout=args.timeout)
            result["job_s"] = time.time() - submitted
            run_dir = poc.download(job_id, out / "results")
        finally:
            sampler.stop()
    bounds = round_bounds(run_dir / "log.txt")
    result["rounds"] = []
    for r, (start, end) in enumerate(bounds):
        entry = {"round": r, "wall_s": end - start, "sites": {}}
        for i, site in enumerate(topo.sites, 1):
            w = window(sampler.series, site, start, end, args.uplink_mbit)
            w["site_s"] = site_seconds(kits[site], job_id).get(r)
            entry["sites"][site] = w
        result["rounds"].append(entry)
    first, last = sampler.series[0][1], sampler.series[-1][1]
    result["total_bytes"] = {s: {"down": last[s][1] - first[s][1], "up": last[s][0] - first[s][0]} for s in topo.sites}
    result["peak_rss_GiB"] = {n: {k: v / 2**20 for k, v in p.items()} for n, p in sampler.peak_kib.items()}
    result["job_id"], result["run_dir"] = job_id, str(run_dir)
    (out / "shaped_link.json").write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------------------------- report
def table(result: dict) -> str:
    p = result["plan"]
    lines = [f"link {p['uplink_mbit']:g} Mbit/s each way, transfer_dtype {p['transfer_dtype']}: {result['status']}, "
             f"job {result['job_s']:.0f} s; peak RSS GiB (parent / job process): "
             + ", ".join(f"{n} {v['parent']:.2f} / {v['job']:.2f}" for n, v in result["peak_rss_GiB"].items()),
             "", "| round | site | round wall s | site s (load+validate+train) | down MB (wire) | down busy s "
             "| up MB (wire) | up busy s | rest of the round s |", "|---|---|---|---|---|---|---|---|---|"]
    for entry in result["rounds"]:
        for site, w in entry["sites"].items():
            site_s = w["site_s"]
            rest = entry["wall_s"] - (site_s or 0) - w["down_s"] - w["up_s"]
            lines.append(f"| {entry['round']} | {site} | {entry['wall_s']:.1f} | "
                         f"{'-' if site_s is None else f'{site_s:.1f}'} | {w['down_bytes'] / 1e6:.1f} | "
                         f"{w['down_s']:.1f} | {w['up_bytes'] / 1e6:.1f} | {w['up_s']:.1f} | {rest:.1f} |")
    return "\n".join(lines)


def plan_text(plan: dict) -> str:
    return (f"at {plan['uplink_mbit']:g} Mbit/s ({plan['transfer_dtype']} upload): {plan['down_MB']:.1f} MB down, "
            f"{plan['up_MB']:.1f} MB up per site and round -> {plan['download_s']:.1f} s + {plan['upload_s']:.1f} s "
            f"of transfer; get_task_timeout {plan['get_task_timeout_s']:.0f} s, submit_task_result_timeout "
            f"{plan['submit_task_result_timeout_s']:.0f} s; every kit's comm_config.json: {plan['comm_config']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--uplink-mbit", type=float, default=100.0, help="each site's link, both directions; also the "
                    "job's federation.uplink_mbit")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--size", default="small", help="model.size")
    ap.add_argument("--roi", type=int, default=64, help="data.roi edge (a multiple of 32, at least 64)")
    ap.add_argument("--transfer-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--override", action="append", default=[], help="further run-config overrides KEY=VALUE")
    ap.add_argument("--timeout", type=float, default=1500, help="seconds to wait for the job")
    ap.add_argument("--out", default="/tmp/bsf_shaped")
    ap.add_argument("--plan-only", action="store_true", help="print what the job needs at the link; run nothing")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default=f"bsl{os.getpid() % 10000}", help=argparse.SUPPRESS)
    ap.add_argument("--command", default=" ".join(sys.argv), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.inner:
        inner(args)
        return 0
    if args.plan_only:
        print(plan_text(job_plan(job_spec(args))))
        return 0
    out = Path(args.out).resolve()
    if out.exists():
        raise SystemExit(f"{out} exists; name a fresh --out")
    out.mkdir(parents=True)
    topo = Topology(args.tag, args.sites)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below
    try:
        build(topo, args.uplink_mbit)
        cmd = ["ip", "netns", "exec", topo.server_ns, sys.executable, str(Path(__file__).resolve()), "--inner",
               "--tag", args.tag, "--command", args.command, *(argv if argv is not None else sys.argv[1:])]
        rc = subprocess.run(cmd, cwd=REPO).returncode
        wire = {site: link_counters(topo.site_ns(i), topo.site_dev(i)) for i, site in enumerate(topo.sites, 1)}
    finally:
        from bsf.fl.deploy.processes import kill_under

        kill_under(out)
        tear_down(topo)
    result_file = out / "shaped_link.json"
    if rc != 0 or not result_file.is_file():
        print(f"the measuring half failed (exit {rc}); see {out}", file=sys.stderr)
        return rc or 1
    result = json.loads(result_file.read_text())
    result["site_side_counters"] = wire  # the site's end: tx = its upload, rx = its download (whole run)
    result_file.write_text(json.dumps(result, indent=2))
    print(plan_text(result["plan"]))
    print(table(result))
    print("site-side ip -s link (whole run): " + ", ".join(
        f"{s} down {c['rx_bytes'] / 1e6:.1f} MB up {c['tx_bytes'] / 1e6:.1f} MB, {c['tbf_drops']} packets dropped "
        "by its upload shaper" for s, c in wire.items()))
    return 0 if result["status"] == "FINISHED:COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
