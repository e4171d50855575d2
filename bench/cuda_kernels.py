#!/usr/bin/env python3
"""CUDA-backend benchmark on a GPU: each kernel against the copy-bandwidth ceiling, and
BN + add + ReLU and a ResNet-50 bottleneck block against eager PyTorch and torch.compile.

    python bench/cuda_kernels.py [--batch 256] [--dtype bfloat16] [--layout channels_last] [--out DIR]

Kernels (ResNet-50 layer1 shape, N x 256 x 56 x 56): scale-bias-add-ReLU forward (writes y and
the 1-bit mask), batch statistics, the backward reduce and apply passes; each as GB/s (bytes
each input read once and each output written once, computed from the shapes) and as a fraction
of the device-to-device copy bandwidth measured in the same run. Blocks: training step
(forward + backward) and eval forward of a bottleneck (256 -> 64 -> 256, 56 x 56), with peak
memory. Times are CUDA-event medians with 20th/80th percentiles after warm-up; every input is
random, and each tensor is far larger than L2, so repeated calls do not run from cache.
Writes DIR/cuda-kernels.json and prints a table.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import resfuse  # noqa: E402
import resfuse.functional as RF  # noqa: E402
from resfuse._extension import build_info  # noqa: E402
from resfuse.backend import cuda as cuda_backend  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def timeit(fn, reps=30, warmup=5):
    """(p20, median, p80) in ms, each call timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    q = statistics.quantiles(ts, n=10)
    return q[1], statistics.median(ts), q[7]


def ceilings():
    x = torch.randn(2**29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    _, ms, _ = timeit(lambda: y.copy_(x), reps=20)
    copy_gbs = 2 * x.numel() * 2 / (ms * 1e-3) / 1e9
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    _, ms, _ = timeit(lambda: a @ b, reps=20)
    tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    return copy_gbs, tflops


def env():
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        smi = ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        commit = ""
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = None
    return dict(device=torch.cuda.get_device_name(), nvidia_smi=smi, torch=torch.__version__,
                cuda=torch.version.cuda, triton=tv, python=platform.python_version(),
                commit=os.environ.get("RESFUSE_COMMIT") or commit,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                resfuse_build=build_info())


def kernel_rows(n, dtype, mf, copy_gbs):
    shape = (n, 256, 56, 56)
    C = shape[1]
    E = torch.Size(shape).numel()
    es = torch.empty((), dtype=dtype).element_size()
    z = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=mf)
    r = torch.randn_like(z)
    g = torch.randn_like(z)
    w = torch.rand(C, device="cuda") + 0.5
    b = torch.randn(C, device="cuda")
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    ops = torch.ops.resfuse
    mean, invstd, scale, shift = ops.cuda_bn_stats(z, w, b, None, None, None, 0.1, 1e-5)
    _, mask = ops.cuda_bn_apply(z, scale, shift, r, 1, 0.0, 1)
    _, _, _, coef = ops.cuda_bn_backward_reduce(g, mask, 1, z, mean, invstd, w, True, 1, 0.0, False)
    mbytes = (E + 7) // 8
    rows = []

    def row(name, fn, nbytes, note=""):
        p20, med, p80 = timeit(fn)
        gbs = nbytes / (med * 1e-3) / 1e9
        rows.append(dict(kind="kernel", name=name, shape=list(shape), ms=med, p20=p20, p80=p80,
                         bytes=nbytes, gbs=gbs, frac_copy=gbs / copy_gbs, note=note))
        print(f"  {name:44s} {med:8.3f} ms  {gbs:7.0f} GB/s  {gbs / copy_gbs:5.1%} of copy", flush=True)

    print(f"kernels {tuple(shape)} {dtype} {'channels_last' if mf == torch.channels_last else 'nchw'}")
    row("bn_stats (read z)", lambda: ops.cuda_bn_stats(z, w, b, rm, rv, None, 0.1, 1e-5), E * es)
    row("scale_shift_add_relu fwd (z, r -> y, mask)", lambda: ops.cuda_bn_apply(z, scale, shift, r, 1, 0.0, 1),
        3 * E * es + mbytes)
    row("bwd reduce (g, mask, z -> g_u, sums)",
        lambda: ops.cuda_bn_backward_reduce(g, mask, 1, z, mean, invstd, w, True, 1, 0.0, True), 3 * E * es + mbytes)
    row("bwd reduce, no g_u (g, mask, z -> sums)",
        lambda: ops.cuda_bn_backward_reduce(g, mask, 1, z, mean, invstd, w, True, 1, 0.0, False), 2 * E * es + mbytes)
    row("bwd apply (g, mask, z -> g_z)", lambda: ops.cuda_bn_backward_apply(g, mask, 1, z, mean, coef, 1, 0.0),
        3 * E * es + mbytes)

    # The same scale-bias-add-ReLU in eager PyTorch and torch.compile (eval BN: fixed stats).
    def eager_apply(z=z, r=r):
        return torch.relu(F.batch_norm(z, rm, rv, w.to(dtype), b.to(dtype), False) + r)
    row("eager: relu(batch_norm(eval) + r)", eager_apply, 3 * E * es, "bytes of the fused op, for comparison")
    compiled = torch.compile(eager_apply)
    row("torch.compile: relu(batch_norm(eval) + r)", compiled, 3 * E * es, "bytes of the fused op")

    # Training BN + add + ReLU, forward + backward (no conv).
    zz = z.detach().requires_grad_()
    rr = r.detach().requires_grad_()
    ww = w.to(dtype).requires_grad_()
    bb = b.to(dtype).requires_grad_()

    def fused_train():
        y = RF.bn_act(zz, ww, bb, rm, rv, training=True, residual=rr, backend="cuda")
        y.backward(g)

    def eager_fwd():
        return torch.relu(F.batch_norm(zz, rm, rv, ww, bb, True) + rr)
    compiled_fwd = torch.compile(eager_fwd)

    def eager_train():
        eager_fwd().backward(g)

    def compiled_train():
        compiled_fwd().backward(g)
    for name, fn in (("bn+add+relu train fwd+bwd: resfuse cuda", fused_train),
                     ("bn+add+relu train fwd+bwd: eager", eager_train),
                     ("bn+add+relu train fwd+bwd: torch.compile", compiled_train)):
        p20, med, p80 = timeit(fn, reps=20)
        rows.append(dict(kind="bn_act_train", name=name, shape=list(shape), ms=med, p20=p20, p80=p80))
        print(f"  {name:44s} {med:8.3f} ms", flush=True)
    return rows


