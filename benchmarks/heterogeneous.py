"""Issue 16: one Stage 3 federation across modalities and diseases vs separate per-data-set federations (synthetic).

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/heterogeneous.py --out /tmp/bsf_het          # RESULTS.md
    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python benchmarks/heterogeneous.py --out /tmp/bsf_het_t --tiny  # smoke

In-process federations, no NVFlare (the pattern of ``benchmarks/poisoning.py``): real
:class:`~bsf.federation.site_trainer.SiteTrainer` sites, and the server's own aggregator
(:meth:`bsf.fl.aggregation.CheckedFedAvgAggregator.for_federation` with the arm's ``model.modalities``: the update
checks, weights by steps, :class:`~bsf.federation.weighted_mean.WeightedMean` (each key over the sites that sent it: a task's head over its sites),
:class:`~bsf.federation.modality.ModalityAggregation` of the first layer), the round applied as NVFlare's FedAvg
applies a DIFF (``global[k] += aggregate[k]``). The initial global model is the server's
(:func:`bsf.federation.initial_model.initial_global_weights`: the seeded initialisation of the arm's run config,
no previous stage's model; across tasks one seeded build per task merged).

Per seed, one synthetic cohort at ``--spacing`` mm: ``--brats-sites`` BraTS-like and ``--atlas-sites`` ATLAS-like
sites of ``--cases`` cases each, and ``--held-out`` cases per task that no arm trains on. Arms (every site
``--rounds`` x ``--local-steps`` steps, the same crops per step, seed = the seed):

* ``separate_brats`` / ``separate_atlas``: today's jobs, ``stage3_brats_test`` over the BraTS sites (4 channels
  flair, t1ce, t1, t2) and ``stage3_atlas_test`` over the ATLAS sites (1 channel, t1);
* ``joint``: ``stage3_all_test`` over all sites (``federation.tasks: [brats, atlas]``: shared body, one head per
  task; ``model.modalities: [t1, t1ce, t2, flair]``, ATLAS sites feed t1 only, modality dropout 0.5);
* ``only_t1`` / ``only_t1_flair``: ``stage3_brats_test`` over the BraTS sites with ``data.modalities`` [t1] /
  [t1, flair] (1 / 2 channels): models trained on those modalities alone.

Scored: each arm's final global model on its task's held-out cases (mean of the TC, WT, ET Dice for BraTS; the
lesion Dice for ATLAS; sliding window, as validation); the joint BraTS model also with only t1 and only t1 + flair
present, the other channels empty (the path ``bsf predict`` takes). Cost: the bytes each site sends per round
(:func:`~bsf.federation.site_trainer.payload_bytes`), the global model's bytes (what a site receives), and the
seconds of each site's round (``SiteTrainer.train``). ``OUT/results.json`` keeps every finished (seed, arm); a
rerun skips them. ``OUT/report.md``: the tables. Numbers, not assertions.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bsf.config import FederationConfig, RunConfig, load_config
from bsf.data.cases import list_cases
from bsf.data.synth import synthesize
from bsf.engine import Engine
from bsf.federation.initial_model import initial_global_weights
from bsf.federation.payload import exchanged
from bsf.federation.site_trainer import SiteTrainer, payload_bytes
from bsf.federation.task_heads import task_settings
from bsf.io import atomic_write_json

#: arm -> (preset, the tasks whose sites take part, extra settings of every site)
ARMS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "separate_brats": ("stage3_brats_test", ("brats",), ()),
    "separate_atlas": ("stage3_atlas_test", ("atlas",), ()),
    "joint": ("stage3_all_test", ("brats", "atlas"), ()),
    "only_t1": ("stage3_brats_test", ("brats",), ("data.modalities=[t1]", "model.in_channels=1")),
    "only_t1_flair": ("stage3_brats_test", ("brats",), ("data.modalities=[t1,flair]", "model.in_channels=2")),
}
#: the joint BraTS model scored with a subset of modalities present: name -> data.modalities
SUBSETS = {"t1": "[t1]", "t1_flair": "[t1,flair]"}
#: paired differences reported: (name, value a, value b), values as "arm:score"
PAIRS = (
    ("brats: joint - separate", "joint:brats", "separate_brats:brats"),
    ("atlas: joint - separate", "joint:atlas", "separate_atlas:atlas"),
    ("t1 only: joint (t1 present) - trained on t1", "joint:brats_t1", "only_t1:brats"),
    ("t1+flair: joint (t1, flair present) - trained on t1+flair", "joint:brats_t1_flair", "only_t1_flair:brats"),
)


def say(message: str) -> None:
    print(f"[heterogeneous] {message}", flush=True)


def make_cohort(root: Path, seed: int, args: argparse.Namespace) -> dict[str, list[Path]]:
    """Synthesise a seed's cases once per task (distinct case ids), dealt out: ``--cases`` per site, the last
    ``--held-out`` held out; task -> one datalist per site (validation: the held-out cases)."""
    out: dict[str, list[Path]] = {}
    for t, (task, n_sites) in enumerate((("brats", args.brats_sites), ("atlas", args.atlas_sites))):
        folder = root / task
        if not folder.is_dir():
            synthesize(task, n_sites * args.cases + args.held_out, folder, spacing=args.spacing, seed=100 * seed + t)
        cases = list_cases(task, root=folder)
        held = cases.training[-args.held_out:]
        out[task] = []
        for i in range(n_sites):
            path = root / f"{task}-{i + 1}.json"
            atomic_write_json({"dataset": task, "modalities": cases.modalities,
                               "training": cases.training[i * args.cases:(i + 1) * args.cases], "validation": held}, path)
            out[task].append(path)
    return out


def site_config(preset: str, task: str, datalist: Path, out: Path, seed: int, args: argparse.Namespace,
                extra: Sequence[str] = ()) -> RunConfig:
    """A site's run config: the arm's preset, its task's data set and head (as the job's site config derives them)."""
    return load_config(preset, [
        *(f"{k}={v}" for k, v in task_settings(task).items()), f"data.datalist={datalist}", "data.root=''",
        "data.crops_per_volume=1", "data.num_workers=0", f"seed={seed}",
        f"train.steps={args.rounds * args.local_steps}", "train.val_every=0", "train.progress=false",
        f"train.output_dir={out}", "optim.warmup_steps=1", "model.pretrained=null", *extra,
    ])


def run_arm(arm: str, cohort: dict[str, list[Path]], seed: int, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Federate one arm from the server's initial model; score its final global model; what each round cost."""
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    from bsf.fl.aggregation import CheckedFedAvgAggregator

    preset, tasks, extra = ARMS[arm]
    members = [(task, f"{task}-{i + 1}", path) for task in tasks for i, path in enumerate(cohort[task])]
    fed = FederationConfig(rounds=args.rounds, local_steps=args.local_steps, scope="all", min_clients=len(members),
                           validate_global=False, resume=False, cross_site_eval=False,
                           tasks=list(tasks) if len(tasks) > 1 else [])
    configs = [site_config(preset, task, path, out / name, seed, args, extra) for task, name, path in members]
    server_config = copy.deepcopy(configs[0])
    server_config.federation = fed
    initial, origin = initial_global_weights(server_config, "all", environ={})
    global_params = exchanged(initial)  # what the persistor sends: no constant buffers
    aggregator = CheckedFedAvgAggregator.for_federation(fed, modalities=server_config.model.modalities)
    aggregator.set_reference(global_params)
    sites = [SiteTrainer(Engine(config), fed, site=name) for config, (_, name, _) in zip(configs, members)]
    cost: dict[str, Any] = {"seconds": {s.site: [] for s in sites}, "bytes_up": {}, "aggregate_seconds": [],
                            "bytes_down": payload_bytes(global_params), "start": origin,
                            "load_before": os.getloadavg()[0]}
    for current_round in range(args.rounds):
        for site in sites:
            started = time.perf_counter()
            result = site.train(global_params, current_round)
            cost["seconds"][site.site].append(round(time.perf_counter() - started, 2))
            cost["bytes_up"][site.site] = payload_bytes(result.params)
            update = FLModel(params=result.params, params_type=ParamsType.DIFF, metrics=result.metrics,
                             meta={**result.meta, "client_name": site.site})
            if not aggregator.accept_model(update):
                raise RuntimeError(f"{arm}: the server rejected {site.site}'s update: {aggregator.rejected[-1][1]}")
        started = time.perf_counter()
        aggregate = aggregator.aggregate_model().params
        global_params = {k: v + aggregate[k] if k in aggregate else v for k, v in global_params.items()}
        cost["aggregate_seconds"].append(round(time.perf_counter() - started, 3))
        say(f"seed {seed} {arm}: round {current_round + 1}/{args.rounds}, "
            f"{max(sum(v) for v in cost['seconds'].values()):.0f} s per site so far")
    scores = {}
    for task in tasks:  # the first site of each task scores the global model (its head) on the held-out cases
        scorer = next(s for s, (t, _, _) in zip(sites, members) if t == task)
        scores[task] = scorer.validate(global_params)["val_dice_mean"]
    if arm == "joint":
        for name, modalities in SUBSETS.items():
            config = site_config(preset, "brats", cohort["brats"][0], out / f"score_{name}", seed, args,
                                 (*extra, f"data.modalities={modalities}"))
            scores[f"brats_{name}"] = SiteTrainer(Engine(config), fed, site=f"score-{name}").validate(global_params)["val_dice_mean"]
    cost["load_after"] = os.getloadavg()[0]
    return {"scores": scores, "cost": cost}


