"""Measure the peak RSS of one training step per model size, stage and ROI (CPU), for the site preflight's figures.

Each point runs in a fresh subprocess (so ``ru_maxrss`` is that point's own peak): import torch/MONAI/bsf (the base),
build the stage's model and AdamW, then two real training steps of the stage's loss (``Task.loss``, backward, AdamW
step; gradients kept, so the second step's peak holds weights, gradients, both moments and the activations: an
upper bound) on random crops of ``roi``^3, ``crops`` crops per step. Printed per point: base RSS, peak RSS, and the
activation bytes per voxel per crop, ``(peak - base - 16 x parameters) / (crops x roi^3)`` (weights, gradients and
two AdamW moments: 16 bytes a parameter). These are what ``bsf/federation/footprints.json`` keeps.

    python benchmarks/preflight_footprints.py                     # the default points (test size, Small at 64^3)
    python benchmarks/preflight_footprints.py --point ssl:small:64:2:0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

#: stage:size:roi:crops:use_checkpoint
DEFAULT_POINTS = ["ssl:test:64:2:0", "ssl:test:96:2:0", "finetune:test:64:2:0", "ssl:small:64:2:0",
                  "finetune:small:64:1:0", "finetune:small:64:1:1"]

CHILD = r"""
import json, resource, sys
import torch
stage, size, roi, crops, ckpt = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
from bsf.engine import load_config
from bsf.engine.tasks import build_task
torch.set_num_threads(2)
preset = "stage1_test" if stage == "ssl" else "stage3_brats_test"
config = load_config(preset, [f"model.size={size}", f"data.roi=[{roi},{roi},{roi}]", f"model.use_checkpoint={str(ckpt).lower()}"])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
task = build_task(config)
model = task.build_model()
params = sum(p.numel() for p in model.parameters())
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
g = torch.Generator().manual_seed(0)
image = torch.rand(crops, config.model.in_channels, roi, roi, roi, generator=g)
batch = {"image": image}
if stage != "ssl":
    batch["label"] = (torch.rand(crops, config.model.out_channels, roi, roi, roi, generator=g) > 0.9).float()
for _ in range(2):  # the second step runs with AdamW's moments and the kept gradients allocated
    loss, _ = task.loss(model, batch, g)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base_bytes": base, "peak_bytes": peak, "parameters": params}))
"""


def measure(point: str) -> dict:
    stage, size, roi, crops, ckpt = point.split(":")
    out = subprocess.run([sys.executable, "-c", CHILD, stage, size, roi, crops, ckpt], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{point}: the measuring process failed:\n{out.stderr[-2000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    voxels = int(crops) * int(roi) ** 3
    row.update(stage=stage, size=size, roi=int(roi), crops=int(crops), use_checkpoint=ckpt == "1",
               activation_bytes_per_voxel=(row["peak_bytes"] - row["base_bytes"] - 16 * row["parameters"]) / voxels)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", action="append", help="stage:size:roi:crops:use_checkpoint (repeatable)")
    args = parser.parse_args()
    for point in args.point or DEFAULT_POINTS:
        row = measure(point)
        print(json.dumps(row), flush=True)
        print(f"# {point}: base {row['base_bytes'] / 2**30:.2f} GiB, peak {row['peak_bytes'] / 2**30:.2f} GiB, "
              f"{row['parameters'] / 1e6:.1f} M parameters, {row['activation_bytes_per_voxel']:.0f} activation bytes "
              "per voxel per crop", flush=True)


if __name__ == "__main__":
    main()
