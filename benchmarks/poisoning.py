"""Poisoning: one of three sites sends a sign-flipped or scaled update every round; global Dice per aggregation rule.

An in-process federation (no NVFlare): three real :class:`~bsf.federation.site_trainer.SiteTrainer` sites around
the Stage 3 BraTS test preset on synthetic BraTS-like data (4 mm), the server's step ``global += aggregate`` with
the rules of :mod:`bsf.federation.robust`. The bad site trains honestly and then sends ``-10 x`` (``sign_flip``)
or ``10 x`` (``scaled``) its difference. Reported: the mean Dice (TC, WT, ET) of the final global model on the
validation cases of the two honest sites (one each, never trained on), per rule, mean and spread over seeds, next to
the honest 2-site federation (sites 1 and 2), and each federation's distance from that honest one (same seed).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/poisoning.py --seeds 0 1 2 --rounds 4 --local-steps 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bsf.config import FederationConfig, load_config
from bsf.data.synth import synthesize
from bsf.engine import Engine
from bsf.federation.robust import RobustRule, robust_aggregate
from bsf.federation.site_trainer import SiteTrainer
from bsf.federation.stages import get_stage

RULES = {
    "fedavg": RobustRule("none"),
    "clip_1.5x_median": RobustRule("clip", clip_multiple=1.5),
    "trimmed_mean_1/3": RobustRule("trimmed_mean", trim_fraction=0.34),
    "median": RobustRule("median"),
}
ATTACKS = {"sign_flip": -10.0, "scaled": 10.0}


def _sites(root: Path, seed: int, n: int, rounds: int, local_steps: int, out: Path) -> list[SiteTrainer]:
    fed = FederationConfig(rounds=rounds, local_steps=local_steps, scope=get_stage("stage3_brats").aggregates,
                           validate_global=False, resume=False)
    trainers = []
    for i in range(n):
        data = root / f"site-{i + 1}"
        if not data.is_dir():
            synthesize("brats", 3, data, spacing=4.0, seed=100 * seed + i)
        config = load_config("stage3_brats_test", [
            f"data.root={data}", f"train.output_dir={out / f'site-{i + 1}'}", "train.progress=false",
            f"train.steps={rounds * local_steps}", "optim.warmup_steps=1", "data.crops_per_volume=1", f"seed={seed}",
        ])
        trainers.append(SiteTrainer(Engine(config), fed, site=f"site-{i + 1}"))
    return trainers


def federate(root: Path, seed: int, rule: RobustRule, attack: float | None, rounds: int, local_steps: int) -> float:
    """The mean Dice of the final global model on the honest sites' (1 and 2) validation cases (``attack=None``:
    the federation of sites 1 and 2 only)."""
    n = 2 if attack is None else 3
    with tempfile.TemporaryDirectory() as out:
        sites = _sites(root, seed, n, rounds, local_steps, Path(out))
        weights = sites[0].engine.get_weights(sites[0].settings.scope)
        global_params = {k: weights[k] for k in sites[0].scope_keys}  # what a round exchanges
        for r in range(rounds):
            updates = []
            for i, site in enumerate(sites):
                result = site.train(global_params, r)
                params = result.params if i < 2 else {k: attack * v for k, v in result.params.items()}
                updates.append((site.site, params, float(result.meta["NUM_STEPS_CURRENT_ROUND"])))
            aggregate, _ = robust_aggregate(updates, rule)
            global_params = {k: global_params[k] + aggregate[k] for k in global_params}
        return float(np.mean([site.validate(global_params)["val_dice_mean"] for site in sites[:2]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--attacks", nargs="+", choices=sorted(ATTACKS), default=["sign_flip"])
    parser.add_argument("--out", default="benchmarks/poisoning_results.json")
    args = parser.parse_args()
    table: dict[str, list[float]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            root = Path(tmp) / f"seed{seed}"
            table.setdefault("honest_2_sites", []).append(
                federate(root, seed, RULES["fedavg"], None, args.rounds, args.local_steps))
            for attack in args.attacks:
                for name, rule in RULES.items():
                    table.setdefault(f"{attack}:{name}", []).append(
                        federate(root, seed, rule, ATTACKS[attack], args.rounds, args.local_steps))
                    print(f"seed {seed} {attack}:{name}: {table[f'{attack}:{name}'][-1]:.4f}", flush=True)
            print(f"seed {seed} done after {time.perf_counter() - started:.0f} s", flush=True)
    honest = table["honest_2_sites"]
    print(f"| federation | held-out Dice, mean (min..max over seeds {args.seeds}) | minus the honest 2-site Dice, per seed |")
    print("|---|---|---|")
    for name, values in table.items():
        gaps = ", ".join(f"{v - h:+.3f}" for v, h in zip(values, honest))
        print(f"| {name} | {np.mean(values):.3f} ({min(values):.3f}..{max(values):.3f}) | {gaps} |")
    Path(args.out).write_text(json.dumps({"args": vars(args), "dice": table}, indent=1))


if __name__ == "__main__":
    main()
