"""Does Stage 1 pretraining help few-shot Stage 3, and does federated pretraining help as much? (synthetic data, resumable)

    .venv/bin/python benchmarks/pretraining_evidence.py --out /tmp/bsf_evidence    # the CPU run (docs/protocols.md)
    .venv/bin/python benchmarks/pretraining_evidence.py --out /tmp/e --tiny        # minutes: the script end to end
    .venv/bin/python benchmarks/pretraining_evidence.py --out /tmp/g --size gpu    # SwinUNETR-Small on one GPU

Sizes (``--size``; every option given on the command line wins over its size's value, see :data:`SIZES`):
``cpu`` (the default) is the CPU protocol of docs/protocols.md (test-size SwinUNETR, 64^3 crops, 4 mm);
``gpu`` is the same protocol at the paper's model size (SwinUNETR-Small, 96^3 crops, bf16, 2 mm synthetic
volumes); ``tiny`` (= ``--tiny``) runs the script end to end in minutes on a CPU. ``benchmarks/device_run.py``
chooses the size and the step counts on a lent GPU from measured step times.

Three arms, fine-tuned with the same Stage 3 budget on the same cases with the same seed:

* ``scratch``: Stage 3 from the seeded random initialisation;
* ``central``: Stage 3 from the encoder of one central Stage 1 run of ``--stage1-steps`` steps on all training
  UKB-like subjects;
* ``federated``: Stage 3 from the global encoder of a ``--sites``-site FedAvg federation with the same total number
  of Stage 1 steps (``--stage1-steps / --sites`` per site, in rounds of ``--local-steps``), the training subjects
  dealt out over the sites. It runs in this process with the project's site code and the server's weighted mean
  (:class:`bsf.federation.site_trainer.SiteTrainer` per site, :class:`bsf.fl.aggregation.WeightedMean`; encoder
  aggregated, SSL heads kept at each site, weights by steps), not through NVFlare: the same arithmetic without the
  simulator's start-up and polling.

Phases, each written under ``OUT`` and skipped or continued when the command is run again:

1. ``data/``: ``--ukb-subjects`` UKB-like subjects (``--ukb-held-out`` of them held out to score the SSL models) and
   ``--brats-subjects`` BraTS-like cases (``--brats-held-out`` held out to score Stage 3; the rest are the few-shot
   pool), synthesised at ``--spacing`` mm; datalists with absolute paths.
2. ``stage1_central/``, ``stage1_federated/``: checkpointed every ``--stage1-curve`` total steps (the held-out SSL
   loss is measured there: the learning curve); a killed run continues from the last checkpoint, step for step as
   if it had not stopped (every random draw of a step depends only on the seed and the step).
3. ``stage3/<k>shot_s<s>_<arm>/result.json``: for ``k`` in ``--shots`` labelled cases and subset ``s`` in
   ``0..--subsets-1`` (a permutation of the pool seeded with ``s``; the 1-case subset is inside the 2-case one), each
   arm fine-tunes ``--stage3-steps`` steps with seed ``s`` and is scored (mean Dice of TC, WT, ET, sliding window,
   last model) on the held-out cases every ``--curve-every`` steps. An unfinished run is redone.
4. ``evidence.json``, ``report.md``, ``evidence.png``: held-out Dice per arm, paired differences (same subset and
   seed) with 95 % t intervals, the learning curves, and what each phase cost (wall and CPU seconds, load average).

Numbers, not assertions: the answer may go either way, and the report says which.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bsf.config import FederationConfig, RunConfig, load_config
from bsf.data.cases import list_cases
from bsf.data.synth import synthesize
from bsf.engine import Engine
from bsf.federation.site_trainer import SiteTrainer
from bsf.federation.weighted_mean import WeightedMean
from bsf.io import atomic_write_json

log = logging.getLogger("pretraining_evidence")

ARMS = ("scratch", "central", "federated")
PAIRS = (("central", "scratch"), ("federated", "scratch"), ("federated", "central"))
PROGRESS = "progress.json"


#: the protocol at each size; an option given on the command line wins over its size's value
SIZES: dict[str, dict[str, Any]] = {
    "cpu": {
        "ukb_subjects": 12, "ukb_held_out": 3, "brats_subjects": 16, "brats_held_out": 6, "spacing": 4.0, "sites": 3,
        "stage1_steps": 1500, "local_steps": 25, "stage1_curve": 150, "stage1_preset": "stage1_test", "stage1_set": [],
        "shots": "1,2", "subsets": 5, "stage3_steps": 30, "curve_every": 10, "stage3_preset": "stage3_brats_test",
        "stage3_set": ["data.crops_per_volume=1"],
    },
    # the paper's model (SwinUNETR-Small) on one GPU: 96^3 crops, bf16, no gradient checkpointing (the batch is small),
    # volumes cached in memory and read in the training process (2 mm volumes are small), headers checked only
    "gpu": {
        "ukb_subjects": 12, "ukb_held_out": 3, "brats_subjects": 16, "brats_held_out": 6, "spacing": 2.0, "sites": 3,
        "stage1_steps": 3000, "local_steps": 100, "stage1_curve": 600, "stage1_preset": "stage1_ukb",
        "stage1_set": ["model.use_checkpoint=false", "data.num_workers=0", "data.cache=memory", "data.check=header",
                       "optim.lr=1e-4", "optim.warmup_steps=50", "train.device=auto"],
        "shots": "1,2", "subsets": 5, "stage3_steps": 60, "curve_every": 20, "stage3_preset": "stage3_brats",
        "stage3_set": ["data.roi=[96, 96, 96]", "data.batch_size=1", "data.crops_per_volume=2", "model.use_checkpoint=false",
                       "data.num_workers=0", "data.cache=memory", "data.check=header", "optim.warmup_steps=10",
                       "train.device=auto"],
    },
    # the script end to end in minutes on a CPU: 1 round, 2 subsets, 2 steps
    "tiny": {
        "ukb_subjects": 4, "ukb_held_out": 1, "brats_subjects": 3, "brats_held_out": 1, "spacing": 4.0, "sites": 3,
        "stage1_steps": 3, "local_steps": 1, "stage1_curve": 3, "stage1_preset": "stage1_test",
        "stage1_set": ["data.crops_per_volume=1"], "shots": "1,2", "subsets": 2, "stage3_steps": 2, "curve_every": 1,
        "stage3_preset": "stage3_brats_test", "stage3_set": ["data.crops_per_volume=1"],
    },
}


def say(message: str) -> None:
    print(f"[evidence] {message}", flush=True)


# --------------------------------------------------------------------------- synthetic data, in parallel
def _write_subject(job: tuple) -> None:
    from bsf.data.synth import _WRITERS, DEFAULT_SCANNER, output_grid

    dataset, plan, spacing, seed, index = job
    _WRITERS[dataset](plan, output_grid(dataset, spacing), np.random.default_rng([seed, index]), DEFAULT_SCANNER)


def synthesize_parallel(dataset: str, n_subjects: int, root: Path, *, spacing: float, seed: int, workers: int = 1, pool=None) -> None:
    """Write the files ``bsf.data.synth.synthesize(dataset, n_subjects, root, spacing=spacing, seed=seed)`` writes, one
    subject per process (``workers`` processes, or ``pool``, a ``concurrent.futures`` executor).

    Each subject depends only on ``(seed, index)``, so the files are the serial ones (tests/test_device_run.py checks
    this). This reaches into :mod:`bsf.data.synth`'s per-subject writers; if those change shape it says so and writes
    serially instead, the same files, only slower.
    """
    if (workers <= 1 and pool is None) or n_subjects <= 1:
        synthesize(dataset, n_subjects, root, spacing=spacing, seed=seed)
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from bsf.data.synth import check_synth_output

    plans = check_synth_output(dataset, n_subjects, root, replace=True)
    jobs = [(dataset, plan, spacing, seed, index) for index, plan in enumerate(plans)]
    own = pool is None
    executor = ProcessPoolExecutor(min(workers, n_subjects), mp_context=get_context("spawn")) if own else pool
    try:
        list(executor.map(_write_subject, jobs))
    except (ImportError, AttributeError, TypeError, KeyError) as error:  # bsf.data.synth's writers changed
        log.warning("parallel synthesis failed (%s: %s); writing serially", type(error).__name__, error)
        synthesize(dataset, n_subjects, root, spacing=spacing, seed=seed)
    finally:
        if own:
            executor.shutdown()


# --------------------------------------------------------------------------- data
@dataclass
class Data:
    ukb_central: Path  # all training subjects, the held-out ones as validation
    ukb_sites: list[Path]  # one datalist per site, the same validation list
    brats_pool: list[dict[str, Any]]  # few-shot training pool (cases with absolute paths)
    brats_held_out: list[dict[str, Any]]
    brats_header: dict[str, Any]


def make_data(out: Path, args: argparse.Namespace, pool=None) -> Data:
    """Synthesise the subjects once (``data/.complete`` marks it; ``--synth-workers`` processes, or ``pool``) and write
    the Stage 1 datalists."""
    data = out / "data"
    ukb_root, brats_root = data / "ukb", data / "brats"
    marker = data / ".complete"
    if not marker.is_file():
        workers = getattr(args, "synth_workers", 1)
        synthesize_parallel("ukb", args.ukb_subjects, ukb_root, spacing=args.spacing, seed=1, workers=workers, pool=pool)
        synthesize_parallel("brats", args.brats_subjects, brats_root, spacing=args.spacing, seed=2, workers=workers, pool=pool)
        marker.write_text(json.dumps({"ukb": args.ukb_subjects, "brats": args.brats_subjects, "spacing": args.spacing}) + "\n")
    made = json.loads(marker.read_text())
    wanted = {"ukb": args.ukb_subjects, "brats": args.brats_subjects, "spacing": args.spacing}
    if made != wanted:
        raise SystemExit(f"{data} was made with {made}, this command asks for {wanted}: use another --out")
    ukb = list_cases("ukb", root=ukb_root)
    subjects, held = ukb.training[: -args.ukb_held_out], ukb.training[-args.ukb_held_out :]
    if len(subjects) < args.sites:
        raise SystemExit(f"--ukb-subjects {args.ukb_subjects}: {len(subjects)} training subjects for {args.sites} sites")
    header = {"dataset": "ukb", "modalities": ukb.header["modalities"]}
    central = data / "ukb_central.json"
    atomic_write_json({**header, "training": subjects, "validation": held}, central)
    sites = []
    for i in range(args.sites):
        path = data / f"ukb_site{i + 1}.json"
        atomic_write_json({**header, "training": subjects[i :: args.sites], "validation": held}, path)
        sites.append(path)
    brats = list_cases("brats", root=brats_root)
    pool, held_brats = brats.training[: -args.brats_held_out], brats.training[-args.brats_held_out :]
    if len(pool) < max(args.shots):
        raise SystemExit(f"--brats-subjects {args.brats_subjects}: a pool of {len(pool)} cases cannot give {max(args.shots)} shots")
    return Data(central, sites, pool, held_brats, {"dataset": "brats", "modalities": brats.header["modalities"]})


# --------------------------------------------------------------------------- checkpoints
class Phase:
    """A resumable phase folder: ``progress.json`` names the engine checkpoints of its last commit."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / PROGRESS
        self.progress: dict[str, Any] | None = json.loads(path.read_text()) if path.is_file() else None

    def restore(self, engines: Mapping[str, Engine]) -> None:
        for name, engine in engines.items():
            engine.load_checkpoint(self.folder / self.progress["checkpoints"][name])

    def commit(self, progress: dict[str, Any], engines: Mapping[str, Engine], tag: str) -> None:
        """Write the engines' checkpoints for ``tag``, then ``progress.json`` naming them, then drop older ones."""
        files = {name: f"{name}_{tag}.pt" for name in engines}
        for name, engine in engines.items():
            engine.save_checkpoint(self.folder / files[name])
        atomic_write_json({**progress, "checkpoints": files}, self.folder / PROGRESS)
        for old in self.folder.glob("*.pt"):
            if old.name not in files.values():
                old.unlink()
        self.progress = {**progress, "checkpoints": files}


