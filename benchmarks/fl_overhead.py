"""What federation costs: the same Stage 1 work centralized and as a one-site NVFlare federation.

    python benchmarks/fl_overhead.py                    # 3 rounds x 2 steps, test-size model, CPU
    python benchmarks/fl_overhead.py --rounds 5 --local-steps 4 --sizes test tiny small big

Prints
- wall time of the centralized run (Engine: R*k steps) and of the one-site federation
  (``nvflare simulator``, R rounds of k steps), and their ratio;
- the per-round overhead: federation wall time of a round minus the site's own compute in it,
  and the fixed start-up/shut-down cost;
- whether the federation reproduced the centralized run (max |weight diff|, max |loss diff|);
- bytes sent per round per site (model down + update up) for encoder-only vs whole-model
  aggregation, in float32 and with a float16 upload (``--transfer-dtype float16``), from
  ``bsf.bench.comm.payload_rows`` (``bsf bench --only comm`` also checks float16 convergence).

Numbers, not assertions: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np


def _stamp(line: str) -> float | None:
    m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})", line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def round_times(log: str) -> list[tuple[float, float]]:
    """(start, end) wall times of each FedAvg round, from the simulator log (banner lines follow a stamped line)."""
    marks, last = [], None
    for line in log.splitlines():
        t = _stamp(line)
        if t is not None:
            last = t
        elif last is not None and ((" started." in line and "Round " in line) or "Finished FedAvg." in line):
            marks.append(last)
    return list(zip(marks[:-1], marks[1:]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--subjects", type=int, default=4)
    p.add_argument("--spacing", type=float, default=3.0)
    p.add_argument("--sizes", nargs="+", default=["test", "tiny", "small", "big"])
    p.add_argument("--workdir", help="keep everything here (default: a temporary folder)")
    args = p.parse_args(argv)

    from bsf.data.synth import synthesize
    from bsf.engine import Engine, load_config
    from bsf.config import FederationConfig
    from bsf.fl.jobs import JobSpec, export_job

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bsf_fl_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not data.is_dir():
        synthesize("ukb", args.subjects, data, spacing=args.spacing, seed=0)
    R, k = args.rounds, args.local_steps
    spec = JobSpec(name="bench1", federation=FederationConfig(rounds=R, local_steps=k, min_clients=1, cross_site_eval=False, validate_global=False, resume=False))
    job = export_job(spec, work / "jobs")
    overrides = [f"data.root={data}", "data.datalist=null"]

    # centralized: the same config, R*k steps in one Engine
    t0 = time.perf_counter()
    engine = Engine(load_config(job / "app" / "config" / "bsf_run.yaml", overrides=overrides))
    t_build = time.perf_counter() - t0
    records = engine.train_steps(R * k)
    t_central = time.perf_counter() - t0
    central = {n: v.detach().float().numpy() for n, v in engine.model.state_dict().items()}

    # one-site federation in the simulator
    site_map = work / "sites.yaml"
    site_map.write_text(json.dumps({"sites": {"site-1": {"data": {"root": str(data)}}}}))
    ws = work / "ws"
    env = {**os.environ, "BSF_SITE_CONFIG": str(site_map)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("nvflare")), "simulator", str(job), "-w", str(ws), "-n", "1", "-t", "1"],
        env=env, capture_output=True, text=True,
    )
    t_fl = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (work / "simulator.log").write_text(log)
    if proc.returncode != 0:
        print(log[-3000:])
        return 1
    import torch

    glob = torch.load(ws / "server" / "simulate_job" / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
    w_err = max(float(np.abs(np.asarray(glob[n], dtype=np.float32) - central[n]).max()) for n in glob)
    site_log = [json.loads(x) for x in (ws / "site-1" / "simulate_job" / "bsf_site" / "train_log.jsonl").read_text().splitlines()]
    fl_losses = [s["loss"] for r in site_log for s in r["steps"]]
    l_err = max(abs(a - b["loss"]) for a, b in zip(fl_losses, records))
    compute = [r["seconds"] for r in site_log]
    rounds = round_times(log)
    round_wall = [e - s for s, e in rounds]
    per_round_overhead = [w - c for w, c in zip(round_wall, compute)]

    print(f"\nStage 1, test-size model, {R} rounds x {k} local steps ({R * k} steps), CPU threads {torch.get_num_threads()}")
    print(f"  centralized (Engine):        {t_central:7.1f} s  (of which {t_build:.1f} s building the engine)")
    print(f"  one-site federation (sim):   {t_fl:7.1f} s  -> ratio {t_fl / t_central:.2f}x")
    if round_wall:
        print(f"  federation round wall time:  {', '.join(f'{w:.1f}' for w in round_wall)} s")
        print(f"  site compute per round:      {', '.join(f'{c:.1f}' for c in compute)} s")
        print(f"  per-round overhead:          {np.mean(per_round_overhead):.2f} s (mean; round wall time - site compute)")
        print(f"  fixed start-up + shut-down:  {t_fl - sum(round_wall):.1f} s")
    print(f"  equivalence: global encoder vs centralized max |diff| {w_err:.3g}, per-step losses max |diff| {l_err:.3g}")

    from bsf.bench.comm import payload_rows

    print("\nBytes per round per site (global model down + update up; NVFlare message overhead not included):")
    print(f"  {'size':6} {'encoder elems':>15} {'all elems':>12} {'encoder f32':>12} {'enc f32 down+f16 up':>20} {'whole model f32':>16}")
    for row in payload_rows():
        if row["size"] not in args.sizes:
            continue
        b = row["round_bytes"]
        print(
            f"  {row['size']:6} {row['encoder_elements']:>15,} {row['swin_unetr_elements']:>12,} {b['encoder_f32'] / 1e6:>10.2f}MB "
            f"{b['encoder_f32_down_f16_up'] / 1e6:>18.2f}MB {b['swin_unetr_f32'] / 1e6:>14.2f}MB"
        )
    print(f"\n(work folder: {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
