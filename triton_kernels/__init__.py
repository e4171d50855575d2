"""Triton kernels of resfuse, installed as `resfuse.triton_kernels` (never as a top-level
`triton_kernels`, a name other projects use). One file per kernel family, kernels first, then
their launchers: `conv.py` (the implicit-GEMM forward with its prologue and epilogues),
`conv_backward.py` (data and weight gradients with BN-backward's apply on load), `bn_act.py`
(batch statistics, scale-shift + residual + activation, BN-backward's reduce and apply) and
`tiles.py` (tile shapes, and the opt-in autotuner). The `triton` backend
(`resfuse/backend/triton.py`) is their only caller."""
