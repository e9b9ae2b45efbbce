"""Chain Stage 1 -> 2 -> 3 (BraTS and ATLAS) in the NVFlare simulator and write a report.

    python simulator/chain.py --out chain_out            # CPU-demo size
    python simulator/chain.py --out /tmp/chain --tiny    # smoke test

All logic lives in bsf.fl.chain (``python -m bsf.fl.chain`` is the same command); see its docstring.
"""

import sys

from bsf.fl.chain import main

if __name__ == "__main__":
    sys.exit(main())
