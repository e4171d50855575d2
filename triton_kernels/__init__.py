"""Triton kernels of resfuse, installed as `resfuse.triton_kernels` (never as a top-level
`triton_kernels`, a name other projects use). One file per kernel family, kernels first, then
their launchers. The kernels themselves are the next milestone: until they land the `triton`
backend reports itself unavailable (`resfuse.backends()`)."""
