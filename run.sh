#!/usr/bin/env bash
# The project's commands, each doing its own set-up on a fresh machine:
#   ./run.sh setup                          installation only (idempotent; quick when done)
#   ./run.sh test  [pytest args]            the test suite (default: tests/)
#   ./run.sh bench [bench/run.py options]   the benchmark suite (default: quick) vs eager and torch.compile
# PYTHON=... picks the interpreter (default python3). On a machine whose torch is a CUDA build
# (and has a CUDA toolkit) setup also builds the CUDA extension resfuse._C, MAX_JOBS defaulting
# to the number of cores.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd -P)
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=${PIP_ROOT_USER_ACTION:-ignore} PIP_DISABLE_PIP_VERSION_CHECK=${PIP_DISABLE_PIP_VERSION_CHECK:-1}

# Exit 0 when resfuse is installed editable from THIS checkout, at this version, with a build
# record made against the torch installed now (and, if the extension was built, no csrc/ or
# setup.py newer than it). Runs from / so that the checkout on sys.path cannot fake it.
installed_here() {
    (cd / && RESFUSE_ROOT="$ROOT" "$PY" - <<'PYCHECK'
import glob, json, os, sys
import importlib.metadata as md

root = os.path.realpath(os.environ["RESFUSE_ROOT"])
def fail(why):
    print(f"run.sh: (re)installing resfuse: {why}", file=sys.stderr)
    sys.exit(1)
try:
    dist = md.distribution("resfuse")
except md.PackageNotFoundError:
    fail("not installed")
direct = json.loads(dist.read_text("direct_url.json") or "{}")
url = direct.get("url", "")
if not direct.get("dir_info", {}).get("editable") or not url.startswith("file://") \
        or os.path.realpath(url[len("file://"):]) != root:
    fail(f"the installed one is not an editable install of {root}")
scope = {}
exec(open(os.path.join(root, "resfuse", "version.py")).read(), scope)
if dist.version != scope["__version__"]:
    fail(f"installed {dist.version}, checkout is {scope['__version__']}")
record = os.path.join(root, "resfuse", "_build_info.py")
if not os.path.exists(record):
    fail("no build record resfuse/_build_info.py")
scope = {}
exec(open(record).read(), scope)
info = scope.get("BUILD_INFO", {})
# The installed torch, read from torch/version.py without importing torch (seconds).
import importlib.util
spec = importlib.util.find_spec("torch")
torch_now = {}
if spec and spec.submodule_search_locations:
    try:
        exec(open(os.path.join(list(spec.submodule_search_locations)[0], "version.py")).read(), torch_now)
    except OSError:
        pass
now = (torch_now.get("__version__"), torch_now.get("cuda"))
if (info.get("torch"), info.get("torch_cuda")) != now:
    fail(f"built against torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), "
         f"torch {now[0]} (CUDA {now[1]}) is installed")
if not info.get("cuda_extension") and "did not finish" in (info.get("reason") or ""):
    fail("the last build of resfuse._C did not finish")
if info.get("cuda_extension"):
    built = glob.glob(os.path.join(root, "resfuse", "_C*.so"))
    inputs = glob.glob(os.path.join(root, "csrc", "*")) + [os.path.join(root, "setup.py")]
    if not built:
        fail("resfuse._C is missing")
    if max(map(os.path.getmtime, inputs)) > min(map(os.path.getmtime, built)):
        fail("csrc/ or setup.py changed since resfuse._C was built")
PYCHECK
    )
}

setup() {
    # What is missing, looked up in one interpreter without importing anything (importing
    # torch alone takes seconds; a broken torch still fails loudly below, at `import resfuse`).
    local missing
    missing=$("$PY" -c '
import importlib.util as u
print(" ".join(m for m in ("torch", "triton", "pytest", "numpy", "ninja", "pybind11") if u.find_spec(m) is None))')
    # torch only when none is installed. Exactly `torch==2.13.0`: on the CPU machines a CPU
    # wheel of it is on disk, and any other spec would download the multi-GB CUDA build. A
    # machine that already has a torch (e.g. a CUDA build on a GPU machine) keeps it.
    case " $missing " in
        *" torch "*) "$PY" -m pip install torch==2.13.0; missing=${missing/torch/} ;;
    esac
    # triton only when none is installed (a GPU machine keeps its own). At least 3.9 where it is
    # installed here: 3.6's interpreter (TRITON_INTERPRET=1, how the CPU runs the Triton
    # kernels) fails on numpy 2.4's scalar conversion in loops with runtime bounds.
    missing=${missing/triton/triton>=3.9}
    missing=$(echo $missing)  # trim
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086 # word splitting wanted: one argument per package
        "$PY" -m pip install -q $missing
    fi
    # Editable install of this checkout, unless it is already the one installed. No build
    # isolation: the CUDA extension must be built against the torch installed here, and an
    # isolated build environment would fetch another torch to build with.
    if ! installed_here; then
        MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --no-build-isolation -e .
    fi
    # pip hides setup.py's output: say here whether resfuse._C is there, and why not.
    (cd / && "$PY" -c '
import resfuse
from resfuse._extension import load_extension
ext, why = load_extension()
print(f"resfuse {resfuse.__version__} (editable: {resfuse.__path__[0]}); resfuse._C: {why}")')
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    setup) setup ;;
    test)
        setup
        # tests/ unless the arguments already name a test path (tests/test_x.py, ...::test_y).
        paths=()
        for a in "$@"; do
            case "$a" in -*) ;; *) [ -e "${a%%::*}" ] && paths+=("$a") ;; esac
        done
        [ ${#paths[@]} -gt 0 ] || set -- tests "$@"
        exec "$PY" -m pytest -q -p no:cacheprovider "$@" ;;
    bench) setup; exec "$PY" bench/run.py "$@" ;;
    *) echo "usage: ./run.sh setup|test|bench [extra args]" >&2; exit 2 ;;
esac