class Clock:
    """Wall and process CPU seconds, accumulated across resumed invocations."""

    def __init__(self, before: Mapping[str, float] | None = None):
        self.before = dict(before or {"wall_s": 0.0, "cpu_s": 0.0})
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def totals(self) -> dict[str, float]:
        return {"wall_s": round(self.before["wall_s"] + time.perf_counter() - self.wall, 1),
                "cpu_s": round(self.before["cpu_s"] + time.process_time() - self.cpu, 1)}


def stage1_config(args: argparse.Namespace, datalist: Path, steps: int, out: Path) -> RunConfig:
    return load_config(args.stage1_preset, [
        f"data.datalist={datalist}", "data.root=''", f"train.steps={steps}", "train.val_every=0",
        "train.progress=false", f"train.output_dir={out}", *args.stage1_set,
    ])


def export(engine: Engine, path: Path) -> Path:
    from bsf.model import save_encoder

    save_encoder(engine.model, path)
    return path


def stage1_central(args: argparse.Namespace, data: Data, out: Path) -> tuple[Path, dict[str, Any]]:
    """Central Stage 1: ``--stage1-steps`` steps, the held-out SSL loss every ``--stage1-curve`` steps."""
    phase, encoder = Phase(out / "stage1_central"), out / "stage1_central_encoder.pt"
    if encoder.is_file():
        say(f"stage 1 central: done before ({encoder})")
        return encoder, phase.progress
    engine = Engine(stage1_config(args, data.ukb_central, args.stage1_steps, phase.folder))
    progress = phase.progress or {"train": [], "curve": [], "cost": None}
    if phase.progress:
        phase.restore({"engine": engine})
        say(f"stage 1 central: continuing at step {engine.step}")
    clock = Clock(progress["cost"])
    while engine.step < args.stage1_steps:
        progress["train"] += engine.train_steps(min(args.stage1_curve, args.stage1_steps - engine.step))
        progress["curve"].append({"steps": engine.step, **engine.validate()})
        progress["cost"] = clock.totals()
        phase.commit(progress, {"engine": engine}, f"step{engine.step}")
        say(f"stage 1 central: step {engine.step}/{args.stage1_steps}, held-out SSL loss {progress['curve'][-1]['val_loss']:.4f}, "
            f"{progress['cost']['wall_s']:.0f} s")
    return export(engine, encoder), progress


