"""Does Stage 1 (+2) pretraining improve few-shot Stage 3 Dice over random initialisation? (synthetic data, CPU)

    python benchmarks/pretraining_evidence.py --out /tmp/bsf_evidence            # ~40 min on 2 free CPU cores
    python benchmarks/pretraining_evidence.py --out /tmp/e --tiny                # minutes: a smoke test of the script

1. Synthesises UKB-like and BraTS-like subjects (``--spacing`` mm) once under ``OUT/data``; the BraTS cases are indexed
   with the official 5-fold split (``OUT/data/brats.json``).
2. Stage 1: SSL (``stage1_test``) on the UKB-like subjects, ``--stage1-steps`` steps; its encoder -> ``OUT/stage1_encoder.pt``.
3. Stage 2: SSL (``stage2_brats_test``) on the BraTS-like cases outside the held-out fold ``--fold``, from the Stage 1
   encoder, ``--stage2-steps`` steps (0: skip Stage 2); encoder -> ``OUT/stage2_encoder.pt``.
4. Few-shot Stage 3 (``bsf experiment fewshot``, preset ``--preset``, default ``stage3_brats_test``): ``--percents`` of the
   training cases, ``--subsets`` seeded subsets (= seeds), pretrained (the last encoder) vs from scratch, scored on the
   held-out fold. Report: ``OUT/fewshot/report.md``.
5. Prints, and writes to ``OUT/evidence.json``: mean ± sd over subsets per arm and the paired difference
   (pretrained - scratch, same subset and seed).

Every step resumes: a finished stage (its encoder file) and finished few-shot runs are not redone. Numbers, not
assertions: the answer may be either way, and the script says which.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from bsf.cli import main as bsf_main
from bsf.config import load_config
from bsf.data.index import index_dataset
from bsf.data.synth import synthesize
from bsf.federation.export import export_global_encoder
from bsf.io import atomic_write_json
from bsf.train import train

log = logging.getLogger("pretraining_evidence")


def synthetic_data(out: Path, ukb: int, brats: int, spacing: float) -> tuple[Path, Path]:
    """UKB-like subjects and a BraTS-like datalist with the official folds (made once)."""
    ukb_root, brats_root, datalist = out / "data" / "ukb", out / "data" / "brats", out / "data" / "brats.json"
    marker = out / "data" / ".complete"
    if not marker.is_file():
        synthesize("ukb", ukb, ukb_root, spacing=spacing, seed=1)
        synthesize("brats", brats, brats_root, spacing=spacing, seed=2)
        atomic_write_json(index_dataset("brats", brats_root).datalist, datalist)
        marker.write_text(f"ukb {ukb} brats {brats} spacing {spacing}\n")
    return ukb_root, datalist


def pretrain(name: str, preset: str, overrides: list[str], out: Path) -> Path:
    """Train one SSL stage centrally and export its encoder (skipped when the encoder exists)."""
    encoder = out / f"{name}_encoder.pt"
    if encoder.is_file():
        print(f"[evidence] {name}: done before ({encoder})", flush=True)
        return encoder
    config = load_config(preset, [*overrides, f"train.output_dir={out / name}", "train.progress=false"])
    started = time.perf_counter()
    summary = train(config)
    losses = [s["loss"] for s in summary["train"]]
    export_global_encoder(out / name / "checkpoint_best.pt", encoder)
    print(
        f"[evidence] {name}: {summary['steps_done']} steps in {time.perf_counter() - started:.0f} s, "
        f"loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}, best {summary['best']}",
        flush=True,
    )
    return encoder


def summarise(records: list[dict], metric: str) -> dict:
    """Per percentage: mean ± sd per arm over subsets, and the paired differences (pretrained - scratch)."""
    out = {}
    for percent in sorted({r["labels"]["percent"] for r in records}):
        arms: dict[str, dict[int, float]] = {}
        for r in records:
            if r["labels"]["percent"] == percent:
                arms.setdefault(r["labels"]["arm"], {})[r["labels"]["subset"]] = r["metrics"][metric]
        entry = {arm: {"per_subset": v, "mean": float(np.mean(list(v.values()))), "sd": float(np.std(list(v.values()), ddof=1)) if len(v) > 1 else 0.0}
                 for arm, v in arms.items()}
        if {"pretrained", "scratch"} <= set(arms):
            paired = [arms["pretrained"][s] - arms["scratch"][s] for s in arms["pretrained"] if s in arms["scratch"]]
            entry["difference"] = {
                "per_subset": paired,
                "mean": float(np.mean(paired)),
                "sd": float(np.std(paired, ddof=1)) if len(paired) > 1 else 0.0,
                "pretrained_better": int(sum(d > 0 for d in paired)),
                "n": len(paired),
            }
        out[f"{percent:g}"] = entry
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--ukb-subjects", type=int, default=8)
    p.add_argument("--brats-subjects", type=int, default=16, help="BraTS-like cases (ids 0..N-1; official folds)")
    p.add_argument("--spacing", type=float, default=3.0, help="synthetic voxel size, mm")
    p.add_argument("--stage1-steps", type=int, default=80)
    p.add_argument("--stage2-steps", type=int, default=40, help="0: no Stage 2 (Stage 3 from the Stage 1 encoder)")
    p.add_argument("--preset", default="stage3_brats_test", help="Stage 3 preset")
    p.add_argument("--percents", default="20")
    p.add_argument("--subsets", type=int, default=3, help="seeded subsets = seeds (>= 3 for the evidence)")
    p.add_argument("--fold", type=int, default=0, help="held-out BraTS fold")
    p.add_argument("--pretrain-only", action="store_true", help="stop after Stages 1 and 2 (their encoders); a later call resumes")
    p.add_argument("--tiny", action="store_true", help="smoke test: 2-5 steps per stage, 6 BraTS cases, 2 subsets")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Stage 3 overrides, e.g. train.steps=80")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.tiny:
        args.ukb_subjects, args.brats_subjects, args.stage1_steps, args.stage2_steps, args.subsets = 3, 6, 3, 2, 2
        args.overrides = ["train.steps=2", "data.crops_per_volume=1", *args.overrides]
    out = Path(args.out).resolve()
    started = time.perf_counter()
    ukb_root, datalist = synthetic_data(out, args.ukb_subjects, args.brats_subjects, args.spacing)
    encoder = pretrain("stage1", "stage1_test", [f"data.root={ukb_root}", f"train.steps={args.stage1_steps}"], out)
    modalities = "t1,flair"
    if args.stage2_steps > 0:
        encoder = pretrain(
            "stage2", "stage2_brats_test",
            [f"data.datalist={datalist}", "data.root=''", f"data.fold={args.fold}", f"model.pretrained={encoder}", f"train.steps={args.stage2_steps}"],
            out,
        )
        modalities = "flair,t1ce,t1,t2"
    if args.pretrain_only:
        print(f"[evidence] pretraining done: {encoder}")
        return 0
    fewshot = out / "fewshot"
    code = bsf_main([
        "experiment", "fewshot", "--datalist", str(datalist), "--fold", str(args.fold), "--percents", args.percents,
        "--subsets", str(args.subsets), "--pretrained", str(encoder), "--pretrained-modalities", modalities,
        "--preset", args.preset, "--out", str(fewshot), "train.progress=false", *args.overrides,
    ])
    if code:
        return code
    records = json.loads((fewshot / "results.json").read_text())["runs"]
    result = {
        "command": " ".join(sys.argv),
        "stages": {"stage1_steps": args.stage1_steps, "stage2_steps": args.stage2_steps, "encoder": str(encoder)},
        "stage3": {"preset": args.preset, "overrides": args.overrides, "steps": records[0]["steps"] if records else None},
        "data": {"ukb": args.ukb_subjects, "brats": args.brats_subjects, "spacing_mm": args.spacing, "held_out_fold": args.fold,
                 "held_out_cases": records[0]["n_held_out"] if records else None},
        "dice_mean": summarise(records, "dice_mean"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(result, out / "evidence.json")
    for percent, entry in result["dice_mean"].items():
        arms = ", ".join(f"{arm} {v['mean']:.4f} ± {v['sd']:.4f}" for arm, v in entry.items() if arm != "difference")
        print(f"[evidence] {percent} % of the training cases, mean Dice over {args.subsets} subsets: {arms}")
        if "difference" in entry:
            d = entry["difference"]
            verdict = "pretrained better" if d["mean"] > 0 else "pretrained not better"
            print(f"[evidence]   paired difference pretrained - scratch: {d['mean']:+.4f} ± {d['sd']:.4f} "
                  f"(pretrained better in {d['pretrained_better']}/{d['n']} subsets): {verdict}")
    print(f"[evidence] {out / 'evidence.json'}; report {fewshot / 'report.md'}; {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
