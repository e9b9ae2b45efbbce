"""The ``bsf`` command. User errors print one line and exit 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Sequence

from bsf.bench.cli import add_bench_parser
from bsf.config import TASKS
from bsf.console import IntermixedArgumentParser, add_train_arguments, number_list, positive_int, run_guarded
from bsf.errors import BSFError
from bsf.experiments.cli import add_experiment_parser
from bsf.outputs import add_force_argument
from bsf.pipeline.chain import add_chain_parser
from bsf.pipeline.deploy_cli import add_deploy_parser
from bsf.fl.jobs import add_jobs_parser

log = logging.getLogger("bsf")


# ---------------------------------------------------------------------- model
def cmd_model_info(args: argparse.Namespace) -> None:
    from bsf.model import build_swin_unetr, count_parameters, get_size

    size = get_size(args.size)
    model = build_swin_unetr(args.size, args.in_channels, args.out_channels)
    info = {
        "size": args.size,
        "feature_size": size.feature_size,
        "depths": list(size.depths),
        "window_size": size.window_size,
        "in_channels": args.in_channels,
        "out_channels": args.out_channels,
        "total_parameters": count_parameters(model),
        "encoder_parameters": count_parameters(model.swinViT),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"SwinUNETR-{args.size}: feature_size {size.feature_size}, depths {size.depths}, window {size.window_size}")
    print(f"  in {args.in_channels} / out {args.out_channels} channels")
    print(f"  total parameters:             {info['total_parameters']:>12,}")
    print(f"  encoder (swinViT) parameters: {info['encoder_parameters']:>12,}")


# ----------------------------------------------------------------------- data
def cmd_data_synth(args: argparse.Namespace) -> None:
    from bsf.config import parse_override
    from bsf.data.synth import ScannerProfile, synthesize

    scanner = ScannerProfile.from_mapping(dict(parse_override(item) for item in args.scanner))
    out = Path(args.out)
    folders = synthesize(args.dataset, args.subjects, out, spacing=args.spacing, seed=args.seed, progress=True,
                         scanner=scanner, replace=args.force)
    print(f"wrote {len(folders)} {args.dataset} subject(s) to {out} (spacing {args.spacing} mm, seed {args.seed}, {scanner})")


def cmd_data_index(args: argparse.Namespace) -> None:
    from bsf.data.index import index_dataset
    from bsf.io import atomic_write_json
    from bsf.outputs import check_output_file

    inputs = [args.folds_file] if args.folds_file else []
    check_output_file(args.out, what="datalist", inputs=inputs, force=args.force)
    result = index_dataset(
        args.dataset,
        args.root,
        min_slices=args.min_slices,
        val_count=args.val_count,
        seed=args.seed,
        fold=args.fold,
        folds_file=args.folds_file,
        workers=args.workers,
    )
    for note in result.notes:
        print(f"note: {note}")
    datalist = result.datalist
    cases = datalist["training"] + datalist.get("validation", [])
    check_output_file(args.out, what="datalist", inputs=[*inputs, *_case_paths(cases, Path(args.root))], force=args.force)
    atomic_write_json(datalist, args.out)
    if "validation" in datalist:
        folds = f" (fold {args.fold})" if args.fold is not None else ""
        split = f"{len(datalist['training'])} training and {len(datalist['validation'])} validation{folds}"
    else:
        split = f"{len(datalist['training'])} training (no validation list: pick a fold with --fold K or data.fold)"
    print(f"wrote {args.out}: {split} {args.dataset} case(s), paths relative to {args.root}")


def cmd_data_check(args: argparse.Namespace) -> None:
    from bsf.data.check import check_cases
    from bsf.data.index import read_datalist, without
    from bsf.errors import OutputError
    from bsf.io import atomic_write_json
    from bsf.outputs import FileSet, check_output_file, same_file

    listing = read_datalist(args.datalist, args.root)
    labels = args.labels if args.labels is not None else listing.content.get("labels")
    cases = listing.all_cases
    # the outputs, before any file is read: never the datalist or a case's file (even with --force), else new or --force
    inputs = FileSet([args.datalist, *_case_paths(cases, listing.base)])
    for flag, path in (("--write-clean", args.write_clean), ("--json", args.json)):
        if path:
            check_output_file(path, what=f"{flag} file", inputs=inputs, force=args.force)
    if args.write_clean and args.json and same_file(args.write_clean, args.json):
        raise OutputError(f"--write-clean {args.write_clean} and --json {args.json}: are one file; give two paths")
    report = check_cases(
        cases,
        listing.base,
        data=not args.headers_only,
        workers=args.workers,
        progress=not args.no_progress,
        dataset=listing.dataset,
        labels=labels,
    )
    if report.problems:
        print(report.table(listing.base))
    print(report.summary())
    if args.json:
        atomic_write_json(report.to_dict(), args.json)
    if args.write_clean:
        broken = {_case_id(cases[i]) for i in report.broken}
        clean = without(listing.content, broken, "failed `bsf data check`")
        if "root" not in clean:
            clean["root"] = str(listing.base.resolve())
        atomic_write_json(clean, args.write_clean)
        print(f"wrote {args.write_clean} without {len(broken)} broken case(s)")
    if not report.ok:
        raise BSFError(f"{len(report.broken)} of {len(cases)} case(s) in {args.datalist} are broken (table above)")


def _case_id(case: dict) -> str:
    from bsf.data.index import case_id

    return case_id(case)


def _case_paths(cases: Sequence[dict], base: Path) -> list[Path]:
    """Every file (images, label) the datalist ``cases`` name, relative paths joined to ``base``."""
    from bsf.data.check import case_files

    return [Path(path) if Path(path).is_absolute() else base / path for case in cases for _, path in case_files(case)]


def cmd_site_check(args: argparse.Namespace) -> None:
    from bsf.federation.site_check import check_site

    report = check_site(args.site_config, overrides=args.overrides, site=args.site, config=args.config, full=args.full, workers=args.workers)
    print(report.text())
    if not report.ok:
        raise BSFError(f"site config {args.site_config}: {report.failure()}")


def cmd_site_preflight(args: argparse.Namespace) -> None:
    from bsf.federation.site_check import preflight_site

    report = preflight_site(args.site_config, overrides=args.overrides, site=args.site, config=args.config)
    print(report.text())
    if not report.ok:
        raise BSFError(f"site config {args.site_config}: this machine cannot hold job {args.config}; change the settings named above")


# ---------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> None:
    from bsf.train import run_from_args

    summary = run_from_args(args)
    print(f"trained {summary['steps_this_run']} steps in {summary['seconds']:.1f} s; summary: {Path(summary['checkpoints']['last']).parent / 'summary.json'}")


def cmd_presets(args: argparse.Namespace) -> None:
    from bsf.config import list_presets

    print("\n".join(list_presets()))


def cmd_config(args: argparse.Namespace) -> None:
    import yaml

    from bsf.config import load_config

    print(yaml.safe_dump(load_config(args.config, args.overrides).to_dict(), sort_keys=False), end="")


# --------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> None:
    from bsf.federation.export import export_global_encoder, export_task_model

    if args.task:
        written = export_task_model(args.model, args.task, args.out, config=args.config, force=args.force)
        print(f"wrote the {args.task} model {written} (bsf predict / evaluate / bundle export take it)")
        return
    written = export_global_encoder(args.model, args.out, force=args.force)
    print(f"wrote the encoder checkpoint {written}")


# ----------------------------------------------------- predict / evaluate / bundle
def _finetuned(args: argparse.Namespace, overrides: Sequence[str]):
    from bsf.predict import load_finetuned

    return load_finetuned(args.model, args.config, overrides, device=args.device)


def _split_overrides(inputs: Sequence[str], overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """``key=value`` items that argparse gave to ``--input`` (they came right after it) go back to the overrides."""
    import re

    looks_like_override = re.compile(r"^[A-Za-z_]+\.[A-Za-z_.]+=")
    moved = [item for item in inputs if looks_like_override.match(item) and not Path(item).exists()]
    return [item for item in inputs if item not in moved], [*overrides, *moved]


def cmd_predict(args: argparse.Namespace) -> None:
    from bsf.predict import check_input_paths, check_prediction_output, label_counts, predict_to_file

    inputs, overrides = _split_overrides(args.input, args.overrides)
    check_input_paths(inputs)
    check_prediction_output(args.output, inputs, force=args.force)  # before the model loads; again with the case's files
    finetuned = _finetuned(args, overrides)
    prediction = predict_to_file(finetuned, inputs, args.output, progress=not args.no_progress, force=args.force, max_voxels=_max_voxels(args))
    counts = ", ".join(f"{label}: {n}" for label, n in label_counts(prediction.labels).items())
    print(f"wrote {args.output}: {finetuned.dataset} label map {prediction.labels.shape} in the input's grid (voxels per label {counts})")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from bsf.evaluate import check_evaluation_outputs, evaluate, format_table

    out = Path(args.out) if args.out else Path(args.model).parent / f"evaluate_{args.split}"
    check_evaluation_outputs(out, inputs=[args.model, args.datalist], force=args.force)  # before the model loads
    finetuned = _finetuned(args, args.overrides)
    result = evaluate(
        finetuned,
        args.datalist,
        split=args.split,
        root=args.root,
        out_dir=out,
        progress=not args.no_progress,
        save_predictions=args.save_predictions,
        max_voxels=_max_voxels(args),
        force=args.force,
    )
    print(format_table(result))
    print(f"{result.summary['n']} {args.split} case(s); wrote {result.csv_path} and {result.json_path}")


def cmd_bundle_export(args: argparse.Namespace) -> None:
    from bsf.bundle import export_bundle

    out = export_bundle(_finetuned(args, args.overrides), args.out, force=args.force)
    print(f"wrote MONAI bundle {out}: configs/inference.json, configs/metadata.json, models/model.pt (run it: {out / 'docs' / 'README.md'})")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint_last.pt, checkpoint_best.pt or an NVFlare (best_)FL_global_model.pt")
    parser.add_argument("--config", default=None, help="training config (YAML or preset); default: the one in/beside the model file")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. finetune.threshold=0.4")


def add_max_voxels_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-voxels", type=positive_int, default=None, metavar="N",
                        help="refuse an input file whose header claims more voxels than N, before reading it "
                             "(default: bsf.predict.DEFAULT_MAX_VOXELS, 2**26 = 67,108,864)")


def _max_voxels(args: argparse.Namespace) -> int:
    from bsf.predict import DEFAULT_MAX_VOXELS

    return args.max_voxels or DEFAULT_MAX_VOXELS


# ----------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from bsf.demo import run_demo

    run_demo(Path(args.out), subjects=args.subjects, steps=args.steps, pipeline=not args.no_pipeline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bsf", description="BrainSegFounder-FL: federated 3D brain-MRI foundation model")
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="model sizes and parameter counts").add_subparsers(dest="model_command", required=True)
    info = model.add_parser("info", help="print total and encoder parameter counts")
    info.add_argument("--size", default="small", help="test | tiny | small | big")
    info.add_argument("--in-channels", type=int, default=4)
    info.add_argument("--out-channels", type=int, default=3)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_model_info)

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write a synthetic data set in a real layout, built from the MNI152 template")
    synth.add_argument("--dataset", required=True, choices=["ukb", "brats", "atlas"])
    synth.add_argument("--subjects", type=int, required=True)
    synth.add_argument("--out", required=True)
    synth.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm (3 makes small CPU-friendly volumes)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--scanner", nargs="+", default=[], metavar="KEY=VALUE",
                       help="a site's scanner look (bsf.data.synth.ScannerProfile), e.g. intensity_scale=1.5 "
                            "bias_strength=0.3 noise=2 resolution=6")
    add_force_argument(synth, "write over subjects that exist in --out already (the same ids; without it they are refused)")
    synth.set_defaults(func=cmd_data_synth)

    index = data.add_parser("index", help="find a data set's cases in its distributed layout and write a datalist JSON")
    index.add_argument("--dataset", required=True, choices=["ukb", "brats", "atlas"])
    index.add_argument("--root", required=True, help="the data set's folder (paths in the datalist are relative to it)")
    index.add_argument("--out", required=True, help="datalist JSON to write")
    index.add_argument("--min-slices", type=int, default=100, help="UKB: keep subjects whose T1w and FLAIR have at least this many slices")
    index.add_argument("--val-count", type=int, default=None, help="UKB/ATLAS: size of the seeded held-out validation set (default 100)")
    index.add_argument("--seed", type=int, default=0, help="seed of the held-out set")
    index.add_argument("--fold", type=int, default=None, help="BraTS: fold K becomes validation, the other folds training")
    index.add_argument("--folds-file", default=None, help="BraTS: another fold file (MONAI datalist with 'fold' keys)")
    index.add_argument("--workers", type=int, default=4, help="threads reading headers")
    add_force_argument(index, "replace --out when it already exists (never the folds file or a case's file)")
    index.set_defaults(func=cmd_data_index)

    check = data.add_parser("check", help="check every file of a datalist (headers, then voxels) and print a table of problems")
    check.add_argument("--datalist", required=True)
    check.add_argument("--root", default=None, help="folder the datalist's paths are relative to (default: its 'root', else its folder)")
    check.add_argument("--workers", type=positive_int, default=4, help="threads")
    check.add_argument("--headers-only", action="store_true", help="skip decoding the voxels")
    check.add_argument("--labels", type=number_list(int, minimum=0, example="0,1,2,4"), default=None,
                       help="allowed label values, e.g. 0,1,2,4 (default: from the data set and case names)")
    check.add_argument("--write-clean", default=None, metavar="OUT", help="write a datalist without the broken cases")
    check.add_argument("--json", default=None, metavar="OUT", help="write the problems as JSON")
    check.add_argument("--no-progress", action="store_true")
    add_force_argument(check, "replace an existing --write-clean or --json file (never the datalist itself or a case's file)")
    check.set_defaults(func=cmd_data_check)

    # key=value overrides anywhere on the line, also after --site/--config (IntermixedArgumentParser)
    site = sub.add_parser("site", help="site configuration").add_subparsers(dest="site_command", required=True,
                                                                          parser_class=IntermixedArgumentParser)
    site_check = site.add_parser("check", help="validate a site YAML (keys, paths) and check its data's headers")
    site_check.add_argument("site_config", help="e.g. sites/brats.yaml, or a site map with --site")
    site_check.add_argument("overrides", nargs="*", metavar="key=value", default=[],
                            help="extra overrides, anywhere on the line, e.g. data.root=/mnt/brats")
    site_check.add_argument("--site", default="site-1", help="site name to pick from a site map")
    site_check.add_argument("--config", default=None, help="job config (YAML or preset) the site joins; checks channels")
    site_check.add_argument("--full", action="store_true", help="also decode every voxel")
    site_check.add_argument("--workers", type=positive_int, default=4, help="threads")
    site_check.set_defaults(func=cmd_site_check)
    preflight = site.add_parser("preflight", help="what the job needs from this machine (RAM, GPU memory, cache disk, CPU cores) and whether it fits")
    preflight.add_argument("site_config", help="e.g. sites/brats.yaml, or a site map with --site")
    preflight.add_argument("overrides", nargs="*", metavar="key=value", default=[],
                           help="extra overrides, anywhere on the line, e.g. data.roi=[64,64,64]")
    preflight.add_argument("--site", default="site-1", help="site name to pick from a site map")
    preflight.add_argument("--config", required=True, help="job config (YAML, e.g. a job's app/config/bsf_run.yaml, or preset)")
    preflight.set_defaults(func=cmd_site_preflight)

    train = sub.add_parser("train", help="centralized training (one process; torchrun -m bsf.train for several)")
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    config = sub.add_parser("config", help="print the resolved configuration")
    config.add_argument("--config", required=True)
    config.add_argument("overrides", nargs="*", metavar="key=value")
    config.set_defaults(func=cmd_config)

    presets = sub.add_parser("presets", help="list the shipped configuration presets")
    presets.set_defaults(func=cmd_presets)

    export = sub.add_parser("export", help="write the encoder of a model/checkpoint as an encoder checkpoint for the next stage")
    export.add_argument("--model", required=True, help="checkpoint_best.pt, FL_global_model.pt (or a server run folder / simulator workspace) or any supported layout")
    export.add_argument("--out", required=True, help="encoder checkpoint to write (never the model itself)")
    export.add_argument("--force", action="store_true", help="replace --out when it already exists")
    export.add_argument("--task", choices=TASKS, default=None,
                        help="Stage 3 across tasks: write this task's whole model (shared parts + its head) instead of the encoder")
    export.add_argument("--config", default=None, help="with --task: the job's run config (default: config/bsf_run.yaml beside the model)")
    export.set_defaults(func=cmd_export)

    predict = sub.add_parser("predict", help="segment one case with a fine-tuned model: a label map in the input's grid and affine")
    add_model_arguments(predict)
    predict.add_argument("--input", required=True, nargs="+", metavar="CASE_DIR_OR_FILE",
                         help="a BraTS case folder (modalities found by suffix), an ATLAS T1w file or folder, or NIfTI files in the model's modality order")
    predict.add_argument("--output", required=True, help="label map to write (.nii.gz); never one of the inputs")
    add_force_argument(predict, "replace --output when it already exists (never an input, nor the case's label or other images)")
    add_max_voxels_argument(predict)
    predict.add_argument("--no-progress", action="store_true")
    predict.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser("evaluate", help="score a fine-tuned model on a datalist: per-case CSV, summary JSON, table")
    add_model_arguments(evaluate)
    evaluate.add_argument("--datalist", required=True, help="datalist JSON (`bsf data index`); cases need a label")
    evaluate.add_argument("--split", default="validation", choices=["validation", "training", "all"])
    evaluate.add_argument("--root", default=None, help="folder the datalist's paths are relative to (default: its 'root', else its folder)")
    evaluate.add_argument("--out", default=None, help="output folder (default: MODEL_FOLDER/evaluate_SPLIT)")
    add_force_argument(evaluate, "replace the metrics.csv, summary.json (and predictions) of an earlier evaluation in --out")
    evaluate.add_argument("--save-predictions", action="store_true",
                          help="also write each case's label map to OUT/predictions/<case id, made a safe file name>.nii.gz")
    add_max_voxels_argument(evaluate)
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    bundle = sub.add_parser("bundle", help="MONAI bundles").add_subparsers(dest="bundle_command", required=True)
    bundle_export = bundle.add_parser("export", help="write a fine-tuned model as a MONAI bundle (configs + weights)")
    add_model_arguments(bundle_export)
    bundle_export.add_argument("--out", required=True, help="bundle folder to write (new or empty)")
    bundle_export.add_argument("--force", action="store_true", help="write into a folder that already holds files (the bundle's files are replaced)")
    bundle_export.set_defaults(func=cmd_bundle_export)

    demo = sub.add_parser("demo", help="on CPU: Stage 1 SSL centrally, then Stage 1 -> 2 -> 3 federated on 5 simulated sites, with a report")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--subjects", type=int, default=4)
    demo.add_argument("--steps", type=int, default=60)
    demo.add_argument("--no-pipeline", action="store_true", help="skip part 2, the federated Stage 1 -> 2 -> 3 chain")
    demo.set_defaults(func=cmd_demo)
    add_bench_parser(sub)
    add_experiment_parser(sub)
    add_deploy_parser(sub)
    add_jobs_parser(sub)
    add_chain_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_guarded(lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