def stage1_federated(args: argparse.Namespace, data: Data, out: Path) -> tuple[Path, dict[str, Any]]:
    """``--sites`` sites, FedAvg of the encoder by steps, ``--stage1-steps`` site steps in all."""
    phase, encoder = Phase(out / "stage1_federated"), out / "stage1_federated_encoder.pt"
    if encoder.is_file():
        say(f"stage 1 federated: done before ({encoder})")
        return encoder, phase.progress
    per_site = args.stage1_steps // args.sites
    rounds = per_site // args.local_steps
    settings = FederationConfig(rounds=rounds, local_steps=args.local_steps, scope="encoder", min_clients=args.sites,
                                validate_global=False, resume=False, cross_site_eval=False)
    sites = [SiteTrainer(Engine(stage1_config(args, path, per_site, phase.folder / f"site{i + 1}")), settings, site=f"site-{i + 1}")
             for i, path in enumerate(data.ukb_sites)]
    engines = {trainer.site: trainer.engine for trainer in sites}
    first = sites[0].engine.get_weights("encoder")
    global_model = {k: first[k] for k in sites[0].scope_keys}  # the server's initial model: every site's seeded init
    progress = phase.progress or {"rounds_done": 0, "train": {t.site: [] for t in sites}, "curve": [], "cost": None}
    if phase.progress:
        phase.restore(engines)
        global_model = {k: np.asarray(v, dtype=np.float32) for k, v in np.load(phase.folder / progress["global"]).items()}
        say(f"stage 1 federated: continuing at round {progress['rounds_done']}")
    every = max(1, math.ceil(args.stage1_curve / (args.sites * args.local_steps)))
    clock = Clock(progress["cost"])
    for current_round in range(progress["rounds_done"], rounds):
        mean = WeightedMean()
        for trainer in sites:
            result = trainer.train(global_model, current_round)
            mean.add(result.params, result.meta["NUM_STEPS_CURRENT_ROUND"], trainer.site)
            progress["train"][trainer.site] += result.records
        difference = mean.result()
        global_model = {k: global_model[k] + difference[k] for k in global_model}
        progress["rounds_done"] = current_round + 1
        total = progress["rounds_done"] * args.sites * args.local_steps
        if progress["rounds_done"] % every == 0 or progress["rounds_done"] == rounds:
            progress["curve"].append({"steps": total, **sites[0].validate(global_model)})  # site-1's heads, the global encoder
        progress["cost"] = clock.totals()
        tag = f"round{progress['rounds_done']}"
        progress["global"] = f"global_{tag}.npz"
        np.savez(phase.folder / progress["global"], **global_model)
        phase.commit(progress, engines, tag)
        for old in phase.folder.glob("global_*.npz"):
            if old.name != progress["global"]:
                old.unlink()
        say(f"stage 1 federated: round {progress['rounds_done']}/{rounds} ({total} site steps), {progress['cost']['wall_s']:.0f} s")
    sites[0].engine.set_weights(global_model)
    return export(sites[0].engine, encoder), progress


