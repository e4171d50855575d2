"""Every distinct convolution of ResNet-18/50/101 and ResNeXt-50 through the Triton kernels a
training step runs on it: the forward with the previous BN + ReLU as its prologue and BN's
statistics as its epilogue, the data gradient with BN-backward's apply as its prologue, and
the weight gradient recomputing the previous BN + ReLU as it loads.

On the CPU (Triton's interpreter) in fp32 at batch 1 with the spatial size cut to 8x8, every
channel count, kernel, stride and group count as in the models; on a GPU at the models' own
spatial size, batch 2, in fp32, fp16 and bf16 (STYLE.md's rule: at most twice eager's error
from a float64 reference, plus a floor)."""
import pytest
import torch
import torch.nn.functional as F

import resfuse
from conftest import assert_exactish, assert_honest
from resnet_shapes import layer_shapes

pytestmark = pytest.mark.skipif(resfuse.backends()["triton"] != "ok",
                                reason=f"triton: {resfuse.backends()['triton']}")

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if GPU else [torch.float32]
SHAPES = layer_shapes()
RELU = 1  # triton_kernels.conv.ACT_RELU


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def _inputs(shape, dtype):
    """x (channels_last), weight, BN scale/shift of x's channels and of the output's."""
    h, w = shape.hw if GPU else (min(shape.hw[0], 8), min(shape.hw[1], 8))
    n = 2 if GPU else 1
    x = torch.randn(n, shape.c_in, h, w, device=DEV).to(memory_format=torch.channels_last)
    fan_in = shape.c_in // shape.groups * shape.kernel ** 2
    wt = torch.randn(shape.c_out, shape.c_in // shape.groups, shape.kernel, shape.kernel,
                     device=DEV) / fan_in ** 0.5
    scale = torch.rand(shape.c_in, device=DEV) + 0.5
    shift = torch.randn(shape.c_in, device=DEV) * 0.5
    return x.to(dtype), wt.to(dtype), scale, shift


def _conv_args(shape):
    s, p = (shape.stride,) * 2, (shape.padding,) * 2
    return s, p, (1, 1), shape.groups


def _reference(x, wt, scale, shift, gy, shape, dtype):
    """(y, g_x, g_w) of conv(relu(bn(x))) with gradient gy, PyTorch in `dtype` on DEV."""
    x, wt, gy = x.to(dtype), wt.to(dtype), gy.to(dtype)
    a = torch.relu((x.to(scale.dtype) * scale.view(1, -1, 1, 1)
                    + shift.view(1, -1, 1, 1)).to(dtype))
    s, p, d, g = _conv_args(shape)
    y = F.conv2d(a, wt, None, s, p, d, g)
    ga, gw, _ = torch.ops.aten.convolution_backward(gy, a, wt, None, list(s), list(p), list(d),
                                                    False, [0, 0], g, [True, True, False])
    return y, ga, gw


def _compare(out, ref_lp, ref_64, dtype, what):
    if dtype == torch.float32 and not GPU:
        assert_exactish(out, ref_lp, 2e-4 * max(1.0, ref_lp.abs().max().item()), what)
    else:
        assert_honest(out.cpu(), ref_lp.cpu(), ref_64.cpu(), what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer", SHAPES)
def test_layer_through_the_triton_kernels(layer, dtype):
    from resfuse.triton_kernels import conv, conv_backward as bwd
    shape = SHAPES[layer]
    x, wt, scale, shift = _inputs(shape, dtype)
    ca = _conv_args(shape)
    y, parts = conv.conv2d(x, wt, None, *ca, prologue=conv.Prologue(scale, shift, RELU, 0.0),
                           stats=True)
    mean, var = conv.merge_stats(parts)
    gy = torch.randn(y.shape, device=DEV).to(dtype).contiguous(memory_format=torch.channels_last)
    # The data gradient of the conv's input a = relu(bn(x)) (no BN after this conv here: the
    # grad prologue is the identity apply g_z = 1 * g, no mask).
    ones = torch.ones(1, shape.c_out, device=DEV)
    gp = bwd.GradPrologue(None, 0, y, mean, ones, 0, 0.0)
    ga = bwd.conv2d_input_grad(gy, wt, x.shape, *ca, grad_prologue=gp)
    gw = bwd.conv2d_weight_grad(gy, x, wt.shape, *ca,
                                prologue=conv.Prologue(scale, shift, RELU, 0.0))
    y_lp, ga_lp, gw_lp = _reference(x, wt, scale, shift, gy, shape, dtype)
    y64, ga64, gw64 = _reference(x.double(), wt.double(), scale.double(), shift.double(),
                                 gy.double(), shape, torch.float64)
    _compare(y, y_lp, y64, dtype, "y")
    _compare(ga, ga_lp, ga64, dtype, "g_a")
    _compare(gw.to(dtype), gw_lp, gw64, dtype, "g_w")
    v64, m64 = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
    vl, ml = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)  # of z as stored
    assert_exactish(mean.double(), ml, 1e-5 * max(1.0, m64.abs().max().item()), "mean")
    assert_exactish(var.double(), vl, 1e-5 * max(1.0, v64.abs().max().item()), "var")
