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
"""
from __future__ import annotations

from typing import NamedTuple

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