# --------------------------------------------------------------------------- stage 3
def few_shot(pool: Sequence[dict[str, Any]], shots: int, subset: int) -> list[dict[str, Any]]:
    """``shots`` cases of ``pool`` from a permutation seeded with ``subset`` (so smaller subsets nest in larger ones)."""
    order = np.random.default_rng(subset).permutation(len(pool))[:shots]
    return [pool[i] for i in sorted(order.tolist())]


def stage3_config(args: argparse.Namespace, datalist: Path, encoder: Path | None, seed: int, out: Path, steps: int | None = None) -> RunConfig:
    """One arm's Stage 3 config: ``--stage3-preset`` on ``datalist``, from ``encoder`` (None: scratch), seed ``seed``."""
    start = [f"model.pretrained={encoder}", f"model.pretrained_modalities=[{args.pretrained_modalities}]"] if encoder else ["model.pretrained=null"]
    return load_config(args.stage3_preset, [
        f"data.datalist={datalist}", "data.root=''", "data.fold=null", f"train.steps={steps or args.stage3_steps}",
        "train.val_every=0", "train.progress=false", f"train.output_dir={out}", f"seed={seed}", *start, *args.stage3_set,
    ])


def stage3_run(args: argparse.Namespace, data: Data, arm: str, encoder: Path | None, shots: int, subset: int, out: Path) -> dict[str, Any]:
    """Fine-tune one arm on one subset; the held-out Dice every ``--curve-every`` steps; ``result.json`` marks it done."""
    run_dir = out / "stage3" / f"{shots}shot_s{subset}_{arm}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    chosen = few_shot(data.brats_pool, shots, subset)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json({**data.brats_header, "training": chosen, "validation": data.brats_held_out}, run_dir / "datalist.json")
    config = stage3_config(args, run_dir / "datalist.json", encoder, subset, run_dir / "train")
    clock = Clock()
    engine = Engine(config)
    train, curve = [], []
    while engine.step < args.stage3_steps:
        train += engine.train_steps(min(args.curve_every, args.stage3_steps - engine.step))
        curve.append({"step": engine.step, **engine.validate()})
    record = {
        "arm": arm, "shots": shots, "subset": subset, "training_cases": [c["id"] for c in chosen],
        "held_out": len(data.brats_held_out), "dice": curve[-1]["val_dice_mean"], "final": curve[-1], "curve": curve,
        "train_loss": [r["loss"] for r in train], "cost": clock.totals(),
    }
    atomic_write_json(record, result_path)
    say(f"stage 3 {shots} shot(s), subset {subset}, {arm}: held-out Dice {record['dice']:.4f} ({record['cost']['wall_s']:.0f} s)")
    return record


