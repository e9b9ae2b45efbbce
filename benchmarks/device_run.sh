#!/usr/bin/env bash
# What a lent GPU machine measures, in one command that ends by itself in under 9 minutes (benchmarks/README.md):
#
#   bash benchmarks/device_run.sh --out $OUT/device            # on the lent machine, from the repository root
#   bash benchmarks/device_run.sh --out /tmp/dry --dry-run     # anywhere: the same script on the CPU, tiny plan
#   bash benchmarks/device_run.sh --make-wheels                # HERE, once: the packages the lent machine lacks
#
# The lent machine has a CUDA build of torch (python3) and most of this project's needs (numpy, scipy, einops,
# PyYAML, matplotlib, tqdm, tensorboard, pandas, scikit-learn), but not monai, nibabel or nilearn, and it reaches no
# package registry. `--make-wheels` downloads those three as wheels into .whl/ (about 16 MB, pure Python) and keeps
# .whl/ out of git (.git/info/exclude); the device tool then carries it: carry [".whl"]. This script installs them
# into /tmp/bsf_site when python3 lacks them. bsf itself runs from the working tree (PYTHONPATH), not installed.
# The project's .venv cannot travel (its CPU torch alone is far over the 64 MiB a call may carry), and nvflare is not
# needed: the federated arm runs the project's site code in process.
set -euo pipefail
cd "$(dirname "$0")/.."

NEEDED="torch monai nibabel nilearn numpy scipy yaml einops matplotlib tqdm"
WHEELS="monai nibabel nilearn"

pick_python() {
    if [ -n "${BSF_PYTHON:-}" ]; then echo "$BSF_PYTHON"; return; fi
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, monai" 2>/dev/null; then echo .venv/bin/python; return; fi
    echo python3
}
PY=$(pick_python)

missing() {
    "$PY" - "$@" <<'EOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}

if [ "${1:-}" = "--make-wheels" ]; then
    # versions as in this machine's environment (the ones the tests ran with); wheels for the lent machine's Python 3.12
    specs=$("$PY" - $WHEELS <<'EOF'
import importlib.metadata as m, sys
print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))
EOF
)
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $specs
    ls -l .whl
    echo "device tool: run(command='bash benchmarks/device_run.sh --out \$OUT/device', carry=['.whl'], timeout_s=600)"
    exit 0
fi

lacking=$(missing $NEEDED)
if [ -n "$lacking" ] && ls .whl/*.whl >/dev/null 2>&1; then
    site=${BSF_SITE:-/tmp/bsf_site}
    echo "[device] $PY lacks: $lacking; installing .whl/*.whl into $site (no index, no dependencies)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    lacking=$(missing $NEEDED)
fi
if [ -n "$lacking" ]; then
    echo "[device] $PY lacks: $lacking. Bring them as wheels: run 'bash benchmarks/device_run.sh --make-wheels' on a machine" \
         "with a package registry, then carry .whl with the working tree (or set BSF_PYTHON to a Python that has them)." >&2
    exit 3
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # bsf from this working tree
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/device_run.py "$@"
