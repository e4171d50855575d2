"""The `cuda` backend (resfuse._C, csrc/) against the eager reference, on a GPU.

Skipped where resfuse._C does not load or no GPU is visible (CI, the CPU development machine);
`bench/gpu_check.sh` runs it on a lent GPU. Covers: every op in every dtype (fp32 with TF32 off so
BN math is compared tightly, fp16, bf16, fp64) and layout (NCHW, channels_last, odd strides),
every activation and BN mode, ResNet layer shapes, float64 gradcheck, determinism, the 1-bit
mask at odd sizes and unaligned storage, tensors past 2**31 elements, the kernels' own argument
checks, opcheck of the extension's ops, and a converted ResNet-50 training step against eager.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import resfuse
import resfuse.functional as RF
from conftest import FLOOR, assert_honest
from harness import OpCase, check, check_converted_resnet50_step
from test_functional import ACTIVATIONS, MORE_ACTIVATIONS

pytestmark = pytest.mark.skipif(resfuse.backends()["cuda"] != "ok",
                                reason=f"cuda backend: {resfuse.backends()['cuda']}")
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["nchw", "channels_last", "strided"]


@pytest.fixture(autouse=True)
def _no_tf32(no_tf32):
    """Compare against exact fp32 convolutions (conftest.no_tf32)."""


ACTS = {**ACTIVATIONS, **MORE_ACTIVATIONS}  # the CPU grids' activations (tests/test_functional.py)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("form", ["post", "bn_act", "pre"])
def test_activation_grid(form, act, dtype, layout):
    # 16 channels x 5x7: NHWC vectorises (C % 8 == 0), NCHW takes the scalar path (HW odd).
    check(OpCase(form=form, n=3, c_in=16, c_out=16, hw=(5, 7), **ACTS[act]), "cuda", dtype, layout, DEV)


BN_MODES = {
    "train": dict(),
    "train-momentum-none": dict(momentum=None),
    "train-momentum-0.3-eps-1e-3": dict(momentum=0.3, eps=1e-3),
    "train-momentum-negative": dict(momentum=-0.1),  # taken as given, as nn.BatchNorm2d does
    "train-no-affine": dict(affine=False),
    "train-no-running-stats": dict(track=False),
    "train-no-residual": dict(residual=False),
    "eval": dict(training=False),
    "eval-no-affine": dict(training=False, affine=False),
    "eval-no-running-stats": dict(training=False, track=False),
    "train-bias-grouped": dict(bias=True, c_in=16, c_out=16, groups=4),
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", BN_MODES)
def test_bn_modes(mode, dtype, layout):
    check(bn_case(mode), "cuda", dtype, layout, DEV)


def bn_case(mode: str) -> OpCase:
    kw = dict(n=4, c_in=8, c_out=24, hw=(8, 8))
    kw.update(BN_MODES[mode])
    return OpCase(**kw)


# ResNet-18/50 layer shapes (batch reduced): (c_in, c_out, hw, kernel, stride, groups)
RESNET_LAYERS = {
    "r50-conv1-1x1": (256, 64, (56, 56), (1, 1), 1, 1),
    "r50-conv2-3x3": (64, 64, (56, 56), (3, 3), 1, 1),
    "r50-conv3-1x1": (64, 256, (56, 56), (1, 1), 1, 1),
    "r50-down-3x3-s2": (128, 128, (56, 56), (3, 3), 2, 1),
    "r50-l4-1x1": (512, 2048, (7, 7), (1, 1), 1, 1),
    "r18-l3-3x3": (256, 256, (14, 14), (3, 3), 1, 1),
    "resnext-grouped-3x3": (256, 256, (14, 14), (3, 3), 1, 32),
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", RESNET_LAYERS)
def test_resnet_layers(layer, dtype, layout):
    c_in, c_out, hw, k, s, g = RESNET_LAYERS[layer]
    check(OpCase(n=4, c_in=c_in, c_out=c_out, hw=hw, kernel=k, stride=s, groups=g,
                 padding=k[0] // 2), "cuda", dtype, layout, DEV)


# ------------------------------------------------------------------ gradcheck (float64)

D = torch.float64


def _bn(c, affine=True, track=True):
    w = (torch.rand(c, dtype=D, device=DEV) + 0.5).requires_grad_() if affine else None
    b = (torch.randn(c, dtype=D, device=DEV) * 0.2).requires_grad_() if affine else None
    rm = torch.randn(c, dtype=D, device=DEV) * 0.2 if track else None
    rv = torch.rand(c, dtype=D, device=DEV) + 0.5 if track else None
    return w, b, rm, rv


def _fresh(t):
    return None if t is None else t.clone()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", list(ACTS))
def test_gradcheck_conv_bn_act(act, training, layout):
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 3, 5, 5, dtype=D, device=DEV).to(memory_format=mf).requires_grad_()
    w = torch.randn(4, 3, 3, 3, dtype=D, device=DEV, requires_grad=True)
    b = torch.randn(4, dtype=D, device=DEV, requires_grad=True)
    bw, bb, rm, rv = _bn(4)
    r = torch.randn(2, 4, 3, 3, dtype=D, device=DEV).to(memory_format=mf).requires_grad_()

    def f(x, w, b, bw, bb, r):
        return RF.conv_bn_act(x, w, b, bw, bb, _fresh(rm), _fresh(rv), training=training,
                              activation=ACTS[act]["activation"], residual=r, stride=1, padding=0,
                              backend="cuda")
    # cuDNN's float64 convolution backward is not bitwise reentrant (its default algorithms
    # reduce with atomics): deterministic algorithms, and a tolerance far below the check's.
    old = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        assert gradcheck(f, (x, w, b, bw, bb, r), eps=1e-6, atol=1e-6, nondet_tol=1e-12)
    finally:
        torch.backends.cudnn.deterministic = old


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu", "gelu", "identity", "relu6",
                                 "hardswish", "hardsigmoid", "mish"])
def test_gradcheck_bn_act_and_pre(act, training):
    x = torch.randn(3, 4, 3, 3, dtype=D, device=DEV, requires_grad=True)
    bw, bb, rm, rv = _bn(4)
    r = torch.randn(3, 4, 3, 3, dtype=D, device=DEV, requires_grad=True)

    def f(x, bw, bb, r):
        return RF.bn_act(x, bw, bb, _fresh(rm), _fresh(rv), training=training, activation=act,
                         residual=r, backend="cuda")
    assert gradcheck(f, (x, bw, bb, r), eps=1e-6, atol=1e-6)
    w = torch.randn(3, 4, 3, 3, dtype=D, device=DEV, requires_grad=True)
    r2 = torch.randn(3, 3, 1, 1, dtype=D, device=DEV, requires_grad=True)

    def g(x, bw, bb, w, r):
        return RF.bn_act_conv(x, bw, bb, _fresh(rm), _fresh(rv), w, None, training=training,
                              activation=act, residual=r, backend="cuda")
    assert gradcheck(g, (x, bw, bb, w, r2), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------ determinism, masks, sizes

def _train_step(x, w, bw, bb, rm, rv, r, grad, dtype):
    x, r = x.detach().requires_grad_(), r.detach().requires_grad_()
    w, bw, bb = (t.detach().requires_grad_() for t in (w, bw, bb))
    rm, rv = rm.clone(), rv.clone()
    y = RF.conv_bn_act(x, w, None, bw, bb, rm, rv, training=True, residual=r, padding=1,
                       backend="cuda")
    y.backward(grad)
    return [y, x.grad, w.grad, bw.grad, bb.grad, r.grad, rm, rv]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(dtype, layout):
    """Two runs on the same input give the same bits (statistics reduced in a fixed order)."""
    torch.backends.cudnn.deterministic = True
    try:
        mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(32, 64, 28, 28, device=DEV, dtype=dtype).to(memory_format=mf)
        w = torch.randn(64, 64, 3, 3, device=DEV, dtype=dtype) * 0.05
        bw, bb = torch.rand(64, device=DEV, dtype=dtype) + 0.5, torch.randn(64, device=DEV, dtype=dtype)
        rm, rv = torch.zeros(64, device=DEV, dtype=dtype), torch.ones(64, device=DEV, dtype=dtype)
        r = torch.randn_like(x)
        g = torch.randn_like(x)
        a = _train_step(x, w, bw, bb, rm, rv, r, g, dtype)
        b = _train_step(x, w, bw, bb, rm, rv, r, g, dtype)
        for i, (u, v) in enumerate(zip(a, b)):
            assert torch.equal(u, v), f"output {i} differs between two runs"
    finally:
        torch.backends.cudnn.deterministic = False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 5, 3, 7), (3, 40, 9, 11), (1, 8, 1, 33)])
def test_odd_sizes_and_unaligned(shape, dtype):
    """numel not a multiple of 32 (the mask's last word), scalar paths, and tensors whose
    storage starts off a 16-byte boundary."""
    for offset in (0, 1):
        n = torch.Size(shape).numel()
        base = torch.randn(n + offset, device=DEV, dtype=dtype)
        x = base[offset:].view(shape).requires_grad_()
        if shape[0] * shape[2] * shape[3] == 1:
            continue  # one value per channel: refused in training, as nn.BatchNorm2d does
        r = torch.randn(shape, device=DEV, dtype=dtype, requires_grad=True)
        bw = torch.rand(shape[1], device=DEV, dtype=dtype, requires_grad=True)
        y = RF.bn_act(x, bw, None, None, None, training=True, residual=r, backend="cuda")
        g = torch.randn_like(y)
        y.backward(g)
        x2, r2, bw2 = (t.detach().clone().requires_grad_() for t in (x, r, bw))
        y2 = torch.relu(F.batch_norm(x2, None, None, bw2, None, True) + r2)
        y2.backward(g)
        for got, want, what in ((y, y2, "y"), (x.grad, x2.grad, "x"), (r.grad, r2.grad, "r"),
                                (bw.grad, bw2.grad, "bn_weight")):
            tol = FLOOR[dtype] * 50 * max(1.0, want.abs().max().item())
            err = (got.double() - want.double()).abs().max().item()
            assert err <= tol, f"{what} offset={offset}: {err:.3e} > {tol:.3e}"


def test_past_2_31_elements():
    """64-bit indexing: a bf16 tensor of more than 2**31 elements, forward and backward."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs about 40 GiB of free GPU memory")
    shape = (2, 16, 8192, 8200)  # 2,149,580,800 elements > 2**31
    assert torch.Size(shape).numel() > 2**31
    x = torch.randn(shape, device=DEV, dtype=torch.bfloat16)
    bw = torch.rand(16, device=DEV, requires_grad=True)
    y = RF.bn_act(x.requires_grad_(), bw, None, None, None, training=True, backend="cuda")
    # Compare the statistics and the last elements (those past 2**31) with torch's BN.
    mean = x.float().mean(dim=(0, 2, 3))
    var = x.float().var(dim=(0, 2, 3), unbiased=False)
    want_tail = torch.relu((x[1, :, -1, -50:].float() - mean[:, None]) * torch.rsqrt(var[:, None] + 1e-5)
                           * bw.detach()[:, None])
    assert (y[1, :, -1, -50:].float() - want_tail).abs().max().item() < 5e-2
    g = torch.ones_like(y)
    y.backward(g)
    assert torch.isfinite(x.grad[1, :, -1, -50:].float()).all()
    assert torch.isfinite(bw.grad).all()
    del x, y, g


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_and_inf_propagate(bad):
    """A NaN or inf in a channel makes that channel's statistics, output and running variance
    NaN, as in eager (not clamped to a finite variance)."""
    x = torch.randn(2, 8, 4, 4, device=DEV)
    x[0, 3, 1, 1] = bad
    rm, rv = torch.zeros(8, device=DEV), torch.ones(8, device=DEV)
    rm2, rv2 = rm.clone(), rv.clone()
    y = RF.bn_act(x, None, None, rm, rv, training=True, backend="cuda")
    want = torch.relu(F.batch_norm(x, rm2, rv2, training=True))
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.equal(torch.isnan(rv), torch.isnan(rv2)) and torch.equal(torch.isnan(rm), torch.isnan(rm2))