# --------------------------------------------------------------------------- statistics and report
def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Mean of ``a - b`` over paired subsets, its sd and 95 % t interval, and how often ``a`` wins."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
    return {"n": n, "mean": float(d.mean()), "sd": sd, "ci95": [float(d.mean()) - half, float(d.mean()) + half],
            "wins": int((d > 0).sum()), "per_subset": d.tolist()}


def summarise(records: list[dict[str, Any]], shots: Sequence[int], subsets: int) -> dict[str, Any]:
    """Per shots: each arm's per-subset Dice, mean and sd, mean learning curve, and the paired differences."""
    out: dict[str, Any] = {}
    for k in shots:
        dice = {arm: [next(r["dice"] for r in records if (r["arm"], r["shots"], r["subset"]) == (arm, k, s)) for s in range(subsets)]
                for arm in ARMS}
        points = {arm: np.array([[p["val_dice_mean"] for p in r["curve"]] for r in records if (r["arm"], r["shots"]) == (arm, k)])
                  for arm in ARMS}  # (subsets, curve points)
        steps = [p["step"] for p in records[0]["curve"]]
        out[str(k)] = {
            "arms": {arm: {"per_subset": v, "mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")}
                     for arm, v in dice.items()},
            "paired": {f"{a} - {b}": paired(dice[a], dice[b]) for a, b in PAIRS},
            "curve": {"steps": steps, "mean": {a: v.mean(axis=0).tolist() for a, v in points.items()},
                      "sd": {a: v.std(axis=0, ddof=1).tolist() for a, v in points.items()}},
        }
    return out


