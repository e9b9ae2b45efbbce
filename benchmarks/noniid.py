"""Non-IID sites: three BraTS-like sites, each its own scanner; held-out Dice per algorithm against centralized training.

An in-process federation (no NVFlare simulator; its round overhead would dominate on 2 cores) of three real
:class:`~bsf.federation.site_trainer.SiteTrainer` sites around the Stage 3 BraTS test preset on synthetic
BraTS-like data. Each site renders its cases with its own :class:`~bsf.data.synth.ScannerProfile` (:data:`SCANNERS`)
and holds out one case (``data.val_cases: 1``), never trained on; the three held-out cases (one per scanner) score
every model. The rules are the project's own:

* site side: :func:`bsf.fl.objectives.local_objective` (FedProx: NVFlare's ``PTFedProxLoss``; SCAFFOLD: ``PTScaffoldHelper``);
* server side: the weight of each result (:func:`bsf.fl.aggregation.update_weight`), the weighted mean
  (:func:`bsf.federation.robust.weighted_mean`), FedOpt's step (:class:`bsf.federation.server_opt.ServerOptimizer`),
  FedCostWAvg's weights (:mod:`bsf.federation.fedcost`) and SCAFFOLD's ``c += mean(c_i+ - c_i)`` with the updates' weights
  (as :class:`bsf.fl.controller.CheckedFedAvg` does it).

Every arm spends the same compute: ``3 x rounds x local_steps`` optimiser steps (batch 1). The centralized reference
trains one engine on the pooled training cases of the three sites for that many steps and is scored after every
``3 x local_steps`` steps (one round's worth). Reported per arm: final held-out mean Dice (mean +/- sd over seeds),
the first round whose global model reaches ``--threshold``, the training steps, the MB a round moves, and the seconds.

    nice -n 10 env OMP_NUM_THREADS=2 .venv/bin/python benchmarks/noniid.py --seeds 0 1 2 --rounds 3 --local-steps 2
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bsf.config import FederationConfig, load_config
from bsf.data.synth import ScannerProfile, synthesize
from bsf.engine import Engine
from bsf.federation.fedcost import cost_ratio, fedcost_weights
from bsf.federation.robust import weighted_mean
from bsf.federation.server_opt import ServerOptimizer
from bsf.federation.site_trainer import SiteTrainer, payload_bytes
from bsf.federation.stages import get_stage
from bsf.fl.aggregation import update_weight
from bsf.fl.objectives import local_objective
from bsf.fl.scaffold import CONTROL_DIFF, CONTROL_GLOBAL

#: three scanners: the usual images; bright, strongly biased and noisy; dark, flat, quiet and blurred (8 mm FWHM)
SCANNERS = {
    "site-1": ScannerProfile(),
    "site-2": ScannerProfile(intensity_scale=2.5, bias_strength=0.35, noise=2.5),
    "site-3": ScannerProfile(intensity_scale=0.4, bias_strength=0.05, noise=0.5, resolution=8.0),
}
#: arm -> (federation.algorithm, federation.weigh_by)
ARMS = {
    "fedavg": ("fedavg", "steps"),
    "fedprox": ("fedprox", "steps"),
    "scaffold": ("scaffold", "steps"),
    "fedopt": ("fedopt", "steps"),
    "fedcostwavg": ("fedavg", "fedcostwavg"),
}
SPACING = 4.0  # mm
CASES_PER_SITE = 3  # 2 training + 1 held out


def make_sites(root: Path, seed: int) -> dict[str, Path]:
    """Each site's data folder (synthesised once per seed with its scanner)."""
    folders = {}
    for i, (site, scanner) in enumerate(SCANNERS.items()):
        folders[site] = root / site
        if not folders[site].is_dir():
            synthesize("brats", CASES_PER_SITE, folders[site], spacing=SPACING, seed=100 * seed + i, scanner=scanner)
    return folders


def _config(seed: int, steps: int, out: Path, data: list[str]):
    return load_config("stage3_brats_test", [
        *data, f"train.output_dir={out}", "train.progress=false", f"train.steps={steps}", "optim.warmup_steps=1",
        "data.crops_per_volume=1", f"seed={seed}",
    ])


def pooled_datalist(engines: dict[str, Engine], path: Path) -> Path:
    """A datalist of the sites' training cases (training) and held-out cases (validation); ids ``<site>/<case>``."""
    def cases(part: str) -> list[dict[str, Any]]:
        return [{**case, "id": f"{site}/{case.get('id')}"} for site, e in engines.items() for case in getattr(e.split, part)]

    training, validation = cases("train"), cases("val")
    path.write_text(json.dumps({"dataset": "brats", "training": training, "validation": validation}, default=str))
    return path


def _dice(engine: Engine) -> float:
    return float(engine.validate()["val_dice_mean"])