def test_eval_stats_backward_with_inf():
    """Running statistics: g_z = g_u * scale even where z is inf (no 0 * inf)."""
    x = torch.randn(2, 8, 4, 4, device=DEV)
    x[1, 2, 0, 0] = float("inf")
    rm, rv = torch.zeros(8, device=DEV), torch.ones(8, device=DEV)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(x)
    RF.bn_act(x1, None, None, rm, rv, training=False, activation="identity", backend="cuda").backward(g)
    F.batch_norm(x2, rm, rv, training=False).backward(g)
    assert torch.equal(torch.isnan(x1.grad), torch.isnan(x2.grad))
    torch.testing.assert_close(x1.grad, x2.grad)


# ------------------------------------------------------------------ the kernels' own checks

_BAD_CALLS = r"""
import sys, torch
import resfuse
assert resfuse.backends()["cuda"] == "ok"
z = torch.randn(2, 8, 4, 4, device="cuda")
ops = torch.ops.resfuse
rm = torch.zeros(8, device="cuda")
cases = [
    ("residual must have shape", lambda: ops.cuda_bn_apply(z, None, None, torch.randn(2, 8, 4, 5, device="cuda"), 1, 0.0, 0)),
    ("scale must have shape", lambda: ops.cuda_bn_apply(z, torch.ones(7, device="cuda"), torch.ones(7, device="cuda"), None, 1, 0.0, 0)),
    ("float32, float64, float16 or bfloat16", lambda: ops.cuda_bn_apply(z.to(torch.int32), None, None, None, 1, 0.0, 0)),
    ("activation code must be 0..9", lambda: ops.cuda_bn_apply(z, None, None, None, 10, 0.0, 0)),
    ("more than 1 value per channel", lambda: ops.cuda_bn_stats(torch.randn(1, 8, 1, 1, device="cuda"), None, None, None, None, None, 0.1, 1e-5)),
    ("running_mean and running_var", lambda: ops.cuda_bn_stats(z, None, None, rm, None, None, 0.1, 1e-5)),
    ("saved mask must hold", lambda: ops.cuda_bn_backward_apply(z, torch.zeros(3, dtype=torch.int32, device="cuda"), 1, z, rm, torch.zeros(3, 8, device="cuda"), 1, 0.0)),
]
for expected, call in cases:
    try:
        call()
    except RuntimeError as e:
        assert expected in str(e), (expected, str(e))
    else:
        raise AssertionError(f"no error for: {expected}")
assert torch.equal(rm, torch.zeros(8, device="cuda")), "running_mean was written"
print("ok")
"""