def plot(result: dict[str, Any], central: dict[str, Any], federated: dict[str, Any], path: Path) -> Path:
    """Stage 1 losses (training, moving average; held-out) and Stage 3 held-out Dice per arm against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bsf.report import moving_average

    shots = list(result["stage3"])
    fig, axes = plt.subplots(1, 1 + len(shots), figsize=(5 * (1 + len(shots)), 4))
    ax = axes[0]
    window = max(1, len(central["train"]) // 30)
    ax.plot(np.arange(1, len(central["train"]) + 1), moving_average([r["loss"] for r in central["train"]], window), label="central, training")
    site_losses = np.mean([[r["loss"] for r in v] for v in federated["train"].values()], axis=0)  # mean over sites per local step
    sites = len(federated["train"])
    ax.plot(np.arange(1, len(site_losses) + 1) * sites, moving_average(site_losses.tolist(), max(1, window // sites)), label="federated, training (site mean)")
    for name, progress in (("central", central), ("federated", federated)):
        ax.plot([p["steps"] for p in progress["curve"]], [p["val_loss"] for p in progress["curve"]], "o--", label=f"{name}, held-out")
    ax.set(xlabel="Stage 1 steps (all sites)", ylabel="SSL loss", title="Stage 1")
    ax.legend(fontsize=7)
    for ax, k in zip(axes[1:], shots):
        curve = result["stage3"][k]["curve"]
        for arm in ARMS:
            mean, sd = np.array(curve["mean"][arm]), np.array(curve["sd"][arm])
            ax.plot(curve["steps"], mean, "o-", label=arm)
            ax.fill_between(curve["steps"], mean - sd, mean + sd, alpha=0.15)
        ax.set(xlabel="Stage 3 steps", ylabel="held-out mean Dice (mean ± sd over subsets)", title=f"Stage 3, {k} labelled case(s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: dict[str, Any], path: Path) -> Path:
    lines = ["# Does pretraining help few-shot Stage 3? (synthetic data)", "", f"Command: `{result['command']}`", "",
             f"Setting: {json.dumps(result['setting'])}", "", "## Held-out mean Dice (TC, WT, ET), last model", "",
             "| labelled cases | " + " | ".join(ARMS) + " |", "|---|" + "---|" * len(ARMS)]
    for k, entry in result["stage3"].items():
        lines.append(f"| {k} | " + " | ".join(f"{entry['arms'][a]['mean']:.4f} ± {entry['arms'][a]['sd']:.4f}" for a in ARMS) + " |")
    lines += ["", "## Paired differences (same subset and seed), 95 % t interval", "",
              "| labelled cases | pair | mean | 95 % interval | first arm better |", "|---|---|---|---|---|"]
    for k, entry in result["stage3"].items():
        for pair, d in entry["paired"].items():
            lines.append(f"| {k} | {pair} | {d['mean']:+.4f} | [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] | {d['wins']}/{d['n']} |")
    lines += ["", "## Stage 1", ""]
    for name, s in result["stage1"].items():
        lines.append(f"- {name}: held-out SSL loss {s['held_out_first']:.4f} -> {s['held_out_last']:.4f} "
                     f"(reconstruction L1 {s['held_out_l1_last']:.4f}); {s['cost']['wall_s']:.0f} s wall, {s['cost']['cpu_s']:.0f} s CPU")
    lines += ["", "## Cost", "", f"```\n{json.dumps(result['cost'], indent=1)}\n```", "", "![curves](evidence.png)", ""]
    path.write_text("\n".join(lines))
    return path


def stage1_summary(progress: Mapping[str, Any]) -> dict[str, Any]:
    curve = progress["curve"]
    return {"held_out_first": curve[0]["val_loss"], "held_out_last": curve[-1]["val_loss"],
            "held_out_l1_last": curve[-1]["val_reconstruction_l1"], "curve": curve, "cost": progress["cost"]}


# --------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    """The options; those a size sets default to None here and are filled in by :func:`resolve_args`."""
    cpu = SIZES["cpu"]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="the protocol's size (default cpu; see SIZES)")
    p.add_argument("--ukb-subjects", type=int, help=f"UKB-like subjects (cpu: {cpu['ukb_subjects']})")
    p.add_argument("--ukb-held-out", type=int, help="UKB-like subjects that score the SSL models")
    p.add_argument("--brats-subjects", type=int)
    p.add_argument("--brats-held-out", type=int, help="BraTS-like cases that score Stage 3 (never trained on)")
    p.add_argument("--spacing", type=float, help="synthetic voxel size, mm")
    p.add_argument("--sites", type=int)
    p.add_argument("--stage1-steps", type=int, help="central steps = the federation's steps over all sites")
    p.add_argument("--local-steps", type=int, help="federated: steps per site and round")
    p.add_argument("--stage1-curve", type=int, help="held-out SSL loss (and a checkpoint) every this many total steps")
    p.add_argument("--stage1-preset")
    p.add_argument("--stage1-set", nargs="*", metavar="key=value", help="Stage 1 overrides (both arms; replace the size's)")
    p.add_argument("--shots", help="labelled BraTS-like cases per few-shot subset, e.g. 1,2")
    p.add_argument("--subsets", type=int, help="seeded subsets per shot count (= fine-tuning seeds)")
    p.add_argument("--stage3-steps", type=int)
    p.add_argument("--curve-every", type=int, help="score on the held-out cases every this many Stage 3 steps")
    p.add_argument("--stage3-preset")
    p.add_argument("--stage3-set", nargs="*", metavar="key=value",
                   help="Stage 3 overrides (every arm; replace the size's, cpu: one crop per step)")
    p.add_argument("--pretrained-modalities", default="t1,flair", help="the Stage 1 encoder's channels")
    p.add_argument("--synth-workers", type=int, default=1, help="processes that write the synthetic subjects (same files)")
    p.add_argument("--tiny", action="store_true", help="= --size tiny: the script end to end in minutes")
    return p


def resolve_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``, fill what it leaves out from its size, parse ``--shots`` and check the combination."""
    args = build_parser().parse_args(argv)
    if args.tiny and args.size not in (None, "tiny"):
        raise SystemExit(f"--tiny and --size {args.size}: choose one")
    args.size = "tiny" if args.tiny else (args.size or "cpu")
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    args.shots = [int(k) for k in str(args.shots).split(",")]
    check(args)
    return args


