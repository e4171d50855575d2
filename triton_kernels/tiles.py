"""Tile shapes of the implicit-GEMM kernels: a fixed function of the problem's shape, dtype and
device, so that a given call always runs the same tiles (and, for the statistics epilogue and
the split weight-gradient reduction, adds its partials in the same order: bit-identical runs).

- GPU (H100-class, sm_90; valid on sm_80): 64- or 128-row tiles so that `tl.dot` lowers to
  the tensor cores' large MMA shapes (wgmma needs 64 rows per warpgroup), K steps of 64 for
  16-bit inputs (a 128-byte row per load), 32 for fp32 (TF32) and 16 for fp64 (halved where
  BN-backward's apply reads three tensors per element on load), 3-stage software pipelining
  for 16-bit inputs (2 for 32/64-bit, whose tiles fill shared memory sooner), 8 warps from
  128x64 up. Checked by compiling every kernel for sm_90 with Triton 3.6 (shared memory within
  the H100's 227 KB, register use) without a GPU; not tuned by measurement on a GPU yet:
  bench/ is where it will be (no GPU was lent while it was written).
- Triton's interpreter (CPU): the smallest power of two >= each dimension, from 16 to
  `INTERPRETER_TILE_CAP` (64): its cost is per program and per loop step, nearly independent
  of the tile's size. At 64, small test shapes still span several tiles (the masked edges, the
  statistics and weight-gradient partials of more than one program); tests of whole networks'
  layers raise the cap to 256, which runs a ResNet layer's three kernels 7-11x faster.

Autotuning (opt-in: RESFUSE_TRITON_AUTOTUNE=1; GPU only): `pick_tiles` times a small fixed
set of H100-class configurations around that choice on the first call of each shape and keeps
the fastest for the process. It is off by default because the tile shape decides the order in
which the BN statistics and the split weight-gradient reduction add their partials: with it on,
one process runs one choice per shape (identical bits from call to call), but two processes may
choose differently (timing noise) unless RESFUSE_TRITON_AUTOTUNE_CACHE names a JSON file: the
first choice written there for a shape is the one every process then runs. A shape first met
inside CUDA-graph capture is not timed: it keeps the default tiles for the process.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
import triton


class Tiles(NamedTuple):
    rows: int      # BLOCK_M
    cols: int      # BLOCK_N
    red: int       # BLOCK_K (the reduction step)
    num_warps: int
    num_stages: int

    def launch(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


INTERPRETER_TILE_CAP = 64


def gemm_tiles(rows: int, cols: int, red: int, dtype: torch.dtype, on_gpu: bool, *,
               operands: int = 1, precision: str = "tf32") -> Tiles:
    """Tiles of a (rows x red) @ (red x cols) implicit GEMM; `red` is the reduction length
    per step's inner dimension (input channels per group for a convolution); `operands` the
    full-size tensors read per element of the left operand (3 for BN-backward's apply on
    load: the gradient, z and the mask or u), whose per-stage buffers shrink the K step;
    `precision` the dot's ("ieee" fp32 runs without tensor cores, on FMA: smaller tiles)."""
    if not on_gpu:
        cap = INTERPRETER_TILE_CAP
        return Tiles(_pow2(rows, 16, cap), _pow2(cols, 16, cap), _pow2(red, 16, cap), 4, 1)
    if dtype == torch.float64:
        return Tiles(64 if rows >= 64 else 32, _pow2(cols, 16, 64), 16, 4, 2)
    if dtype == torch.float32 and precision != "tf32":
        return Tiles(64, _pow2(cols, 16, 64), 16, 4, 2)
    wide = dtype in (torch.float16, torch.bfloat16)
    bm = 128 if rows >= 8192 else 64
    bn = _pow2(cols, 16, 128)
    bk_max = (64 if wide else 32) if operands == 1 else (32 if wide else 16)
    bk = _pow2(red, 16, bk_max)
    # 8 warps (two warpgroups) from 128 x 64 up: at 4, such tiles spill past 255 registers.
    warps = 8 if bm * bn >= 128 * 64 else 4
    return Tiles(bm, bn, bk, warps, 3 if wide else 2)


# --- Opt-in autotuning ------------------------------------------------------------------------

AUTOTUNE_ENV = "RESFUSE_TRITON_AUTOTUNE"
AUTOTUNE_CACHE_ENV = "RESFUSE_TRITON_AUTOTUNE_CACHE"

# (rows, cols, red, num_warps, num_stages) per kind of dot, after Triton's H100 matmul configs;
# each is clipped to the problem (`gemm_candidates`). A configuration whose shared memory does
# not fit fails to compile and is skipped (register pressure only spills: timing judges that).
_CANDIDATES: Dict[str, List[tuple]] = {
    "16bit": [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4),
              (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4),
              (64, 256, 32, 4, 3)],
    "tf32": [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3),
             (64, 64, 32, 4, 4), (128, 128, 16, 8, 4), (64, 256, 16, 8, 3)],
    "fp32": [(64, 64, 16, 4, 2), (32, 64, 16, 4, 3), (64, 32, 16, 4, 3), (128, 64, 16, 8, 2),
             (64, 128, 16, 8, 2)],
    "fp64": [(64, 64, 16, 4, 2), (32, 64, 16, 4, 2), (64, 32, 16, 4, 3), (32, 32, 16, 4, 3),
             (128, 64, 16, 8, 2)],
}