def test_binding_rejects_bad_arguments():
    """The binding's CHECK_* messages, in a child process (a crash on an error path, e.g. a
    libstdc++ ABI mismatch, fails this test rather than ending the whole run)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _BAD_CALLS], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-3000:])


def test_opcheck_extension_ops():
    z = torch.randn(2, 8, 4, 4, device=DEV)
    rm, rv, nbt = torch.zeros(8, device=DEV), torch.ones(8, device=DEV), torch.tensor(0, device=DEV)
    torch.library.opcheck(torch.ops.resfuse.cuda_bn_stats.default, (z, None, None, rm, rv, nbt, None, 1e-5))
    mean, invstd, scale, shift = torch.ops.resfuse.cuda_bn_stats(z, None, None, None, None, None, 0.1, 1e-5)
    r = torch.randn_like(z)
    torch.library.opcheck(torch.ops.resfuse.cuda_bn_apply.default, (z, scale, shift, r, 1, 0.0, 1))
    y, mask = torch.ops.resfuse.cuda_bn_apply(z, scale, shift, r, 1, 0.0, 1)
    g = torch.randn_like(z)
    torch.library.opcheck(torch.ops.resfuse.cuda_bn_backward_reduce.default,
                          (g, mask, 1, z, mean, invstd, None, True, 1, 0.0, True))
    _, _, _, coef = torch.ops.resfuse.cuda_bn_backward_reduce(g, mask, 1, z, mean, invstd, None, True, 1, 0.0, False)
    torch.library.opcheck(torch.ops.resfuse.cuda_bn_backward_apply.default, (g, mask, 1, z, mean, coef, 1, 0.0))


def test_auto_picks_cuda_on_gpu():
    from resfuse import backend as dispatch
    case = dispatch.Case("conv_bn_act", "cuda", torch.bfloat16, True)
    assert dispatch.select(case).name == "cuda"
    assert dispatch.select(dispatch.Case("conv_bn_act", "cpu", torch.float32, False)).name == "eager"


# ------------------------------------------------------------------ a converted ResNet-50

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_converted_resnet50_training_step(dtype):
    check_converted_resnet50_step("cuda", dtype, DEV)


# ------------------------------------------------------------------ eval inference (folded BN)

@pytest.mark.parametrize("cudnn_fused", [True, False], ids=["cudnn-fused", "conv+apply"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("act", ["relu", "silu", "identity"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eval_inference(dtype, layout, act, residual, cudnn_fused):
    """No-grad eval: BN folded into the conv, then cuDNN's fused conv + bias + add + ReLU
    (fp16/bf16 relu, when enabled) or the conv followed by one add + activation pass."""
    from resfuse.backend import cuda as cuda_backend
    case = OpCase(n=4, c_in=32, c_out=64, hw=(14, 14), training=False, residual=residual,
                  activation=act)
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format

    def run(dt, device, backend):
        cast = lambda t: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
        x = cast(case.x).to(memory_format=mf)
        r = cast(case.res)
        r = None if r is None else r.to(memory_format=mf)
        with torch.no_grad():
            if backend is None:
                from resfuse import reference
                return reference.conv_bn_act(x, cast(case.weight), None, cast(case.bn_weight), cast(case.bn_bias),
                                             cast(case.rm), cast(case.rv), training=False, residual=r,
                                             activation=act, padding=1)
            return RF.conv_bn_act(x, cast(case.weight), None, cast(case.bn_weight), cast(case.bn_bias),
                                  cast(case.rm), cast(case.rv), training=False, residual=r, activation=act,
                                  padding=1, backend=backend)
    old = cuda_backend.set_cudnn_fused_eval(cudnn_fused)
    try:
        y = run(dtype, DEV, "cuda").cpu()
    finally:
        cuda_backend.set_cudnn_fused_eval(old)
    y64 = run(torch.float64, "cpu", None)
    if dtype == torch.float64:
        assert (y - y64).abs().max().item() < 1e-10
    else:
        assert_honest(y, run(dtype, DEV, None).cpu(), y64, "eval output")