def check(args: argparse.Namespace) -> None:
    per_site = args.stage1_steps // args.sites
    if args.stage1_steps % args.sites or per_site % args.local_steps:
        raise SystemExit(f"--stage1-steps {args.stage1_steps} must split into {args.sites} sites x whole rounds of --local-steps {args.local_steps}")
    if min(args.shots) < 1 or args.subsets < 2:
        raise SystemExit("--shots must be >= 1 and --subsets >= 2 (paired intervals need two subsets)")


def main(argv: list[str] | None = None) -> int:
    args = resolve_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out).resolve()
    load_before = os.getloadavg()
    clock = Clock()
    data = make_data(out, args)
    central_encoder, central = stage1_central(args, data, out)
    federated_encoder, federated = stage1_federated(args, data, out)
    encoders = {"scratch": None, "central": central_encoder, "federated": federated_encoder}
    records = [stage3_run(args, data, arm, encoders[arm], k, s, out) for k in args.shots for s in range(args.subsets) for arm in ARMS]
    stage3_cost = {"wall_s": round(sum(r["cost"]["wall_s"] for r in records), 1), "cpu_s": round(sum(r["cost"]["cpu_s"] for r in records), 1)}
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if argv is None else " ".join(argv),
        "setting": {k: v for k, v in vars(args).items() if k not in ("out", "synth_workers")},
        "stage1": {"central": stage1_summary(central), "federated": stage1_summary(federated)},
        "stage3": summarise(records, args.shots, args.subsets),
        "cost": {"stage1_central": central["cost"], "stage1_federated": federated["cost"], "stage3_all_runs": stage3_cost,
                 "this_invocation": clock.totals(), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                 "load_average_1min": {"start": round(load_before[0], 2), "end": round(os.getloadavg()[0], 2)}, "cpus": os.cpu_count()},
        "runs": records,
    }
    atomic_write_json(result, out / "evidence.json")
    plot(result, central, federated, out / "evidence.png")
    write_report(result, out / "report.md")
    for k, entry in result["stage3"].items():
        for pair, d in entry["paired"].items():
            say(f"{k} labelled case(s): {pair} = {d['mean']:+.4f}, 95 % interval [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}], "
                f"first arm better in {d['wins']}/{d['n']}")
    say(f"{out / 'report.md'}, {out / 'evidence.json'}, {out / 'evidence.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
