"""The ``bsf`` command. User errors print one line and exit 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from bsf.errors import BSFError

log = logging.getLogger("bsf")


def run_guarded(action: Callable[[], Any]) -> int:
    """Run ``action``; a :class:`BSFError` becomes ``error: <message>`` on stderr and exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        action()
    except BSFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


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
    from bsf.data.synth import synthesize

    out = _output_folder(args.out)
    folders = synthesize(args.dataset, args.subjects, out, spacing=args.spacing, seed=args.seed, progress=True)
    print(f"wrote {len(folders)} {args.dataset} subject(s) to {out} (spacing {args.spacing} mm, seed {args.seed})")


def _output_folder(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise BSFError(f"output folder {out}: exists and is not a folder")
    return out


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
    from bsf.model import normalize_checkpoint_keys, save_encoder, select_weights

    source = Path(args.model)
    if not source.is_file():
        raise BSFError(f"model {source}: no such file")
    encoder = select_weights(normalize_checkpoint_keys(source), "encoder")
    if not encoder:
        raise BSFError(f"model {source}: holds no encoder (swinViT.*) weights")
    save_encoder(encoder, args.out)
    print(f"wrote encoder checkpoint ({len(encoder)} tensors) to {args.out}")


# ----------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from bsf.demo import run_demo

    run_demo(Path(args.out), subjects=args.subjects, steps=args.steps)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML file or shipped preset name (see `bsf presets`)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint_last.pt when present")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=200")


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
    synth.set_defaults(func=cmd_data_synth)

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
    export.add_argument("--model", required=True, help="checkpoint_best.pt, FL_global_model.pt or any supported layout")
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_export)

    demo = sub.add_parser("demo", help="synthesise a small UKB-like set and run Stage 1 SSL on CPU")
    demo.add_argument("--out", default="demo_out")
    demo.add_argument("--subjects", type=int, default=4)
    demo.add_argument("--steps", type=int, default=60)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_guarded(lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
