"""Compile every Triton kernel of resfuse for a GPU target, without a GPU.

    python bench/triton_compile_check.py [--arch 90] [--quick] [--candidates] [--jobs 2]
                                         [--csv FILE]

Triton's interpreter (how the kernels are tested on the CPU) never compiles them, so a kernel
can pass every CPU test and still fail to compile for a GPU (a construct the compiler rejects,
shared memory past the GPU's limit), or compile with register spills. This runs each launcher
of `resfuse.triton_kernels` as it runs on a GPU, on CPU tensors of real ResNet shapes (never
written: nothing is launched), with a stub Triton driver that reports the target; each kernel
launch becomes a compile (Triton's own `warmup`), down to the cubin with ptxas, whose report
gives registers and spills.

- `--arch`: the compute capability (80 A100, 90 H100; default 90).
- `--quick`: two conv shapes in channels_last and the BN kernels in channels_last (CI; about
  a minute on two cores); default: six conv shapes (ResNet-50 stages, the stem, a ResNeXt
  grouped 3x3, and small batches) in both layouts and every dtype.
- `--candidates`: also every configuration the opt-in autotuner may time (tiles.py).
- `--only TEXT`: only the jobs whose name (as printed: `tf32_bfloat16_gemm_quick`, ...)
  contains TEXT.
- `--csv`: one row per launch: the case, kernel, tiles, whether it compiled, registers, spill
  bytes, shared memory, and whether the dots became wgmma (sm_90) or mma.sync.

Exits 1 when a configuration fails to compile or needs more shared memory than the target
has per block, when a case launches no kernel, when ptxas reports nothing for a compile, or
when a job crashes or runs past its time limit. Spills are reported, not judged (they cost
speed, not correctness; the autotuner's timing judges them).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

# Shared memory per block, opt-in maximum (CUDA programming guide, "Technical Specifications").
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}

# (N, Cin, H, W, Cout, kernel, stride, padding, groups)
SHAPES = [(256, 64, 56, 56, 64, 3, 1, 1, 1), (256, 256, 56, 56, 64, 1, 1, 0, 1),
          (256, 512, 7, 7, 2048, 1, 1, 0, 1), (256, 128, 56, 56, 128, 3, 2, 1, 1),
          (32, 256, 28, 28, 256, 3, 1, 1, 32), (8, 3, 224, 224, 64, 7, 2, 3, 1)]
SMALL_SHAPES = [(2, 64, 56, 56, 64, 3, 1, 1, 1), (32, 512, 7, 7, 2048, 1, 1, 0, 1)]
QUICK_SHAPES = [(256, 64, 56, 56, 64, 3, 1, 1, 1), (32, 256, 28, 28, 256, 3, 1, 1, 32)]

# Jobs: (precision of fp32 dots, dtype, part). One process each.
FULL_JOBS = [(p, d, part) for part in ("gemm", "gemm_small")
             for p, d in [("tf32", "bfloat16"), ("tf32", "float16"), ("tf32", "float32"),
                          ("ieee", "float32"), ("ieee", "float64")]] + \
            [("ieee", d, "bn") for d in ("bfloat16", "float16", "float32", "float64")]
QUICK_JOBS = [(p, d, "gemm_quick") for p, d in [("tf32", "bfloat16"), ("tf32", "float32"),
                                                ("ieee", "float32"), ("ieee", "float64")]] + \
             [("ieee", d, "bn_quick") for d in ("bfloat16", "float32", "float64")]

JOB_TIMEOUT_S = 1800  # one job; the slowest full job takes about 3 minutes on one core

COLUMNS = ["job", "case", "kernel", "BLOCK_M_or_R", "BLOCK_N_or_C", "BLOCK_K_or_BLOCK",
           "num_warps", "num_stages", "compiled", "registers", "spill_store_bytes",
           "shared_bytes", "wgmma", "mma_sync", "error"]


# ------------------------------------------------------------------------------ one job

def _stub_triton(arch: int, precision: str, candidates: bool):
    """Point Triton at a stub driver for `arch`, replace kernel launches by compiles, and make
    the launchers choose as on a GPU. Returns the list the compiles are recorded in."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class StubDriver:  # what JITFunction.run asks of a driver before it launches
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        def is_active(self):
            return True

    driver.set_active(StubDriver())
    with contextlib.suppress(Exception):  # ptxas's report on stdout (per compile)
        triton.knobs.nvidia.dump_ptxas_log = True

    from resfuse.triton_kernels import conv, conv_backward, tiles
    # The launchers choose tiles and the dot's precision from `is_cuda`: choose as on a GPU.
    gemm_tiles = tiles.gemm_tiles
    tiles.gemm_tiles = lambda rows, cols, red, dtype, on_gpu, **kw: gemm_tiles(
        rows, cols, red, dtype, True, **kw)
    prec = lambda x: precision if x.dtype == torch.float32 else "ieee"  # noqa: E731
    conv.precision_for = conv_backward.precision_for = prec
    if candidates:  # every configuration the autotuner would time, "timed" by compiling it
        os.environ[tiles.AUTOTUNE_ENV] = "1"
        tiles._TUNE_ON_CPU = True
        tiles._bench = lambda fn: (fn(), 1.0)[1]

    records, label = [], {"case": "", "all": []}
    by_hash = {}

    def launch_as_compile(self, grid):
        def compile_only(*args, **kwargs):
            rec = dict(case=label["case"], kernel=self.fn.__name__,
                       blocks=[v for k, v in kwargs.items() if k.startswith("BLOCK")],
                       num_warps=kwargs.get("num_warps", 4),
                       num_stages=kwargs.get("num_stages", 3))
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log):
                    k = self.warmup(*args, grid=grid, **kwargs)
            except Exception as e:  # noqa: BLE001 - the finding this tool exists for
                rec.update(compiled=False, error=f"{type(e).__name__}: {str(e)[:400]}")
                records.append(rec)
                return None
            ptx = k.asm.get("ptx", "")
            rec.update(compiled=True, shared_bytes=k.metadata.shared,
                       num_warps=k.metadata.num_warps, num_stages=k.metadata.num_stages,
                       wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
                       mma_sync=len(re.findall(r"\bmma\.sync", ptx)))
            text = log.getvalue()
            regs = re.search(r"Used (\d+) registers", text)
            spill = re.search(r"(\d+) bytes spill stores", text)
            if regs:  # a fresh compile; a cached one reports nothing: reuse its first record
                by_hash[k.hash] = (int(regs[1]), int(spill[1]) if spill else 0)
            rec["registers"], rec["spill_store_bytes"] = by_hash.get(k.hash, (None, None))
            records.append(rec)
            return None
        return compile_only

    JITFunction.__getitem__ = launch_as_compile
    return records, label


