#!/usr/bin/env bash
# The project's two commands, each doing its own set-up on a fresh machine:
#   ./run.sh bench [bench/run.py options]   converted ResNet-50 vs eager: parity + timing table
#   ./run.sh test  [pytest args]            the test suite (default: tests/)
#   ./run.sh setup                          installation only
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
    # torch only when none is installed. On a CPU machine exactly `torch==2.13.0` (a CPU wheel
    # is on disk there); any looser spec would download the multi-GB CUDA build. A machine that
    # already has torch (e.g. a CUDA build on a GPU machine) keeps it.
    if ! "$PY" -c 'import torch' 2>/dev/null; then
        "$PY" -m pip install -q torch==2.13.0
    fi
    local missing=()
    "$PY" -c 'import pytest' 2>/dev/null || missing+=(pytest)
    "$PY" -c 'import numpy' 2>/dev/null || missing+=(numpy)
    "$PY" -c 'import ninja' 2>/dev/null || missing+=(ninja)
    "$PY" -c 'import pybind11' 2>/dev/null || missing+=(pybind11)
    if [ ${#missing[@]} -gt 0 ]; then
        "$PY" -m pip install -q "${missing[@]}"
    fi
    # Editable install of this checkout, unless it is already the one installed. No build
    # isolation: the CUDA extension must be built against the torch installed here.
    if ! "$PY" - <<'PYCHECK' 2>/dev/null
import os, sys, resfuse
here = os.path.realpath(os.getcwd())
sys.exit(0 if os.path.realpath(resfuse.__file__).startswith(here + os.sep) and
         os.path.exists(os.path.join(here, "resfuse", "_build_info.py")) else 1)
PYCHECK
    then
        MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --no-build-isolation -e .
    fi
    "$PY" -c 'import resfuse; print("resfuse", resfuse.__version__, "backends:", resfuse.backends())'
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    test)  setup; [ $# -gt 0 ] || set -- tests; exec "$PY" -m pytest -q -p no:cacheprovider "$@" ;;
    bench) setup; exec "$PY" bench/run.py "$@" ;;
    *) echo "usage: ./run.sh setup|test|bench [args]" >&2; exit 2 ;;
esac
