"""Bytes per round per site and seconds per round of ``stage2_all`` (UKB-, BraTS- and ATLAS-like sites together)
next to ``stage2_brats`` (BraTS-like sites only), from one ``bsf chain`` run of both stages in NVFlare's simulator.

Both stages start from the same seeded Stage-1-like model (test size) and run R rounds x k local steps on the
synthetic sites ``--sites`` (default 1 UKB-, 2 BraTS-, 1 ATLAS-like: ``stage2_brats`` runs at the two BraTS-like
ones, ``stage2_all`` at all four). Per stage:

* seconds per round: the server log's round boundaries (``fl_overhead.round_times``), mean over the rounds;
* bytes per round per site, from each site's log: down = the global model's arrays the site downloaded plus the
  task messages, up = the arrays the server downloaded from it plus its result messages (NVFlare's own byte counts
  in ``[client] download ref``, ``getTask``, ``[server] download tx`` and ``SubmitUpdate`` lines), over R rounds.
  The validation of the global model at each site (``validate_global``) is included: it is part of a round.

    .venv/bin/python benchmarks/heterogeneous_rounds.py --out /tmp/het_rounds --rounds 3 --local-steps 2
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fl_overhead import round_times  # noqa: E402  (the server-log parser, one copy)

PATTERNS = {
    "down": (re.compile(r"\[client\] download ref=.*\(([\d,]+) bytes\)"), re.compile(r"getTask: .*\((\d+) Bytes\)")),
    "up": (re.compile(r"\[server\] download tx .*\(([\d,]+) bytes\)"), re.compile(r"SubmitUpdate to: server\. size: .*\((\d+) Bytes\)")),
}


def site_bytes(log: str) -> dict[str, int]:
    """Total bytes down and up in one site's simulator log."""
    return {
        direction: sum(int(m.group(1).replace(",", "")) for p in patterns for m in map(p.search, log.splitlines()) if m)
        for direction, patterns in PATTERNS.items()
    }


def stage_costs(workspace: Path, sites: list[str], rounds: int) -> dict:
    """Seconds per round (server log) and bytes per round per site (site logs) of one simulator workspace."""
    times = round_times((workspace / "server" / "log.txt").read_text())
    per_site = {site: {k: v / rounds for k, v in site_bytes((workspace / site / "log.txt").read_text()).items()} for site in sites}
    return {
        "seconds_per_round": sum(end - start for start, end in times) / len(times),
        "round_seconds": [round(end - start, 2) for start, end in times],
        "bytes_per_round": per_site,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--sites", default="ukb=1,brats=2,atlas=1")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from bsf.model import SSLModel
    from bsf.pipeline.chain import ChainConfig, run_chain
    from bsf.pipeline.sites import parse_sites

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stage1 = out / "stage1_like.pt"
    torch.manual_seed(5)
    torch.save({"model": {k: v for k, v in SSLModel("test", 2).state_dict().items() if k.startswith("swinViT.")}}, stage1)
    cfg = ChainConfig.tiny(out / "chain", sites=parse_sites(args.sites), stage_names=("stage2_brats", "stage2_all"),
                           stage1_model=str(stage1), rounds=args.rounds, local_steps=args.local_steps)
    summary = run_chain(cfg)
    results = {job: {"sites": r["sites"], **stage_costs(cfg.out / "ws" / job, r["sites"], r["rounds"])}
               for job, r in summary["stages"].items()}
    (out / "heterogeneous_rounds.json").write_text(json.dumps(results, indent=1))
    print("| job | sites | seconds per round | bytes per round per site (down / up) |")
    print("|---|---|---:|---|")
    for job, r in results.items():
        per_site = ", ".join(f"{s} {b['down'] / 1e6:.2f} / {b['up'] / 1e6:.2f} MB" for s, b in r["bytes_per_round"].items())
        print(f"| {job} | {len(r['sites'])} | {r['seconds_per_round']:.1f} | {per_site} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