_chosen: Dict[str, Tiles] = {}           # this process's choice per problem
_cache_loaded: Dict[str, Dict[str, list]] = {}   # a cache file's entries, read once per path
_TUNE_ON_CPU = False                     # tests: tune under the interpreter (timing means nothing)


def _source_hash() -> str:
    """The kernels' and tiles' source: a cache file's choices made for other kernel code are
    not reused."""
    h = hashlib.sha256()
    folder = os.path.dirname(os.path.abspath(__file__))
    for name in ("conv.py", "conv_backward.py", "bn_act.py", "tiles.py"):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:12]


_SOURCE = _source_hash()


def _bench(fn: Callable[[], object]) -> float:
    """fn's median time in ms (GPU)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def _not_a_candidate_errors() -> tuple:
    """What a configuration that cannot run on this GPU raises (at compile or launch): such a
    configuration is skipped. Anything else is a bug and is raised."""
    import triton.compiler.errors as compile_errors
    import triton.runtime.errors as runtime_errors
    found = [getattr(runtime_errors, "OutOfResources", None),
             getattr(runtime_errors, "PTXASError", None),
             getattr(compile_errors, "CompilationError", None), torch.cuda.OutOfMemoryError]
    return tuple(e for e in found if e is not None)


def _kind(dtype: torch.dtype, precision: str) -> str:
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "tf32" if precision == "tf32" else "fp32"
    return "16bit"


def gemm_candidates(rows: int, cols: int, red: int, dtype: torch.dtype, *, operands: int = 1,
                    precision: str = "tf32") -> List[Tiles]:
    """The configurations `pick_tiles` times: the default (`gemm_tiles`) first, then the fixed
    set for the dot's kind, each dimension clipped to the problem (never below the default's:
    a tile wider than the problem only masks more; the K step at most the default's cap where
    the prologue reads three tensors), without repeats."""
    base = gemm_tiles(rows, cols, red, dtype, True, operands=operands, precision=precision)
    kind = _kind(dtype, precision)
    red_cap = 256 if operands == 1 else (32 if kind == "16bit" else 16)
    out = [base]
    for r, c, k, w, s in _CANDIDATES[kind]:
        t = Tiles(min(r, max(base.rows, _pow2(rows, 16, 256))),
                  min(c, max(base.cols, _pow2(cols, 16, 256))),
                  min(k, red_cap, max(base.red, _pow2(red, 16, 256))), w, s)
        if t not in out:
            out.append(t)
    return out


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def _read_cache(path: str) -> Dict[str, list]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock beside the cache file (POSIX; elsewhere none)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _valid(entry, candidates: List[Tiles]) -> Optional[Tiles]:
    """A cache entry as Tiles, if it is one of today's candidates for the problem."""
    try:
        t = Tiles(*[int(v) for v in entry])
    except (TypeError, ValueError):
        return None
    return t if t in candidates else None


def _settle(path: str, name: str, best: Tiles, candidates: List[Tiles]) -> Tiles:
    """Writes `best` for `name` unless another process wrote a valid choice first, which is
    then adopted (under a lock: every process runs the first choice). A file that cannot be
    written leaves the choice to this process, with a warning."""
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with _locked(path):
            data = _read_cache(path)
            first = _valid(data.get(name), candidates)
            if first is not None:
                return first
            data[name] = list(best)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".resfuse-tune-")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"resfuse: cannot write the autotune cache {path}: {e}", stacklevel=3)
    return best


def _capturing(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def _problem_name(kernel: str, key: tuple, device: torch.device) -> str:
    """A choice's name: the kernel and problem, and the GPU, Triton and source it was made on."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{kernel}|{where}|triton {triton.__version__}|{_SOURCE}|{key}"


def pick_tiles(kernel: str, key: tuple, run: Callable[[Tiles], object], device: torch.device,
               rows: int, cols: int, red: int, dtype: torch.dtype, *, operands: int = 1,
               precision: str = "tf32") -> Tiles:
    """The tiles to launch `kernel` with: `gemm_tiles`' choice, or with autotuning on (GPU), the
    fastest of `gemm_candidates` for this `key` (everything that selects the compiled kernel and
    its sizes: shapes, layouts, dtype, the fused stages), timed once by calling `run(tiles)`
    (which must only write outputs it allocates) and kept for the process."""
    on_gpu = device.type == "cuda"
    base = gemm_tiles(rows, cols, red, dtype, on_gpu, operands=operands, precision=precision)
    if not (autotune_enabled() and (on_gpu or _TUNE_ON_CPU)):
        return base
    name = _problem_name(kernel, key, device)
    if name in _chosen:
        return _chosen[name]
    candidates = gemm_candidates(rows, cols, red, dtype, operands=operands, precision=precision)
    path = os.environ.get(AUTOTUNE_CACHE_ENV) or None
    if path is not None:
        if path not in _cache_loaded:
            _cache_loaded[path] = _read_cache(path)
        kept = _valid(_cache_loaded[path].get(name), candidates)
        if kept is not None:
            _chosen[name] = kept
            return kept
    if _capturing(device):  # no timing inside a capture: the default, for good in this process
        _chosen[name] = base
        return base
    skip = _not_a_candidate_errors()
    best, best_ms = None, float("inf")
    for t in candidates:
        try:
            run(t)  # compiles; a configuration that does not fit raises here
            ms = _bench(lambda: run(t))
        except skip:
            continue
        if ms < best_ms:
            best, best_ms = t, ms
    if best is None:  # nothing ran: leave it to the default launch to raise its own error
        return base
    if path is not None:
        best = _settle(path, name, best, candidates)
    _chosen[name] = best
    return best
