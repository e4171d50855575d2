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
- Triton's interpreter (CPU): the smallest power of two >= each dimension, from 16 to 64: its
  cost is per program and per loop step, nearly independent of the tile's size.

Autotuning (opt-in: RESFUSE_TRITON_AUTOTUNE=1; GPU only): `pick_tiles` times a small fixed
set of H100-class configurations around that choice on the first call of each shape and keeps
the fastest for the process. It is off by default because the tile shape decides the order in
which the BN statistics and the split weight-gradient reduction add their partials: with it on,
two calls in one process still give identical bits, but two processes may choose differently
(timing noise) unless RESFUSE_TRITON_AUTOTUNE_CACHE names a JSON file in which the choices are
kept and reused. Never tunes inside CUDA-graph capture (it uses the cached or default tiles).
"""
from __future__ import annotations

import json
import os
import tempfile
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


def gemm_tiles(rows: int, cols: int, red: int, dtype: torch.dtype, on_gpu: bool, *,
               operands: int = 1, precision: str = "tf32") -> Tiles:
    """Tiles of a (rows x red) @ (red x cols) implicit GEMM; `red` is the reduction length
    per step's inner dimension (input channels per group for a convolution); `operands` the
    full-size tensors read per element of the left operand (3 for BN-backward's apply on
    load: the gradient, z and the mask or u), whose per-stage buffers shrink the K step;
    `precision` the dot's ("ieee" fp32 runs without tensor cores, on FMA: smaller tiles)."""
    if not on_gpu:
        return Tiles(_pow2(rows, 16, 64), _pow2(cols, 16, 64), _pow2(red, 16, 64), 4, 1)
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
# each is clipped to the problem (`gemm_candidates`). Configurations that do not fit (shared
# memory, registers) fail to compile and are skipped.
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

_chosen: Dict[str, Tiles] = {}   # this process's choices (and the cache file's, once read)
_cache_loaded: Dict[str, bool] = {}
_TUNE_ON_CPU = False             # tests: tune under the interpreter (timing means nothing there)


def _bench(fn: Callable[[], object]) -> float:
    """fn's median time in ms (GPU)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


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
    a tile wider than the problem only masks more), without repeats."""
    base = gemm_tiles(rows, cols, red, dtype, True, operands=operands, precision=precision)
    out = [base]
    for r, c, k, w, s in _CANDIDATES[_kind(dtype, precision)]:
        t = Tiles(min(r, max(base.rows, _pow2(rows, 16, 256))),
                  min(c, max(base.cols, _pow2(cols, 16, 256))),
                  min(k, max(base.red, _pow2(red, 16, 256))), w, s)
        if t not in out:
            out.append(t)
    return out


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def _cache_path() -> Optional[str]:
    return os.environ.get(AUTOTUNE_CACHE_ENV) or None


def _read_cache(path: str) -> Dict[str, list]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: str, name: str, t: Tiles) -> None:
    """Adds one choice to the file (read, merge, atomic replace: a concurrent writer loses at
    most its own entry, which is timed again next time)."""
    data = _read_cache(path)
    data[name] = list(t)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".resfuse-tune-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=0, sort_keys=True)
    os.replace(tmp, path)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def pick_tiles(kernel: str, key: tuple, run: Callable[[Tiles], object], device: torch.device,
               rows: int, cols: int, red: int, dtype: torch.dtype, *, operands: int = 1,
               precision: str = "tf32") -> Tiles:
    """The tiles to launch `kernel` with: `gemm_tiles`' choice, or with autotuning on (GPU), the
    fastest of `gemm_candidates` for this `key` (everything that selects the compiled kernel and
    its sizes: shapes, strides' layout, dtype, the fused stages), timed once by calling
    `run(tiles)` (which must only write its own outputs) and kept for the process."""
    on_gpu = device.type == "cuda"
    base = gemm_tiles(rows, cols, red, dtype, on_gpu, operands=operands, precision=precision)
    if not (autotune_enabled() and (on_gpu or _TUNE_ON_CPU)):
        return base
    where = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    name = f"{kernel}|{where}|triton {triton.__version__}|{key}"
    path = _cache_path()
    if name not in _chosen and path is not None and not _cache_loaded.get(path):
        for k, v in _read_cache(path).items():
            _chosen.setdefault(k, Tiles(*v))
        _cache_loaded[path] = True
    if name in _chosen:
        return _chosen[name]
    if _capturing(device):
        return base
    best, best_ms = base, float("inf")
    for t in gemm_candidates(rows, cols, red, dtype, operands=operands, precision=precision):
        try:
            run(t)  # compiles; a configuration that does not fit raises here
            ms = _bench(lambda: run(t))
        except Exception:  # noqa: BLE001 - out of resources, or any failure: not a candidate
            continue
        if ms < best_ms:
            best, best_ms = t, ms
    _chosen[name] = best
    if path is not None:
        _write_cache(path, name, best)
    return best
