#!/usr/bin/env bash
# The GPU run of benchmarks/gpu_run.py, as benchmarks/GPU.md describes it.
#
#   benchmarks/gpu_run.sh --prepare      here, once: the wheels and the data tarball into .gpu/ (git-ignored)
#   benchmarks/gpu_run.sh [options]      on the GPU machine: install the carried wheels, then run every
#                                        phase in under 9 minutes; tables, log and bundle into $OUT
#
# Options go to benchmarks/gpu_run.py (--budget, --seeds, --tiny, --out ...). PYTHON picks the
# interpreter (default python3: on the GPU machine, the one that holds PyTorch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "--prepare" ]]; then
    shift
    exec "$PYTHON" benchmarks/gpu_run.py --prepare "$@"
fi

# The wheels install into a folder of their own, ahead of the machine's packages on PYTHONPATH:
# nothing of the machine's image is changed, and the child processes inherit the path.
if compgen -G ".gpu/wheels/*.whl" > /dev/null; then
    site=${TMPDIR:-/tmp}/gpu-run-site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        .gpu/wheels/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

out=${OUT:-runs/gpu-run}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$PYTHON" benchmarks/gpu_run.py --out "$out" "$@" 2>&1 | tee "$out/gpu_run.log"
