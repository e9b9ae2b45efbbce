"""``bsf bench``: run the benchmarks, print one table, write ``bench.json``.

    bsf bench --size test --device cpu --out bench_out                 # CPU, test size (CI)
    bsf bench --size small --device cuda --out bench_h100              # one GPU, paper size

Each benchmark compares its variants with a reference-style run in the same process (see the
modules of :mod:`bsf.bench`). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from bsf.bench.sizes import SIZES
from bsf.console import non_negative_int, plain_text, positive_int
from bsf.errors import BSFError

log = logging.getLogger(__name__)

#: run order; each is a module of bsf.bench with ``run(opts) -> {"config", "rows"[, "summary"]}``
BENCHMARKS = ("ssl_step", "finetune_step", "sliding_window", "data_wait", "numerics", "comm")
PRECISIONS = ("fp32", "bf16", "fp16")


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` to the ``bsf`` subcommands."""
    p = sub.add_parser("bench", help="throughput, memory, data wait, numerics and communication benchmarks",
                       description=plain_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="test", help="test: CPU-sized; small: the paper's shapes (default: test)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), metavar="NAME",
                   help=f"run only these ({', '.join(BENCHMARKS)})")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="the fast path's train.precision (default: bf16 on CUDA; fp32, the only choice, on CPU)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="also time torch.compile'd steps (auto: on CUDA only; compiling takes minutes on a CPU)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per variant and round (default: by size)")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="untimed steps first (default: by size)")
    p.add_argument("--repeats", type=positive_int, default=None, help="alternating rounds over the variants (default: by size)")
    p.add_argument("--numerics-steps", type=positive_int, default=None, help="steps of the fp32 vs fast loss comparison (default: by size)")
    p.add_argument("--fl-rounds", type=non_negative_int, default=None, help="FedAvg rounds of the fp16-difference run; 0: bytes only (default: by size)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for bench.json (and the table as bench.txt)")
    p.set_defaults(func=cmd_bench)


def options(args: argparse.Namespace):
    """Resolve the command line against the size's defaults (an :class:`~bsf.bench.harness.Options`);
    bad combinations are :class:`BSFError`."""
    import torch

    from bsf.bench.harness import Options, resolve_device

    device = resolve_device(args.device)
    size = SIZES[args.size]
    overrides = {k: v for k, v in (("numerics_steps", args.numerics_steps), ("fl_rounds", args.fl_rounds)) if v is not None}
    if overrides:
        size = type(size)(**{**size.__dict__, **overrides})
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cpu" and precision != "fp32":
        raise BSFError(f"--precision {precision} on the CPU: the engine trains in fp32 on CPUs (mixed precision is for GPUs); use fp32")
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise BSFError("--precision bf16: this GPU does not support bfloat16; use fp16 or fp32")
        torch.backends.cudnn.benchmark = True  # as the public scripts do; applies to every variant
    return Options(
        size=size, device=device, precision=precision,
        compile={"on": True, "off": False}.get(args.compile, device.type == "cuda"),
        steps=args.steps or size.steps, warmup=size.warmup if args.warmup is None else args.warmup,
        repeats=args.repeats or size.repeats, seed=args.seed,
    )


def run_benchmarks(names: list[str], opts) -> dict[str, Any]:
    """Run the named benchmarks in :data:`BENCHMARKS` order with ``opts`` (:class:`~bsf.bench.harness.Options`)."""
    from bsf.bench.harness import machine_info

    results = {}
    for name in (n for n in BENCHMARKS if n in names):
        log.info("bench: %s ...", name)
        started = time.perf_counter()
        results[name] = importlib.import_module(f"bsf.bench.{name}").run(opts)
        results[name]["seconds"] = time.perf_counter() - started
    return {
        "machine": machine_info(opts.device),
        "options": {"size": opts.size.__dict__, "device": str(opts.device), "precision": opts.precision,
                    "compile": opts.compile, "steps": opts.steps, "warmup": opts.warmup, "repeats": opts.repeats,
                    "seed": opts.seed},
        "results": results,
    }


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict[str, Any]) -> str:
    """One line per benchmark row: configuration, steps/s, samples/s, peak memory, speed-up; then summaries."""
    from bsf.bench.harness import fmt_bytes

    m, o = report["machine"], report["options"]
    where = m.get("gpu") or f"CPU {m['processor']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads)"
    lines = [f"bsf bench: size {o['size']['model']}, {where}, torch {m['torch']}; fast precision {o['precision']},"
             f" compile {'on' if o['compile'] else 'off'}; medians of {o['repeats']} x {o['steps']} timed steps"
             f" after {o['warmup']} warm-up"]
    header = ("benchmark", "configuration", "steps/s", "samples/s", "peak mem", "speed-up")
    rows = [header]
    for bench, result in report["results"].items():
        for r in result.get("rows", []):
            rows.append((bench, r["label"], _cell(r.get("steps_per_s"), ".3g"), _cell(r.get("samples_per_s"), ".3g"),
                         fmt_bytes((r.get("peak_memory") or {}).get("bytes")), _cell(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    for bench, result in report["results"].items():
        for line in result.get("summary", []):
            lines.append(f"{bench}: {line}")
    peak_kinds = {r["peak_memory"]["kind"] for res in report["results"].values() for r in res.get("rows", []) if r.get("peak_memory")}
    if peak_kinds:
        lines.append("peak mem = resident state (weights, grads, optimiser) + " + ", ".join(sorted(peak_kinds)) + " during one step")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BSFError(f"--out {out}: exists and is not a folder")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    opts = options(args)
    report = run_benchmarks(args.only, opts)
    table = format_table(report)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "bench.txt").write_text(table + "\n")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.txt'}")