def payload_plan(args: argparse.Namespace) -> str:
    """Bytes per round per site of each job without training: a site sends the global model's shared tensors and its
    own task's head (:func:`~bsf.federation.task_heads.to_local` renamed back), as float32 differences."""
    from bsf.federation.task_heads import to_global, to_local

    lines = ["| job | site | bytes up per round | bytes down per round |", "|---|---|---|---|"]
    for arm, job in (("separate_brats", "stage3_brats"), ("separate_atlas", "stage3_atlas"), ("joint", "stage3_all")):
        preset, tasks, extra = ARMS[arm]
        config = site_config(preset, tasks[0], Path("unused.json"), args.out / "plan", 0, args, extra)
        config.federation = FederationConfig(scope="all", tasks=list(tasks) if len(tasks) > 1 else [])
        global_params = exchanged(initial_global_weights(config, "all", environ={})[0])
        for task in tasks:
            sent = to_global(to_local(global_params, task), task) if len(tasks) > 1 else global_params
            lines.append(f"| `{job}` | {task} | {payload_bytes(sent):,} | {payload_bytes(global_params):,} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- summary
def _mean_sd(values: Sequence[float]) -> str:
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return f"{np.mean(values):.3f} +/- {sd:.3f}"


def summarise(results: dict[str, Any], seeds: Sequence[int]) -> str:
    """The markdown tables: held-out Dice per arm, paired differences per seed, bytes and seconds per round."""
    def value(seed: int, ref: str) -> float:
        arm, score = ref.split(":")
        return float(results[f"{seed}/{arm}"]["scores"][score])

    done = [s for s in seeds if all(f"{s}/{arm}" in results for arm in ARMS)]
    lines = [f"Seeds {done}; held-out Dice of the final global model, mean +/- sd over seeds (per-seed values).", "",
             "| model | scored on | held-out Dice |", "|---|---|---|"]
    rows = (("separate_brats:brats", "`stage3_brats` (2 BraTS sites, 4 channels)", "BraTS, all 4"),
            ("joint:brats", "`stage3_all`, BraTS head", "BraTS, all 4"),
            ("joint:brats_t1_flair", "`stage3_all`, BraTS head", "BraTS, t1 + flair only"),
            ("only_t1_flair:brats", "`stage3_brats` on t1 + flair alone (2 channels)", "BraTS, t1 + flair"),
            ("joint:brats_t1", "`stage3_all`, BraTS head", "BraTS, t1 only"),
            ("only_t1:brats", "`stage3_brats` on t1 alone (1 channel)", "BraTS, t1"),
            ("separate_atlas:atlas", "`stage3_atlas` (ATLAS sites, 1 channel)", "ATLAS"),
            ("joint:atlas", "`stage3_all`, ATLAS head", "ATLAS"))
    for ref, model, scored in rows:
        values = [value(s, ref) for s in done]
        lines.append(f"| {model} | {scored} | {_mean_sd(values)} ({', '.join(f'{v:.3f}' for v in values)}) |")
    lines += ["", "| paired difference (same seed, cohort, held-out cases) | mean +/- sd | per seed | a > b |",
              "|---|---|---|---|"]
    for name, a, b in PAIRS:
        diffs = [value(s, a) - value(s, b) for s in done]
        lines.append(f"| {name} | {_mean_sd(diffs)} | {', '.join(f'{d:+.3f}' for d in diffs)} | "
                     f"{sum(d > 0 for d in diffs)}/{len(diffs)} |")
    lines += ["", "| job | site | bytes up per round | bytes down per round | seconds per round (mean +/- sd, rounds x seeds) |",
              "|---|---|---|---|---|"]
    for arm, job in (("separate_brats", "stage3_brats"), ("separate_atlas", "stage3_atlas"), ("joint", "stage3_all")):
        for task in ARMS[arm][1]:
            records = [results[f"{s}/{arm}"]["cost"] for s in done]
            names = sorted(n for n in records[0]["bytes_up"] if n.startswith(task))
            seconds = [x for r in records for n in names for x in r["seconds"][n]]
            up = {records[0]["bytes_up"][n] for n in names}
            lines.append(f"| `{job}` | {task} ({len(names)}) | {', '.join(f'{b / 1e6:.3f} MB' for b in sorted(up))} | "
                         f"{records[0]['bytes_down'] / 1e6:.3f} MB | {_mean_sd(seconds)} |")
    loads = [x for s in done for arm in ARMS for x in (results[f"{s}/{arm}"]["cost"]["load_before"],
                                                       results[f"{s}/{arm}"]["cost"]["load_after"])]
    if loads:
        lines += ["", f"1-minute load average at the start and end of each arm: {min(loads):.1f} .. {max(loads):.1f}."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--brats-sites", type=int, default=2)
    parser.add_argument("--atlas-sites", type=int, default=1)
    parser.add_argument("--cases", type=int, default=3, help="training cases per site")
    parser.add_argument("--held-out", type=int, default=3, help="held-out cases per task")
    parser.add_argument("--spacing", type=float, default=4.0)
    parser.add_argument("--bytes-only", action="store_true", help="only the bytes per round per site (no training)")
    parser.add_argument("--tiny", action="store_true", help="1 seed, 1 round x 1 step, 2 cases: the script end to end")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.seeds, args.rounds, args.local_steps, args.cases, args.held_out = args.seeds[:1], 1, 1, 2, 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.bytes_only:
        print(payload_plan(args))
        return 0
    path = args.out / "results.json"
    stored = json.loads(path.read_text()) if path.is_file() else {"args": None, "results": {}}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "seeds", "bytes_only")}
    if stored["args"] not in (None, settings):
        raise SystemExit(f"{path} was made with {stored['args']}, this command asks for {settings}: use another --out")
    stored["args"] = settings
    started = time.perf_counter()
    for seed in args.seeds:
        cohort = make_cohort(args.out / f"seed{seed}" / "data", seed, args)
        for arm in ARMS:
            key = f"{seed}/{arm}"
            if key in stored["results"]:
                continue
            stored["results"][key] = run_arm(arm, cohort, seed, args.out / f"seed{seed}" / arm, args)
            atomic_write_json(stored, path)
            say(f"seed {seed} {arm}: {stored['results'][key]['scores']} ({time.perf_counter() - started:.0f} s in all)")
    report = summarise(stored["results"], args.seeds)
    (args.out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
