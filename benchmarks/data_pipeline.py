"""Loader throughput: cases/s and crops/s per worker count, without a cache, with a cold and a warm
persistent (disk) cache, and from the memory cache, on synthetic data in a real layout.

    python benchmarks/data_pipeline.py --dataset ukb --subjects 8 --spacing 1.0 --workers 0 2 4 8
    python benchmarks/data_pipeline.py --datalist /data/brats/datalist.json --dataset brats --workers 8

Modes (each through the training loader, ``bsf.data.pipeline.train_loader``):
  none             decode the .nii.gz files at every read (what a run without a cache does);
  persistent-cold  first pass (one epoch) with ``data.cache: persistent``: decode, preprocess, write the cache;
  persistent-warm  a later pass: read the preprocessed volumes back from ``cache_dir`` (memory-mapped);
  persistent-warm-unmapped  the same entries read whole by MONAI's ``PersistentDataset`` (the speed-up's baseline);
  memory           ``data.cache: memory`` after filling (fill time reported separately).
Prints a table and writes JSON (``--json``). Numbers only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bsf.config import load_config  # noqa: E402
from bsf.data.index import index_dataset  # noqa: E402
from bsf.data.pipeline import SampleStream, StepSampler, train_loader, training_split  # noqa: E402
from bsf.data.synth import synthesize  # noqa: E402
from bsf.data.transforms import random_transforms  # noqa: E402
from monai.data import PersistentDataset  # noqa: E402

MODES = ("none", "persistent-cold", "persistent-warm", "persistent-warm-unmapped", "memory")


def crops(cfg):
    """Stage 1/2 SSL's random part: ``crops_per_volume`` random ROI crops of each loaded volume."""
    return random_transforms(cfg, with_label=False)


def measure(stream: SampleStream, workers: int, samples: int, batch_size: int) -> dict[str, float]:
    """Read ``samples`` samples (cases) through the training loader; wall time includes worker start-up."""
    loader = train_loader(stream, StepSampler(0, batch_size), workers)
    start = time.perf_counter()
    read = crops = 0
    first = None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        read += batch_size
        crops += batch["image"].shape[0]
        if read >= samples:
            break
    seconds = time.perf_counter() - start
    del loader
    return {"seconds": seconds, "first_batch_s": first or 0.0, "cases_per_s": read / seconds, "crops_per_s": crops / seconds}


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bsf_bench_data_"))
    try:
        if args.datalist:
            datalist = Path(args.datalist)
        else:
            root = work / "data"
            t0 = time.perf_counter()
            synthesize(args.dataset, args.subjects, root, spacing=args.spacing, seed=0)
            print(f"synthesised {args.subjects} {args.dataset} subjects at {args.spacing} mm in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            datalist = work / "datalist.json"
            listing = index_dataset(args.dataset, root, min_slices=1, val_count=0).datalist
            datalist.write_text(json.dumps(listing))
        base = [
            f"data.dataset={args.dataset}",
            f"data.datalist={datalist}",
            f"data.roi=[{args.roi}, {args.roi}, {args.roi}]",
            f"data.crops_per_volume={args.crops}",
            f"data.batch_size={args.batch_size}",
            "data.check=header",
            "data.val_cases=0",
        ]
        cases = training_split(load_config(None, base).data, seed=0).train
        results = []
        for workers in args.workers:
            for mode in args.modes:
                cache_dir = work / f"cache_w{workers}"
                if mode == "persistent-cold" and cache_dir.exists():
                    shutil.rmtree(cache_dir)
                cache = {"none": "none", "memory": "memory"}.get(mode, "persistent")
                cfg = load_config(None, [*base, f"data.cache={cache}", f"data.cache_dir={cache_dir}", f"data.num_workers={max(workers, 1)}"]).data
                t0 = time.perf_counter()
                stream = SampleStream(cases, cfg, 0, crops(cfg))
                if mode == "persistent-warm-unmapped":
                    stream.volumes = PersistentDataset(stream.volumes.data, stream.volumes.transform, cache_dir=cache_dir)
                setup = time.perf_counter() - t0
                # a cold pass is one epoch: every case read once, so every read fills the cache
                samples = min(args.samples, len(cases)) if mode == "persistent-cold" else args.samples
                row = {"workers": workers, "mode": mode, "setup_s": setup, **measure(stream, workers, samples, args.batch_size)}
                row["crops_per_s_per_worker"] = row["crops_per_s"] / max(workers, 1)  # 0 workers: the main process
                if mode == "persistent-cold":
                    files = list(cache_dir.glob("*.pt"))
                    row["cache_mb_per_case"] = sum(p.stat().st_size for p in files) / max(len(files), 1) / 1e6
                results.append(row)
                print(_row(row), file=sys.stderr)
        plain = load_config(None, [*base, "data.cache=none"]).data
        shape = tuple(SampleStream(cases[:1], plain, 0, crops(plain)).volumes[0]["image"].shape)
        return {
            "machine": {
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "platform": platform.platform(),
                "processor": platform.processor() or platform.machine(),
            },
            "dataset": args.dataset,
            "subjects": len(cases),
            "spacing_mm": None if args.datalist else args.spacing,
            "volume_shape_after_crop": list(shape),
            "roi": args.roi,
            "crops_per_volume": args.crops,
            "batch_size": args.batch_size,
            "samples_per_measurement": args.samples,
            "results": results,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


HEADER = f"{'workers':>7}  {'mode':<16} {'cases/s':>8} {'crops/s':>8} {'/worker':>8} {'first_s':>8} {'setup_s':>8}"


def _row(r: dict) -> str:
    return (
        f"{r['workers']:>7}  {r['mode']:<16} {r['cases_per_s']:>8.2f} {r['crops_per_s']:>8.2f} "
        f"{r['crops_per_s_per_worker']:>8.2f} {r['first_batch_s']:>8.2f} {r['setup_s']:>8.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ukb", choices=["ukb", "brats", "atlas"])
    parser.add_argument("--datalist", default=None, help="use an existing datalist instead of synthetic data")
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--spacing", type=float, default=1.0, help="mm; 1.0 gives real-size volumes (182 x 218 x 182 for UKB)")
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--crops", type=int, default=2, help="crops per loaded volume")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--samples", type=int, default=12, help="cases read per measurement")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    print(HEADER, file=sys.stderr)
    result = run(args)
    print(f"\n{result['dataset']}: {result['subjects']} subjects, volume after foreground crop {result['volume_shape_after_crop']}, "
          f"{result['crops_per_volume']} crops of {args.roi}^3 per volume; machine: {result['machine']['cpu_count']} CPU(s)")
    print(HEADER)
    for row in result["results"]:
        print(_row(row))
    cache = [r["cache_mb_per_case"] for r in result["results"] if "cache_mb_per_case" in r]
    if cache:
        print(f"persistent cache: {cache[0]:.1f} MB per case on disk")
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
