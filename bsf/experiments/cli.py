"""``bsf experiment cv|fewshot|single-modality|atlas``: argument parsing and the one call into each protocol.

Imported by every ``bsf`` command, so the protocols (torch, MONAI, matplotlib) are imported only when one runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bsf.console import number_list
from bsf.errors import ConfigError

if TYPE_CHECKING:
    from bsf.experiments.runner import Experiment, RunSpec


DEFAULT_PRESETS = {"brats": "stage3_brats", "atlas": "stage3_atlas"}


#: ``--folds`` / ``--seeds``: ``0-4`` or ``0,2``, distinct and non-negative; ``--percents``: distinct, in (0, 100]
INDICES = number_list(int, ranges=True, minimum=0, distinct=True, example="0-4 or 0,2")
PERCENTS = number_list(float, above=0, maximum=100, distinct=True, example="5,10,20,40")


def _experiment(args: argparse.Namespace, protocol: str, dataset: str, default_modalities: list[str] | None = None) -> "Experiment":
    from bsf.experiments.cases import experiment_cases
    from bsf.experiments.runner import Experiment, make_arms

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    modalities = [m.strip() for m in args.pretrained_modalities.split(",") if m.strip()] if args.pretrained_modalities else default_modalities
    return Experiment(
        protocol=protocol,
        out=out.resolve(),
        preset=args.preset or DEFAULT_PRESETS[dataset],
        overrides=list(args.overrides),
        cases=experiment_cases(dataset, datalist=args.datalist, root=args.root, out=out.resolve()),
        arms=make_arms(args.pretrained, modalities if args.pretrained else None, not args.no_scratch),
        checkpoint=args.checkpoint,
        federated_local_steps=args.local_steps if args.federated else None,
    )


def _run(experiment: "Experiment", plan: "list[RunSpec]", report: Callable) -> None:
    from bsf.experiments.runner import run_experiment

    outcome = run_experiment(experiment, plan, report)
    print(
        f"{experiment.protocol}: {len(plan)} run(s), {len(outcome.executed)} trained now, {len(outcome.skipped)} finished before; "
        f"report: {experiment.out / 'report.md'}"
    )


def cmd_cv(args: argparse.Namespace) -> None:
    from bsf.experiments import cv

    experiment = _experiment(args, "cv", args.dataset)
    _run(experiment, cv.plan(experiment, args.folds, args.seeds), cv.report)


def cmd_single_modality(args: argparse.Namespace) -> None:
    from bsf.experiments import single_modality

    experiment = _experiment(args, "single-modality", args.dataset, ["t1"])
    runs = single_modality.plan(experiment, args.folds, args.seeds)
    _run(experiment, runs, single_modality.report)


def cmd_fewshot(args: argparse.Namespace) -> None:
    from bsf.experiments import fewshot

    experiment = _experiment(args, "fewshot", args.dataset)
    fold = None if args.dataset == "atlas" else args.fold
    _run(experiment, fewshot.plan(experiment, sorted(args.percents), args.subsets, fold), fewshot.report)


def cmd_atlas(args: argparse.Namespace) -> None:
    from bsf.experiments import atlas

    experiment = _experiment(args, "atlas", "atlas")
    _run(experiment, atlas.plan(experiment, args.seeds), atlas.report)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the experiment's report folder (a rerun resumes it)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--datalist", help="datalist JSON (`bsf data index`); BraTS with folds, ATLAS with a validation list")
    data.add_argument("--root", help="a data folder in its distributed layout, indexed into OUT/datalist.json")
    parser.add_argument("--preset", help="Stage 3 config: preset name or YAML (default: stage3_brats / stage3_atlas; CPU: *_test)")
    parser.add_argument("--pretrained", help="encoder to fine-tune from (Stage 2 or Stage 1 model, any layout bsf reads)")
    parser.add_argument(
        "--pretrained-modalities",
        help="the encoder's input channels, comma-separated (e.g. t1,flair for Stage 1, flair,t1ce,t1,t2 for Stage 2 BraTS); "
        "default: the preset's model.pretrained_modalities",
    )
    parser.add_argument("--no-scratch", action="store_true", help="leave out the from-scratch (random initialisation) arm")
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last",
                        help="model scored on the held-out cases: the final one (default) or the best by validation Dice")
    parser.add_argument("--federated", action="store_true",
                        help="train each run as a one-site NVFlare federation in the simulator (equals centralized training)")
    parser.add_argument("--local-steps", type=int, default=10, help="--federated: steps per round; must divide train.steps (default 10)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run, e.g. train.steps=2000")


def add_experiment_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``bsf experiment ...`` to the ``bsf`` command's subparsers."""
    experiment = sub.add_parser("experiment", help="the paper's protocols: cross-validation, few-shot, T1-only, ATLAS; resumable reports")
    protocols = experiment.add_subparsers(dest="experiment_command", required=True)

    p = protocols.add_parser("cv", help="Stage 3 on each fold of the official BraTS split (paper Tables 4, 8)")
    p.add_argument("--dataset", choices=("brats",), default="brats")
    p.add_argument("--folds", type=INDICES, default="0-4", help="folds to hold out, e.g. 0-4 or 0,2 (default 0-4)")
    p.add_argument("--seeds", type=INDICES, default="0", help="training seeds per fold, e.g. 0-2 (default 0)")
    _common(p)
    p.set_defaults(func=cmd_cv)

    p = protocols.add_parser("fewshot", help="Stage 3 on 5/10/20/40 %% of the training cases, seeded subsets (paper Figure 5, Table 9)")
    p.add_argument("--dataset", choices=("brats", "atlas"), default="brats")
    p.add_argument("--percents", type=PERCENTS, default="5,10,20,40", help="shares of the training cases, %% (default 5,10,20,40)")
    p.add_argument("--subsets", type=int, default=5, help="seeded random subsets per share (default 5)")
    p.add_argument("--fold", type=int, default=0, help="BraTS fold held out for scoring (default 0); ATLAS: the validation list")
    _common(p)
    p.set_defaults(func=cmd_fewshot)

    p = protocols.add_parser("single-modality", help="T1-only cross-validation, both input channels carrying T1 (paper Table 5)")
    p.add_argument("--dataset", choices=("brats",), default="brats")
    p.add_argument("--folds", type=INDICES, default="0-4", help="folds to hold out (default 0-4)")
    p.add_argument("--seeds", type=INDICES, default="0", help="training seeds per fold (default 0)")
    _common(p)
    p.set_defaults(func=cmd_single_modality)

    p = protocols.add_parser("atlas", help="ATLAS challenge metrics on the held-out cases (paper Table 6)")
    p.add_argument("--seeds", type=INDICES, default="0", help="training seeds (default 0)")
    _common(p)
    p.set_defaults(func=cmd_atlas)
