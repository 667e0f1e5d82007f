#!/usr/bin/env bash
# The GPU check, as one run on a bare CUDA machine with no network: installs the
# wheels carried in .whl/ (kvikio-cu13, libkvikio-cu13, rapids-logger; see
# README), runs the CUDA tests, bench/gpu_check.py and bench/kv_decode.py on
# CUDA, and writes everything to $OUT (or bench/out/gpu).
# GPU_CHECK_STEPS picks the steps (comma list; default tests,gpu_check,kv_decode,
# about 10 minutes at most): "finetune" is bench/finetune.py --device cuda (a
# training step of a 239M-parameter fp32 Llama, 4x the GPU tier and 2x the host
# tier: tiered vs DeepSpeed ZeRO-3 NVMe offload, when installed, vs torch in GPU
# memory; 5 minutes at most), e.g. GPU_CHECK_STEPS=finetune bash bench/gpu_check.sh
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
STEPS=",${GPU_CHECK_STEPS:-tests,gpu_check,kv_decode},"
step() { [[ "$STEPS" == *",$1,"* ]]; }
rc=0  # the status of the last step run, as before steps could be picked
if step tests; then
    timeout 150 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py tests/test_device_cache.py \
        tests/test_kv.py 2>&1 | tee "$OUTDIR/pytest_cuda.txt"
    rc=$?
fi
if step gpu_check; then
    timeout 300 python3 bench/gpu_check.py --json "$OUTDIR/gpu_check.json" --dir /tmp/gpu-check "$@" 2>&1 \
        | tee "$OUTDIR/gpu_check.log"
    rc=$?
fi
if step kv_decode; then
    timeout 150 python3 bench/kv_decode.py --device cuda --new 64 --out "$OUTDIR/kv_decode_cuda.json" \
        --profile "$OUTDIR/kv_profile_cuda.txt" 2>&1 \
        | tail -40 | tee "$OUTDIR/kv_decode_cuda.log"
    rc=$?
fi
if step finetune; then
    timeout 300 python3 bench/finetune.py --device cuda --layers 32 --hidden 768 --inter 2048 --batch 4 --seq 512 \
        --warmup 1 --steps 2 --rounds 1 --io-mib 512 --timeout 120 --dir /tmp/finetune-gpu \
        --out "$OUTDIR/finetune_cuda.json" 2>&1 | tail -60 | tee "$OUTDIR/finetune_cuda.log"
    rc=$?
fi
exit $rc
