#!/usr/bin/env bash
# Everything a lent GPU machine does (GPU.md): build resfuse with the CUDA extension, run the
# test suite (the GPU tests included), compute-sanitizer on a small case, the benchmark suite,
# and the CUDA kernels' drill-down. Logs and result files go to $OUT (default bench/out/gpu).
#   bash bench/gpu_check.sh [build] [tests] [triton-tests] [sanitizer] [bench] [kernels]
# (default: build tests sanitizer bench). One device call is limited to 10 minutes: run
# "build tests sanitizer" in one call, "build triton-tests" in the next (the Triton backend's
# GPU tests: the full grid and every ResNet layer, many kernel compilations) and "build bench"
# in a third (the build is ~1 min). RESFUSE_TRITON_AUTOTUNE=1 in the environment lets the
# Triton backend time its tile candidates per shape (tagged `triton_autotune` in the results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
STAGES=${*:-build tests sanitizer bench}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
status=0
has() { [[ " $STAGES " == *" $1 "* ]]; }

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
nvcc --version | tail -n 1

if has build; then
    # In place (setup.py build_ext --inplace) rather than `pip install -e`: no pip resolver,
    # index or build-isolation step on a machine without network, and a bounded time.
    echo "== build (MAX_JOBS=$MAX_JOBS)"
    start=$(date +%s)
    if ! timeout 420 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
        tail -n 60 "$OUT/build.log"; echo "build FAILED"; exit 1
    fi
    echo "built in $(( $(date +%s) - start )) s"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import resfuse; print(resfuse.backends())"

if has tests; then
    echo "== tests"
    timeout ${TEST_TIMEOUT:-420} $PY -m pytest -q -rfE -p no:cacheprovider \
        ${TESTS:-tests/ --ignore=tests/test_triton_gpu.py --ignore=tests/test_triton_layers.py} \
        > "$OUT/tests.log" 2>&1 || status=1
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 40
fi

if has triton-tests; then
    echo "== tests: the triton backend on the GPU"
    timeout ${TEST_TIMEOUT:-540} $PY -m pytest -q -rfE -p no:cacheprovider \
        tests/test_triton_gpu.py tests/test_triton_layers.py > "$OUT/tests-triton.log" 2>&1 || status=1
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests-triton.log" | tail -n 40
fi

if has sanitizer; then
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool"
        timeout 240 compute-sanitizer --tool $tool --error-exitcode 9 $PY tests/cuda_sanitizer_case.py > "$OUT/sanitizer-$tool.log" 2>&1
        rc=$?
        tail -n 4 "$OUT/sanitizer-$tool.log"
        [ $rc -eq 0 ] || status=1
    done
fi

if has bench; then
    # The benchmark suite (bench/run.py): ops, blocks and models against eager and
    # torch.compile, bf16 channels_last batch 256 (SUITE=quick|ops|blocks|models|all, default
    # all; BENCH_ARGS adds options, e.g. "--compile both"). JSON, CSV and plots land in $OUT,
    # the JSON rewritten after every case, so a run cut short keeps what it measured. If one
    # 10-minute device call cannot hold `all`, give each suite its own call: SUITE=ops, then
    # blocks, then models. bench/report.py renders the README from the files once they are
    # copied to bench/results/.
    echo "== bench: suite ${SUITE:-all}"
    timeout ${BENCH_TIMEOUT:-540} $PY bench/run.py --suite ${SUITE:-all} --dtype bfloat16 \
        --layout channels_last --batch 256 --cuda-graphs --out "$OUT" ${BENCH_ARGS:-} \
        > "$OUT/bench-suite.log" 2>&1 || status=1
    grep -E "^(resfuse|suite|ceilings|wrote|ERROR|PARITY)" "$OUT/bench-suite.log" | tail -n 20
fi
if has kernels; then
    # The CUDA backend's kernels one by one against the copy ceiling (a drill-down beside the
    # suite; it calls the backend's ops directly).
    echo "== bench: CUDA kernels"
    timeout ${BENCH_TIMEOUT:-400} $PY bench/cuda_kernels.py --out "$OUT" > "$OUT/bench-kernels.log" 2>&1 || status=1
    tail -n 30 "$OUT/bench-kernels.log"
fi
exit $status