def federate(folders: dict[str, Path], seed: int, arm: str, rounds: int, local_steps: int, mu: float,
             out: Path) -> dict[str, Any]:
    """One federated run: the held-out Dice after every round, the MB a round moves, the seconds."""
    started = time.perf_counter()
    algorithm, weigh_by = ARMS[arm]
    fed = FederationConfig(algorithm=algorithm, weigh_by=weigh_by, rounds=rounds, local_steps=local_steps,
                           scope=get_stage("stage3_brats").aggregates, validate_global=False, resume=False,
                           fedprox_mu=mu)
    sites = []
    for site, folder in folders.items():
        engine = Engine(_config(seed, rounds * local_steps, out / site, [f"data.root={folder}", "data.val_cases=1"]))
        sites.append(SiteTrainer(engine, fed, site=site, local_objective=local_objective(engine, fed)))
    evaluator = Engine(_config(seed, 1, out / "eval", [f"data.datalist={pooled_datalist({s.site: s.engine for s in sites}, out / 'pooled.json')}"]))
    keys = sites[0].scope_keys
    weights = sites[0].engine.get_weights(fed.scope)
    global_params = {k: weights[k] for k in keys}
    server_opt = ServerOptimizer.from_config(fed) if algorithm == "fedopt" else None
    controls = {k: np.zeros_like(v) for k, v in global_params.items()} if algorithm == "scaffold" else None
    curve, round_bytes = [], 0
    for r in range(rounds):
        meta = {CONTROL_GLOBAL: controls} if controls is not None else None
        results = [(site.site, site.train(global_params, r, meta)) for site in sites]
        claims = {name: update_weight(res.meta, weigh_by)[0] for name, res in results}
        if weigh_by == "fedcostwavg":
            claims = fedcost_weights(claims, {name: cost_ratio(res.metrics)[0] for name, res in results}, fed.fedcost_alpha)
        aggregate = weighted_mean([(name, res.params, claims[name]) for name, res in results])
        if server_opt is not None:
            aggregate = server_opt.step(aggregate)
        global_params = {k: global_params[k] + aggregate[k] for k in keys}
        round_bytes = len(sites) * (payload_bytes(global_params) + payload_bytes(results[0][1].params))
        if controls is not None:
            control_mean = weighted_mean([(name, res.meta[CONTROL_DIFF], claims[name]) for name, res in results])
            controls = {k: controls[k] + control_mean[k] for k in keys}
            round_bytes *= 2  # c down, c_i+ - c_i up
        evaluator.set_weights(global_params)
        curve.append(_dice(evaluator))
    return {"dice": curve, "steps": len(sites) * rounds * local_steps, "round_mb": round_bytes / 1e6,
            "seconds": time.perf_counter() - started}


def centralize(folders: dict[str, Path], seed: int, rounds: int, local_steps: int, out: Path) -> dict[str, Any]:
    """The centralized reference: the pooled training cases, ``3 x rounds x local_steps`` steps, scored each round's worth."""
    started = time.perf_counter()
    engines = {site: Engine(_config(seed, 1, out / f"split-{site}", [f"data.root={folder}", "data.val_cases=1"]))
               for site, folder in folders.items()}
    datalist = pooled_datalist(engines, out / "pooled.json")
    steps = len(folders) * rounds * local_steps
    engine = Engine(_config(seed, steps, out / "central", [f"data.datalist={datalist}"]))
    curve = []
    for _ in range(rounds):
        engine.train_steps(len(folders) * local_steps)
        curve.append(_dice(engine))
    return {"dice": curve, "steps": steps, "round_mb": 0.0, "seconds": time.perf_counter() - started}


def first_round(curve: list[float], threshold: float) -> int | None:
    """The first round (1-based) whose Dice reaches ``threshold``, else None."""
    return next((r + 1 for r, dice in enumerate(curve) if dice >= threshold), None)


def table(runs: dict[str, list[dict[str, Any]]], threshold: float) -> str:
    """The Markdown table of the runs (arm -> one run per seed)."""
    lines = [f"| arm | final held-out Dice (mean +/- sd) | per seed | rounds to Dice >= {threshold:g} (per seed) "
             "| steps | MB per round | seconds (mean) |", "|---|---|---|---|---|---|---|"]
    for arm, seeds in runs.items():
        final = [run["dice"][-1] for run in seeds]
        reach = ", ".join(str(first_round(run["dice"], threshold) or "-") for run in seeds)
        lines.append(f"| {arm} | {np.mean(final):.3f} +/- {np.std(final, ddof=1) if len(final) > 1 else 0:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in final)} | {reach} | {seeds[0]['steps']} | "
                     f"{seeds[0]['round_mb']:.2f} | {np.mean([run['seconds'] for run in seeds]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx's federation.fedprox_mu")
    parser.add_argument("--threshold", type=float, default=0.5, help="held-out mean Dice for 'rounds to reach'")
    parser.add_argument("--arms", nargs="+", choices=[*ARMS, "central"], default=[*ARMS, "central"])
    parser.add_argument("--out", default="benchmarks/noniid_results.json")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            folders = make_sites(Path(tmp) / f"seed{seed}" / "data", seed)
            for arm in args.arms:
                with tempfile.TemporaryDirectory(dir=tmp) as out:
                    run = (centralize(folders, seed, args.rounds, args.local_steps, Path(out)) if arm == "central" else
                           federate(folders, seed, arm, args.rounds, args.local_steps, args.mu, Path(out)))
                runs.setdefault(arm, []).append(run)
                print(f"seed {seed} {arm}: Dice per round {[round(x, 3) for x in run['dice']]} "
                      f"({run['seconds']:.0f} s; {time.perf_counter() - started:.0f} s so far)", flush=True)
    print(table(runs, args.threshold))
    machine = f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'})"
    Path(args.out).write_text(json.dumps({"args": vars(args), "machine": machine, "runs": runs,
                                          "scanners": {s: vars(p) for s, p in SCANNERS.items()}}, indent=1))


if __name__ == "__main__":
    main()
