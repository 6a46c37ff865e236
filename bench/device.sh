#!/usr/bin/env bash
# The CUDA checks in one run, for the day a GPU is lent (issue 20): the tests marked `gpu`, then the training
# and decoding benchmarks on the device. Each part has its own time limit, so the whole run stays under ~9 min.
#
#   bash bench/device.sh                 # logs in $OUT (the device tool's folder), else runs/device/
#
# The machine brings its own CUDA torch and fetches nothing. Wheels it lacks (math-verify and its
# needs, fastapi, ...) can travel in .whl/ (the device tool's README says how to fetch them); they are
# installed into /tmp/site first when that folder is there. The test files are named one by one, so the other
# test modules' imports (the server's clients, TRL) need not be on the machine.
set -u -o pipefail
OUT=${OUT:-runs/device}
PY=${PY:-python3}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NANOSEEK_CACHE_DIR=/tmp/nanoseek-cache

part() {  # part NAME SECONDS COMMAND...: one logged part with its own limit; a failure does not stop the rest
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/summary.txt"
}

$PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here')" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/summary.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/summary.txt"
part gpu-tests 240 $PY -m pytest -q -m gpu -p no:cacheprovider tests/train/test_gpu.py tests/infer/test_gpu.py \
    tests/model/test_fp8.py tests/parallel/test_nccl.py
part train-small 90 $PY bench/train_throughput.py --device cuda --preset small --batch 8 --seq 512 --steps 6 \
    --no-memory
part train-sweep 120 $PY bench/train_throughput.py --device cuda --sweep --no-memory
part decode 90 $PY bench/decode.py --device cuda --quick
