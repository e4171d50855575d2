"""The Triton convolution backward (triton_kernels/conv_backward.py): data and weight gradients
against PyTorch's, with BN-backward's apply computed on load (grad prologue) and with the
previous BN + activation recomputed on load (input prologue); and the backend's use of them.
On the CPU under Triton's interpreter (fp32, fp64), on a GPU as well (then also fp16/bf16)."""
import pytest
import torch
import torch.nn.functional as F

import resfuse
from conftest import assert_exactish, to_layout

pytestmark = pytest.mark.skipif(resfuse.backends()["triton"] != "ok",
                                reason=f"triton: {resfuse.backends()['triton']}")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-11, torch.float32: 1e-4}
# (N, C, H, W, Cout, k, stride, padding, dilation, groups)
SHAPES = {
    "3x3": (2, 6, 7, 6, 8, 3, 1, 1, 1, 1),
    "3x3-s2-grouped": (2, 8, 9, 8, 4, 3, 2, 1, 1, 2),
    "1x1-s2": (1, 4, 6, 6, 6, 1, 2, 0, 1, 1),
    "dilated-depthwise": (2, 4, 8, 7, 4, 3, 1, 2, 2, 4),
    "7x7-s2-stem": (1, 3, 11, 10, 8, 7, 2, 3, 1, 1),
    "wide-channels": (1, 40, 4, 4, 36, 3, 1, 1, 1, 1),
}


@pytest.fixture(autouse=True)
def _no_tf32(no_tf32):
    """Compare against exact fp32 convolutions (conftest.no_tf32)."""


def _kernels():
    from resfuse.triton_kernels import bn_act, conv, conv_backward
    return conv, bn_act, conv_backward


def _case(shape, dtype, layout):
    N, C, H, W, Co, k, s, p, d, g = shape
    x = to_layout(torch.randn(N, C, H, W, dtype=dtype, device=DEV), layout)
    w = torch.randn(Co, C // g, k, k, dtype=dtype, device=DEV)
    conv_args = ((s, s), (p, p), (d, d), g)
    y = F.conv2d(x, w, None, s, p, d, g)
    return x, w, y, conv_args


def _aten(gy, x, w, conv_args, mask=(True, True, False)):
    (s, p, d, g) = conv_args
    return torch.ops.aten.convolution_backward(gy, x, w, None, list(s), list(p), list(d), False,
                                               [0, 0], g, list(mask))


def _tol(ref, dtype):
    return TOL[dtype] * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_input_and_weight_grad_match_pytorch(shape, dtype, layout):
    _, _, bwd = _kernels()
    x, w, y, ca = _case(SHAPES[shape], dtype, layout)
    gy = to_layout(torch.randn(y.shape, dtype=dtype, device=DEV), layout)
    gx_r, gw_r, _ = _aten(gy, x, w, ca)
    gx = bwd.conv2d_input_grad(gy, w, x.shape, *ca)
    gw = bwd.conv2d_weight_grad(gy, x, w.shape, *ca)
    assert gx.dtype == dtype and gw.dtype == (torch.float64 if dtype == torch.float64
                                              else torch.float32)
    assert_exactish(gx, gx_r, _tol(gx_r, dtype), "g_x")
    assert_exactish(gw, gw_r, _tol(gw_r, dtype), "g_w")
    if layout == "channels_last":
        assert gx.is_contiguous(memory_format=torch.channels_last)


ACTS = ["identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh"]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["3x3-s2-grouped", "dilated-depthwise", "3x3"])
def test_weight_grad_recomputes_the_input_prologue(shape, dtype, act):
    """g_w of conv(act(x * scale + shift)) reading x: the padding is 0 after the activation
    (shift > 0 makes act(shift) != 0, so padding before it would show)."""
    conv, _, bwd = _kernels()
    from resfuse.activations import KINDS, Activation
    x, w, _, ca = _case(SHAPES[shape], dtype, "channels_last")
    C = x.shape[1]
    scale = torch.rand(C, dtype=dtype, device=DEV) + 0.5
    shift = torch.rand(C, dtype=dtype, device=DEV) + 0.2
    a_act = Activation(act, 0.1)
    a = a_act.forward((x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype))
    y = F.conv2d(a, w, None, *ca)
    gy = torch.randn_like(y)
    _, gw_r, _ = _aten(gy, a, w, ca, (False, True, False))
    gw = bwd.conv2d_weight_grad(gy, x, w.shape, *ca,
                                prologue=conv.Prologue(scale, shift, KINDS.index(act), 0.1))
    assert_exactish(gw, gw_r, _tol(gw_r, dtype), "g_w")