def bottleneck():
    try:
        from torchvision.models.resnet import Bottleneck
    except Exception:  # noqa: BLE001
        from resfuse.reference import Bottleneck
    return Bottleneck(256, 64)


def block_rows(n, dtype, mf):
    rows = []
    plain = bottleneck().to("cuda", dtype).to(memory_format=mf)
    fused = copy.deepcopy(plain)
    wrapper = nn.Sequential(fused)
    rep = resfuse.convert(wrapper, backend="cuda")
    assert len(rep.swapped) == 1, rep
    x = torch.randn(n, 256, 56, 56, device="cuda", dtype=dtype).to(memory_format=mf)
    gy = torch.randn_like(x)
    xg = x.detach().requires_grad_()
    print(f"bottleneck 256-64-256 at 56x56, batch {n}")

    def train(m):
        def step():
            y = m(xg)
            y.backward(gy)
        return step

    def evaluate(m):
        def fwd():
            with torch.no_grad():
                m(x)
        return fwd

    plain.train()
    wrapper.train()
    compiled = torch.compile(copy.deepcopy(plain))
    contestants = {"eager": plain, "resfuse cuda": wrapper, "torch.compile": compiled}
    for mode in ("train", "eval"):
        for m in (plain, wrapper, compiled):
            m.train(mode == "train")
        variants = list(contestants.items())
        if mode == "eval":
            variants.insert(2, ("resfuse cuda, no cuDNN fused", wrapper))
        for name, m in variants:
            old = cuda_backend.set_cudnn_fused_eval(name != "resfuse cuda, no cuDNN fused")
            try:
                fn = train(m) if mode == "train" else evaluate(m)
                fn()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                p20, med, p80 = timeit(fn, reps=20)
                peak = torch.cuda.max_memory_allocated() - base
            finally:
                cuda_backend.set_cudnn_fused_eval(old)
            rows.append(dict(kind=f"block_{mode}", name=name, batch=n, ms=med, p20=p20, p80=p80,
                             peak_bytes=peak, img_s=n / (med * 1e-3)))
            print(f"  {mode:5s} {name:32s} {med:8.3f} ms  [{p20:.3f}, {p80:.3f}]  peak +{peak / 2**30:.2f} GiB",
                  flush=True)
    for mode in ("train", "eval"):
        base = next(r["ms"] for r in rows if r["kind"] == f"block_{mode}" and r["name"] == "eager")
        comp = next(r["ms"] for r in rows if r["kind"] == f"block_{mode}" and r["name"] == "torch.compile")
        for r in rows:
            if r["kind"] == f"block_{mode}":
                r["speedup_vs_eager"] = base / r["ms"]
                r["speedup_vs_compile"] = comp / r["ms"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--layout", default="channels_last", choices=["channels_last", "nchw"])
    p.add_argument("--skip-blocks", action="store_true")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    a = p.parse_args(argv)
    if resfuse.backends()["cuda"] != "ok":
        print(f"cuda backend: {resfuse.backends()['cuda']}")
        return 2
    dtype = DTYPES[a.dtype]
    mf = torch.channels_last if a.layout == "channels_last" else torch.contiguous_format
    torch.manual_seed(0)
    copy_gbs, tflops = ceilings()
    print(f"ceilings: copy {copy_gbs:.0f} GB/s (read + write), bf16 matmul {tflops:.0f} TFLOP/s")
    result = dict(kind="cuda-kernels", env=env(), dtype=a.dtype, layout=a.layout, batch=a.batch,
                  ceilings=dict(copy_gbs=copy_gbs, matmul_bf16_tflops=tflops), rows=[])
    result["rows"] += kernel_rows(a.batch, dtype, mf, copy_gbs)
    torch.cuda.empty_cache()
    if not a.skip_blocks:
        result["rows"] += block_rows(a.batch, dtype, mf)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "cuda-kernels.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
