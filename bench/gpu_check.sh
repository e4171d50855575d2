#!/usr/bin/env bash
# Everything a lent GPU machine does (docs/gpu.md). Logs and result files go to $OUT (default
# bench/out/gpu).
#
#   bash bench/gpu_check.sh decide            # THE call: <= 8 minutes, <= 8 files (below)
#   bash bench/gpu_check.sh decide --dry-run  # the same script on a CPU (CI runs it)
#   bash bench/gpu_check.sh [build] [tests] [triton-tests] [sanitizer] [bench] [kernels]
#
# `decide` builds resfuse._C for the present GPU's arch only, then runs bench/decide.py's three
# stages, each under its own timeout, each keeping what it finished: a sampled correctness grid
# of the triton and cuda backends against eager, the benchmark that decides between them (the
# ResNet-50 stage blocks' training step and eval, the ResNet-50 training step: bf16,
# channels_last, batch 256, eager / torch.compile / resfuse[cuda] / resfuse[triton], peak
# memory), and the table of which backend wins. Timeouts (seconds; their sum, 440, leaves room
# for start-up within 8 minutes): DECIDE_BUILD_TIMEOUT=120, DECIDE_GRID_TIMEOUT=90,
# DECIDE_BENCH_TIMEOUT=210, DECIDE_TABLE_TIMEOUT=20. Files under $OUT: build.log, decide.log,
# <date>-<gpu>-decide-grid-<commit>.json, <date>-<gpu>-decide-<commit>.json and .csv,
# <date>-<gpu>-decide-table-<commit>.md. `--dry-run`: no build, Triton's interpreter on the
# CPU, tiny sizes (bench/decide.py says which).
#
# The other stages (default: build tests sanitizer bench) each take most of a 10-minute call:
# the build (~1 min) with the tests and sanitizer, the build with triton-tests (the Triton
# backend's GPU tests), the build with bench (bench/run.py --suite all). RESFUSE_TRITON_AUTOTUNE=1
# in the environment lets the Triton backend time its tile candidates per shape (tagged
# `triton_autotune` in the results).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
STAGES=${*:-build tests sanitizer bench}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
status=0
has() { [[ " $STAGES " == *" $1 "* ]]; }
DRY=""
has --dry-run && DRY="--dry-run"

echo "== device"
if [ -z "$DRY" ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    nvcc --version | tail -n 1
    # Build for this GPU's arch only (one arch compiles in about half the time of two).
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
        TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null) || true
        export TORCH_CUDA_ARCH_LIST
    fi
    echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
fi
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# resfuse.triton_kernels is the top-level triton_kernels/ folder (setup.py's package_dir); run
# from the checkout (PYTHONPATH, no pip install) it needs the link an editable install makes.
[ -e resfuse/triton_kernels ] || ln -s ../triton_kernels resfuse/triton_kernels

if has decide; then
    t0=$(date +%s)
    if [ -z "$DRY" ]; then
        echo "== decide: build (timeout ${DECIDE_BUILD_TIMEOUT:-120} s)"
        # A failed build leaves the cuda backend out (resfuse.backends() says why); the Triton
        # backend and the baselines still run.
        timeout -k 10 ${DECIDE_BUILD_TIMEOUT:-120} $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
            || { tail -n 30 "$OUT/build.log"; echo "build FAILED"; status=1; }
        echo "built in $(( $(date +%s) - t0 )) s"
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    : > "$OUT/decide.log"
    for stage in grid bench table; do
        case $stage in
            grid) limit=${DECIDE_GRID_TIMEOUT:-90} ;;
            bench) limit=${DECIDE_BENCH_TIMEOUT:-210} ;;
            table) limit=${DECIDE_TABLE_TIMEOUT:-20} ;;
        esac
        echo "== decide: $stage (timeout $limit s)" | tee -a "$OUT/decide.log"
        from=$(( $(wc -l < "$OUT/decide.log") + 1 ))
        timeout -k 10 "$limit" $PY bench/decide.py "$stage" --out "$OUT" $DRY >> "$OUT/decide.log" 2>&1
        rc=$?
        [ $rc -eq 0 ] || { status=1; echo "decide $stage: exit $rc$( [ $rc -ge 124 ] && echo ' (timed out: what finished is kept)')" | tee -a "$OUT/decide.log"; }
        [ "$stage" = table ] || tail -n "+$from" "$OUT/decide.log" | grep -E "^(grid|bench|decide)|FAIL|ERROR|Error" | tail -n 12
    done
    [ -z "$(ls "$OUT"/*-decide-table-*.md 2>/dev/null)" ] || cat "$(ls -t "$OUT"/*-decide-table-*.md | head -n 1)"
    echo "decide: $(( $(date +%s) - t0 )) s; files in $OUT: $(ls "$OUT" | wc -l)"
    exit $status
fi

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