def _run_job(precision: str, dtname: str, part: str, arch: int, candidates: bool):
    records, label = _stub_triton(arch, precision, candidates)
    import torch
    from resfuse.triton_kernels import bn_act as BA, conv as TC, conv_backward as CB

    dt = getattr(torch, dtname)
    acc = torch.float64 if dt == torch.float64 else torch.float32

    def E(*shape, cl=False, d=dt):
        fmt = torch.channels_last if cl else torch.contiguous_format
        return torch.empty(shape, dtype=d, memory_format=fmt)

    def case(text):
        label["case"] = f"{precision}|{dtname}|{text}"
        label["all"].append(label["case"])

    if part.startswith("gemm"):
        shapes = {"gemm": SHAPES, "gemm_small": SMALL_SHAPES, "gemm_quick": QUICK_SHAPES}[part]
        layouts = [True] if part != "gemm" or (dt == torch.float32 and precision == "ieee") \
            else [True, False]
        for N, C, H, W, Co, k, st, p, g in shapes:
            Ho, Wo = (H + 2 * p - k) // st + 1, (W + 2 * p - k) // st + 1
            for cl in layouts:
                tag = f"{(N, C, H, W, Co, k, st, p, g)}|{'CL' if cl else 'NCHW'}"
                x, w = E(N, C, H, W, cl=cl), E(Co, C // g, k, k)
                sc, sh = E(C, d=acc), E(C, d=acc)
                geo = ((st, st), (p, p), (1, 1), g)
                case(tag + "|fwd plain")
                TC.conv2d(x, w, None, *geo)
                case(tag + "|fwd prologue(relu) + stats")
                TC.conv2d(x, w, None, *geo, prologue=TC.Prologue(sc, sh, TC.ACT_RELU, 0.0),
                          stats=True)
                case(tag + "|fwd bias + residual + relu")
                TC.conv2d(x, w, E(Co), *geo, residual=E(N, Co, Ho, Wo, cl=cl), act=TC.ACT_RELU)
                case(tag + "|fwd prologue(silu)")
                TC.conv2d(x, w, None, *geo, prologue=TC.Prologue(sc, sh, TC.ACT_SILU, 0.0))
                case(tag + "|fwd prologue(gelu_tanh)")
                TC.conv2d(x, w, None, *geo, prologue=TC.Prologue(sc, sh, TC.ACT_GELU_TANH, 0.0))
                case(tag + "|fwd prologue(hardswish) + residual + mish")
                TC.conv2d(x, w, None, *geo, prologue=TC.Prologue(sc, sh, TC.ACT_HARDSWISH, 0.0),
                          residual=E(N, Co, Ho, Wo, cl=cl), act=TC.ACT_MISH)
                grad, z = E(N, Co, Ho, Wo, cl=cl), E(N, Co, Ho, Wo, cl=cl)
                mask = torch.empty((grad.numel() + 31) // 32, dtype=torch.int32)
                gp_mask = CB.GradPrologue(mask, BA.SAVE_MASK, z, E(Co, d=acc), E(3, Co, d=acc),
                                          TC.ACT_RELU, 0.0)
                gp_rec = CB.GradPrologue(E(2, Co, d=acc), BA.SAVE_RECOMPUTE, z, E(Co, d=acc),
                                         E(1, Co, d=acc), TC.ACT_GELU, 0.0)
                case(tag + "|dgrad plain")
                CB.conv2d_input_grad(grad, w, x.shape, *geo)
                case(tag + "|dgrad grad-prologue(mask, relu, 3 rows)")
                CB.conv2d_input_grad(grad, w, x.shape, *geo, grad_prologue=gp_mask)
                case(tag + "|dgrad grad-prologue(recompute, gelu, 1 row)")
                CB.conv2d_input_grad(grad, w, x.shape, *geo, grad_prologue=gp_rec)
                case(tag + "|wgrad plain")
                CB.conv2d_weight_grad(grad, x, w.shape, *geo)
                case(tag + "|wgrad prologue(relu)")
                CB.conv2d_weight_grad(grad, x, w.shape, *geo,
                                      prologue=TC.Prologue(sc, sh, TC.ACT_RELU, 0.0))
                case(tag + "|wgrad grad-prologue(mask, relu, 3 rows)")
                CB.conv2d_weight_grad(grad, x, w.shape, *geo, grad_prologue=gp_mask)
                case(tag + "|wgrad prologue(silu) + grad-prologue(recompute, gelu, 1 row)")
                CB.conv2d_weight_grad(grad, x, w.shape, *geo, grad_prologue=gp_rec,
                                      prologue=TC.Prologue(sc, sh, TC.ACT_SILU, 0.0))
                case(tag + "|wgrad prologue(relu6) + grad-prologue(recompute, mish, 3 rows)")
                CB.conv2d_weight_grad(grad, x, w.shape, *geo, prologue=TC.Prologue(
                    sc, sh, TC.ACT_RELU6, 0.0), grad_prologue=CB.GradPrologue(
                    E(2, Co, d=acc), BA.SAVE_RECOMPUTE, z, E(Co, d=acc), E(3, Co, d=acc),
                    TC.ACT_MISH, 0.0))
        return dict(records=records, cases=label["all"])

    N, C, H, W = 4, 64, 14, 14
    for cl in ([True] if part == "bn_quick" else [True, False]):
        tag = f"bn|{'CL' if cl else 'NCHW'}"
        z, gy = E(N, C, H, W, cl=cl), E(N, C, H, W, cl=cl)
        sc, sh, mean = E(C, d=acc), E(C, d=acc), E(C, d=acc)
        case(tag + "|batch_stats")
        BA.batch_stats(z)
        for act, save, res, affine in [(0, 0, False, True), (1, 0, True, True), (1, 1, True, True),
                                       (2, 1, False, True), (3, 2, False, True),
                                       (4, 2, True, True), (5, 0, False, False),
                                       (1, 4, False, True), (6, 1, True, True),
                                       (7, 2, False, True), (8, 1, False, True),
                                       (9, 2, True, True)]:
            case(tag + f"|apply act={act} save={save} residual={res} affine={affine}")
            BA.apply(z, sc if affine else None, sh if affine else None,
                     E(N, C, H, W, cl=cl) if res else None, act, 0.01, save)
        mask = torch.empty((z.numel() + 31) // 32, dtype=torch.int32)
        saved_for = {BA.SAVE_NONE: None, BA.SAVE_MASK: mask, BA.SAVE_INPUT: E(N, C, H, W, cl=cl),
                     BA.SAVE_OUTPUT: E(N, C, H, W, cl=cl), BA.SAVE_RECOMPUTE: E(2, C, d=acc)}
        for i, (save, act) in enumerate([(0, 0), (1, 1), (1, 2), (2, 3), (3, 5), (4, 1), (4, 3),
                                         (4, 4), (4, 5), (4, 2), (1, 6), (1, 8), (2, 7),
                                         (3, 6), (4, 9), (2, 8)]):
            case(tag + f"|backward_reduce save={save} act={act} write_gu={i % 3 == 1}")
            BA.backward_reduce(gy, saved_for[save], save, z, mean, act, 0.01, i % 3 == 1)
            for rows in (3, 1):
                case(tag + f"|backward_apply save={save} act={act} coef rows={rows}")
                BA.backward_apply(gy, saved_for[save], save, z, mean, E(rows, C, d=acc), act, 0.01)
    return dict(records=records, cases=label["all"])


# ------------------------------------------------------------------------------ the driver

def _spawn(job, arch: int, candidates: bool, cache_root: str):
    """One job in its own process (a fresh Triton cache: every compile runs ptxas)."""
    precision, dtname, part = job
    env = dict(os.environ, TRITON_CACHE_DIR=os.path.join(cache_root, "_".join(job)))
    for name in ("TRITON_INTERPRET", "RESFUSE_TRITON_AUTOTUNE", "RESFUSE_TRITON_AUTOTUNE_CACHE"):
        env.pop(name, None)  # (--candidates turns the tuner on in the job itself)
    cmd = [sys.executable, os.path.abspath(__file__), "--one-job", precision, dtname, part,
           "--arch", str(arch)] + (["--candidates"] if candidates else [])
    t0 = time.time()
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return job, None, f"no result within {JOB_TIMEOUT_S} s", time.time() - t0
    if out.returncode != 0:
        return job, None, f"exit {out.returncode}: {out.stderr[-2000:]}", time.time() - t0
    return job, json.loads(out.stdout.strip().splitlines()[-1]), None, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--candidates", action="store_true")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--only", default=None,
                    help="only the jobs whose name contains this (e.g. tf32_, _gemm, _bn)")
    ap.add_argument("--one-job", nargs=3, metavar=("PRECISION", "DTYPE", "PART"),
                    help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one_job:
        os.environ.pop("TRITON_INTERPRET", None)
        print(json.dumps(_run_job(*a.one_job, a.arch, a.candidates)))
        return 0

    import triton
    limit = SHARED_LIMIT.get(a.arch)
    jobs = QUICK_JOBS if a.quick else FULL_JOBS
    if a.only is not None:
        jobs = [j for j in jobs if a.only in "_".join(j)]
        if not jobs:
            ap.error(f"--only: no job name contains {a.only!r}")
    print(f"triton {triton.__version__}: compiling resfuse's Triton kernels for sm_{a.arch} "
          f"({len(jobs)} jobs, {a.jobs} at a time{', with autotune candidates' if a.candidates else ''})",
          flush=True)
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as cache_root, ThreadPoolExecutor(a.jobs) as pool:
        for job, result, err, secs in pool.map(lambda j: _spawn(j, a.arch, a.candidates,
                                                                cache_root), jobs):
            name = "_".join(job)
            if result is None:
                failed += 1
                print(f"  {name}: the job failed: {err}")
                continue
            recs = result["records"]
            launched = {r["case"] for r in recs}
            silent = [c for c in result["cases"] if c not in launched] or \
                ([] if result["cases"] else ["(no case ran)"])
            bad = [r for r in recs if not r["compiled"]]
            big = [r for r in recs if r["compiled"] and limit and r["shared_bytes"] > limit]
            unreported = [r for r in recs if r["compiled"] and r.get("registers") is None]
            failed += len(bad) + len(big) + len(silent) + len(unreported)
            regs = [r["registers"] for r in recs if r.get("registers") is not None]
            spills = [r for r in recs if (r.get("spill_store_bytes") or 0) > 0]
            smem = max((r.get("shared_bytes") or 0) for r in recs) if recs else 0
            print(f"  {name}: {len(recs)} launches, {len(bad)} failed to compile, max "
                  f"{max(regs) if regs else '?'} registers, {len(spills)} spill (max "
                  f"{max((r['spill_store_bytes'] for r in spills), default=0)} B), shared "
                  f"memory max {smem} B{f' (limit {limit})' if limit else ''}, {secs:.0f} s",
                  flush=True)
            for r in bad:
                print(f"    FAILED {r['case']} {r['kernel']} {r['blocks']}: {r['error']}")
            for c in silent:
                print(f"    NO KERNEL LAUNCHED for {c}")
            for r in unreported:
                print(f"    NO PTXAS REPORT for {r['case']} {r['kernel']} {r['blocks']}")
            for r in big:
                print(f"    OVER THE SHARED MEMORY LIMIT {r['case']} {r['kernel']} {r['blocks']}: "
                      f"{r['shared_bytes']} B")
            for r in recs:
                b = (r["blocks"] + [None] * 3)[:3]
                rows.append(dict(job=name, case=r["case"], kernel=r["kernel"],
                                 BLOCK_M_or_R=b[0], BLOCK_N_or_C=b[1], BLOCK_K_or_BLOCK=b[2],
                                 num_warps=r["num_warps"], num_stages=r["num_stages"],
                                 compiled=r["compiled"], registers=r.get("registers"),
                                 spill_store_bytes=r.get("spill_store_bytes"),
                                 shared_bytes=r.get("shared_bytes"), wgmma=r.get("wgmma"),
                                 mma_sync=r.get("mma_sync"), error=r.get("error", "")))
    if a.csv:
        os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {a.csv} ({len(rows)} rows)")
    print(f"{len(rows)} launches compiled for sm_{a.arch}: "
          + ("all compiled within the limits" if not failed else f"{failed} FAILED"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
