#!/usr/bin/env bash
# The GPU check, as one run on a bare CUDA machine with no network: installs the
# wheels carried in .whl/ (kvikio-cu13, libkvikio-cu13, rapids-logger; see
# README), runs the CUDA tests, bench/gpu_check.py and bench/kv_decode.py on
# CUDA, and writes everything to $OUT (or bench/out/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-bench/out/gpu}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
nvidia-smi > "$OUTDIR/nvidia-smi.txt" 2>&1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
timeout 150 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py tests/test_device_cache.py \
    tests/test_kv.py 2>&1 | tee "$OUTDIR/pytest_cuda.txt"
timeout 300 python3 bench/gpu_check.py --json "$OUTDIR/gpu_check.json" --dir /tmp/gpu-check "$@" 2>&1 | tee "$OUTDIR/gpu_check.log"
timeout 150 python3 bench/kv_decode.py --device cuda --new 64 --out "$OUTDIR/kv_decode_cuda.json" \
    --profile "$OUTDIR/kv_profile_cuda.txt" 2>&1 \
    | tail -40 | tee "$OUTDIR/kv_decode_cuda.log"