def _saved_for(bn, kind, z, scale, shift):
    """(saved, save code) as the forward keeps them for `kind`, and the reference's."""
    from resfuse.activations import KINDS
    if kind.startswith("recompute-"):
        code = KINDS.index(kind.split("-")[1])
        u = (z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(z.dtype)
        return code, (torch.stack([scale, shift]), bn.SAVE_RECOMPUTE), (u, bn.SAVE_INPUT)
    code = KINDS.index(kind)
    save = {"relu": bn.SAVE_MASK, "leaky_relu": bn.SAVE_MASK, "silu": bn.SAVE_INPUT,
            "identity": bn.SAVE_NONE, "relu6": bn.SAVE_MASK, "hardsigmoid": bn.SAVE_MASK,
            "hardswish": bn.SAVE_INPUT, "mish": bn.SAVE_INPUT}[kind]
    _, saved = bn.apply(z, scale, shift, None, code, 0.1, save)
    return code, (saved, save), (saved, save)


@pytest.mark.parametrize("rows", [3, 1], ids=["batch-stats", "scale-only"])
@pytest.mark.parametrize("kind", ["relu", "leaky_relu", "silu", "identity", "recompute-relu",
                                  "recompute-gelu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_prologue_is_bn_backward_apply(dtype, layout, kind, rows):
    """Data and weight gradients with g_z = A * g_u + B + D * (z - mean) computed on load
    equal PyTorch's backward of the g_z that bn_act.backward_apply writes."""
    _, bn, bwd = _kernels()
    x, w, z, ca = _case(SHAPES["3x3-s2-grouped"], dtype, layout)
    z = z.contiguous(memory_format=torch.channels_last if layout == "channels_last"
                     else torch.contiguous_format)
    Co = z.shape[1]
    scale = torch.rand(Co, dtype=dtype, device=DEV) + 0.5
    shift = torch.randn(Co, dtype=dtype, device=DEV)
    code, (saved, save), (ref_saved, ref_save) = _saved_for(bn, kind, z, scale, shift)
    gy = torch.randn_like(z)
    mean = z.mean((0, 2, 3))
    coef = torch.randn(rows, Co, dtype=dtype, device=DEV)
    gz = bn.backward_apply(gy, ref_saved, ref_save, z, mean, coef, code, 0.1)
    gx_r, gw_r, _ = _aten(gz, x, w, ca)
    gp = bwd.GradPrologue(saved, save, z, mean, coef, code, 0.1)
    gx = bwd.conv2d_input_grad(gy, w, x.shape, *ca, grad_prologue=gp)
    gw = bwd.conv2d_weight_grad(gy, x, w.shape, *ca, grad_prologue=gp)
    assert_exactish(gx, gx_r, _tol(gx_r, dtype), "g_x")
    assert_exactish(gw, gw_r, _tol(gw_r, dtype), "g_w")


NEW_KINDS = ["relu6", "hardswish", "hardsigmoid", "mish"]


@pytest.mark.parametrize("kind", NEW_KINDS + ["recompute-" + k for k in NEW_KINDS])
@pytest.mark.parametrize("dtype", DTYPES)
def test_more_activations_in_the_backward_prologues(dtype, kind):
    """The activations added for the mobile / timm models, in both backward prologues: the
    weight gradient recomputing act(bn(x)) on load, and BN-backward's apply from the mask,
    u, or u recomputed; values spread over the kinks (-3, 0, 3, 6)."""
    conv, bn, bwd = _kernels()
    from resfuse.activations import KINDS, Activation
    act = kind.split("-")[-1]
    x, w, z, ca = _case(SHAPES["3x3-s2-grouped"], dtype, "channels_last")
    if not kind.startswith("recompute-"):  # the input prologue (the pre-activation op)
        C = x.shape[1]
        scale = torch.rand(C, dtype=dtype, device=DEV) * 4 + 0.5
        shift = torch.randn(C, dtype=dtype, device=DEV) * 2
        a = Activation(act).forward((x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype))
        gy = torch.randn_like(F.conv2d(a, w, None, *ca))
        _, gw_r, _ = _aten(gy, a, w, ca, (False, True, False))
        gw = bwd.conv2d_weight_grad(gy, x, w.shape, *ca,
                                    prologue=conv.Prologue(scale, shift, KINDS.index(act), 0.0))
        assert_exactish(gw, gw_r, _tol(gw_r, dtype), "g_w")
    z = z.contiguous(memory_format=torch.channels_last)
    Co = z.shape[1]
    scale = torch.rand(Co, dtype=dtype, device=DEV) * 4 + 0.5
    shift = torch.randn(Co, dtype=dtype, device=DEV) * 2
    code, (saved, save), _ = _saved_for(bn, kind, z, scale, shift)
    u = (z * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype)
    gy = torch.randn_like(z)
    a_ = Activation(act)
    g_u = a_.backward(gy, a_.forward(u) if a_.saves == "output" else u)  # aten's backward
    mean = z.mean((0, 2, 3))
    coef = torch.randn(3, Co, dtype=dtype, device=DEV)
    gz_r = (coef[0].view(1, -1, 1, 1) * g_u + coef[1].view(1, -1, 1, 1)
            + coef[2].view(1, -1, 1, 1) * (z - mean.view(1, -1, 1, 1)))
    assert_exactish(bn.backward_apply(gy, saved, save, z, mean, coef, code, 0.0), gz_r,
                    _tol(gz_r, dtype), "g_z")
    gx_r, gw_r, _ = _aten(gz_r, x, w, ca)
    gp = bwd.GradPrologue(saved, save, z, mean, coef, code, 0.0)
    gx = bwd.conv2d_input_grad(gy, w, x.shape, *ca, grad_prologue=gp)
    gw = bwd.conv2d_weight_grad(gy, x, w.shape, *ca, grad_prologue=gp)
    assert_exactish(gx, gx_r, _tol(gx_r, dtype), "g_x")
    assert_exactish(gw, gw_r, _tol(gw_r, dtype), "g_w")


def test_weight_grad_split_reduction_is_deterministic():
    _, _, bwd = _kernels()
    x, w, y, ca = _case((4, 8, 16, 16, 8, 3, 1, 1, 1, 1), torch.float32, "channels_last")
    from resfuse.triton_kernels.tiles import gemm_tiles
    t = gemm_tiles(8, 8 * 9, 4 * 16 * 16, torch.float32, x.is_cuda)
    programs = -(-8 // t.rows) * -(-72 // t.cols)
    assert bwd._splits(4 * 16 * 16, programs, t.red)[0] > 1  # split: partials summed in order
    gy = torch.randn_like(y)
    a = bwd.conv2d_weight_grad(gy, x, w.shape, *ca)
    b = bwd.conv2d_weight_grad(gy, x, w.shape, *ca)
    assert torch.equal(a, b)
    _, gw_r, _ = _aten(gy, x, w, ca, (False, True, False))
    assert_exactish(a, gw_r, _tol(gw_r, torch.float32), "g_w")


# ------------------------------------------------------------------------------ the backend

def _spy(monkeypatch, module, name, calls):
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, spy)


def test_backend_fuses_bn_backward_into_the_conv_backward(monkeypatch):
    """conv_bn_act's backward on the triton backend: both conv gradients take BN-backward's
    apply as their prologue (no g_z pass)."""
    _, bn, bwd = _kernels()
    calls, applies = [], []
    _spy(monkeypatch, bwd, "conv2d_input_grad", calls)
    _spy(monkeypatch, bwd, "conv2d_weight_grad", calls)
    _spy(monkeypatch, bn, "backward_apply", applies)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device=DEV, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=DEV, requires_grad=True)
    y = resfuse.functional.conv_bn_act(x, w, padding=1, training=True, backend="triton")
    y.sum().backward()
    assert len(calls) == 2 and all(c.get("grad_prologue") is not None for c in calls)
    assert not applies


def test_backend_preact_backward_writes_no_activation(monkeypatch):
    """The pre-activation op on the triton backend writes act(bn(x)) in neither pass: the
    weight gradient recomputes it on load, BN's backward recomputes u from x."""
    from resfuse.backend.triton import TritonBackend
    _, _, bwd = _kernels()
    calls, applies = [], []
    _spy(monkeypatch, bwd, "conv2d_weight_grad", calls)
    real = TritonBackend.scale_shift_add_act
    monkeypatch.setattr(TritonBackend, "scale_shift_add_act",
                        lambda self, *a, **k: applies.append(1) or real(self, *a, **k))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device=DEV, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=DEV, requires_grad=True)
    args = dict(bn_weight=None, bn_bias=None, running_mean=None, running_var=None)
    y = resfuse.functional.bn_act_conv(x, **args, weight=w, padding=1, training=True,
                                       backend="triton")
    g = torch.randn_like(y)
    y.backward(g)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = resfuse.reference.bn_act_conv(xr, **args, weight=wr, padding=1, training=True)
    yr.backward(g)
    assert len(calls) == 1 and calls[0].get("prologue") is not None
    assert not applies
    assert_exactish(x.grad, xr.grad, 1e-10, "g_x")
    assert_exactish(w.grad, wr.grad, 1e-10, "g_w")
