"""Round overhead of a one-site federation with NVFlare's default polling and with shorter polling, vs centralized.

The same Stage 1 work (test-size model, synthetic UKB data, 1 site x R rounds x k local steps, no validation):
``Engine.train_steps(R * k)`` centrally, then ``nvflare simulator`` on the exported job, once with NVFlare's default
polling and once with the shorter polling below (which ``bsf.fl.jobs`` exports since issue 14), written into the
job's configs. Printed per variant: wall time, ratio to the
centralized run, per-round overhead (round wall time from the server log minus the site's own seconds in it), and
the fixed start-up + shut-down.

Settings of the ``fast`` variant (NVFlare 2.9 defaults in brackets):

* ``config_fed_server.json`` ``server.task_request_interval`` [2 s]: how long the server tells a site with no task
  to wait before asking again. After submitting a round's result the site asks for the next task before the server
  has aggregated, so every round waits for one of these intervals;
* ``config_fed_client.json`` ``default_task_fetch_interval`` [0.5 s]: the site's own wait before it hears the
  server's interval;
* the controller's ``task_check_period`` [0.5 s]: how often the server's workflow checks whether a round's tasks
  are done.

    .venv/bin/python benchmarks/round_overhead.py --rounds 3 --local-steps 2
    .venv/bin/python benchmarks/round_overhead.py --rounds 2 --local-steps 50 --variants fast
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fl_overhead import round_times  # noqa: E402  (the server-log parser, one copy)

POLLING = {
    "default": {"task_request_interval": 2.0, "default_task_fetch_interval": 0.5, "task_check_period": 0.5},
    "fast": {"task_request_interval": 0.1, "default_task_fetch_interval": 0.1, "task_check_period": 0.1},
}


def set_polling(job: Path, settings: dict[str, float]) -> None:
    """Write polling ``settings`` into an exported job folder."""
    server_file, client_file = job / "app/config/config_fed_server.json", job / "app/config/config_fed_client.json"
    server, client = json.loads(server_file.read_text()), json.loads(client_file.read_text())
    server.setdefault("server", {})["task_request_interval"] = settings["task_request_interval"]
    for workflow in server["workflows"]:
        workflow["args"]["task_check_period"] = settings["task_check_period"]
    client["default_task_fetch_interval"] = settings["default_task_fetch_interval"]
    server_file.write_text(json.dumps(server, indent=2))
    client_file.write_text(json.dumps(client, indent=2))


def simulate(job: Path, ws: Path, site_map: Path) -> tuple[float, str]:
    env = {**os.environ, "BSF_SITE_CONFIG": str(site_map)}
    started = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).with_name("nvflare")), "simulator", str(job), "-w", str(ws), "-n", "1", "-t", "1"],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or not (ws / "server/simulate_job/app_server/FL_global_model.pt").is_file():
        raise SystemExit(f"simulator run in {ws} failed:\n{log[-3000:]}")
    return seconds, log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["default", "fast"], choices=["default", "fast"])
    p.add_argument("--workdir", help="keep everything here (default: a temporary folder)")
    args = p.parse_args(argv)

    from bsf.config import FederationConfig
    from bsf.data.synth import synthesize
    from bsf.engine import Engine, load_config
    from bsf.fl.jobs import JobSpec, export_job

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bsf_round_overhead_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not data.is_dir():
        synthesize("ukb", 4, data, spacing=3.0, seed=0)
    R, k = args.rounds, args.local_steps
    spec = JobSpec(name="overhead", federation=FederationConfig(
        rounds=R, local_steps=k, min_clients=1, cross_site_eval=False, validate_global=False, resume=False))
    job = export_job(spec, work / "jobs")

    started = time.perf_counter()
    Engine(load_config(job / "app/config/bsf_run.yaml", overrides=[f"data.root={data}", "data.datalist=null"])).train_steps(R * k)
    central = time.perf_counter() - started
    print(f"1 site x {R} rounds x {k} steps, test size, Stage 1: centralized {central:.1f} s", flush=True)

    site_map = work / "sites.yaml"
    site_map.write_text(json.dumps({"sites": {"site-1": {"data": {"root": str(data)}}}}))
    results = {"rounds": R, "local_steps": k, "centralized_s": central}
    for variant in args.variants:
        folder = work / f"job_{variant}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(job, folder)
        set_polling(folder, POLLING[variant])
        ws = work / f"ws_{variant}"
        shutil.rmtree(ws, ignore_errors=True)
        seconds, log = simulate(folder, ws, site_map)
        site_log = [json.loads(x) for x in (ws / "site-1/simulate_job/bsf_site/train_log.jsonl").read_text().splitlines()]
        walls = [e - s for s, e in round_times(log)]
        overhead = [w - r["seconds"] for w, r in zip(walls, site_log)]
        row = {"wall_s": seconds, "ratio": seconds / central, "round_overhead_s": float(np.mean(overhead)) if overhead else None,
               "fixed_s": seconds - sum(walls)}
        results[variant] = row
        print(f"  {variant:8} federated {seconds:6.1f} s, ratio {row['ratio']:.2f}, per-round overhead "
              f"{row['round_overhead_s']:.2f} s, start-up + shut-down {row['fixed_s']:.1f} s", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
