"""Stage 1/2 SSL step benchmark: a thin entry point to ``bsf bench --only ssl_step`` (all its options).

    python benchmarks/ssl_step.py --size test --device cpu --out bench_out        # CPU, test size
    python benchmarks/ssl_step.py --size small --device cuda --out bench_gpu      # one GPU, paper size

The benchmark itself is ``bsf/bench/ssl_step.py``; see benchmarks/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bsf.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "--only", "ssl_step", *sys.argv[1:]]))
