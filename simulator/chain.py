"""Chain Stage 1 -> 2 -> 3 (BraTS and ATLAS) in the NVFlare simulator and write a report.

    python simulator/chain.py --out chain_out            # CPU-demo size
    python simulator/chain.py --out /tmp/chain --tiny    # smoke test

The same command as ``bsf chain`` (logic: bsf.pipeline.chain); see ``bsf chain --help``.
"""

import sys

from bsf.cli import main

if __name__ == "__main__":
    sys.exit(main(["chain", *sys.argv[1:]]))
