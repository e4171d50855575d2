"""Every distinct convolution of ResNet-18/50/101 and ResNeXt-50 through the Triton kernels a
training step runs on it: the forward with the previous BN + ReLU as its prologue and BN's
statistics as its epilogue, the data gradient with BN-backward's apply (grad_y and the next
BN's ReLU mask) as its prologue, and the weight gradient with the same prologue that also
recomputes the previous BN + ReLU as it loads x.

On the CPU (Triton's interpreter, tiles up to 256 wide) in fp32 at batch 1 with the spatial
size cut to 8x8, every channel count, kernel, stride and group count as in the models; on a GPU at the models' own
spatial size, batch 2, in fp32, fp16 and bf16 (the tolerance rule of docs/design.md: at most twice eager's error
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
def _no_tf32(no_tf32, wide_interpreter_tiles):
    """Compare against exact fp32 convolutions (conftest.no_tf32); on the CPU with the
    interpreter's wide tiles (conftest.wide_interpreter_tiles)."""


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


def _mask_bits(mask, z):
    """The packed 1-bit mask as a 0/1 tensor of z's shape (bit j of word w: element 32w + j of
    z in memory order)."""
    bits = ((mask.view(-1, 1) >> torch.arange(32, device=mask.device)) & 1).view(-1)
    bits = bits[:z.numel()].to(torch.float64)
    n, c, h, w = z.shape
    if z.is_contiguous():
        return bits.view(n, c, h, w)
    return bits.view(n, h, w, c).permute(0, 3, 1, 2)


def _reference(x, wt, scale, shift, gz, shape, dtype):
    """(y, g_a, g_w) of y = conv(a), a = relu(bn(x)), for the output gradient gz: PyTorch in
    `dtype` on DEV."""
    x, wt, gz = x.to(dtype), wt.to(dtype), gz.to(dtype)
    a = torch.relu((x.to(scale.dtype) * scale.view(1, -1, 1, 1)
                    + shift.view(1, -1, 1, 1)).to(dtype))
    s, p, d, g = _conv_args(shape)
    y = F.conv2d(a, wt, None, s, p, d, g)
    ga, gw, _ = torch.ops.aten.convolution_backward(gz, a, wt, None, list(s), list(p), list(d),
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
    """conv(relu(bn1(x))) with its output's statistics; then, as the backward of
    relu(bn2(conv(...))) runs it, the data and weight gradients with BN-backward's apply
    (from grad_y and bn2's 1-bit ReLU mask) computed on load, the weight gradient also
    recomputing relu(bn1(x)) as it loads x."""
    from resfuse.triton_kernels import bn_act as bn, conv, conv_backward as bwd
    shape = SHAPES[layer]
    x, wt, scale, shift = _inputs(shape, dtype)
    ca = _conv_args(shape)
    pro = conv.Prologue(scale, shift, RELU, 0.0)
    y, parts = conv.conv2d(x, wt, None, *ca, prologue=pro, stats=True)
    mean, var = conv.merge_stats(parts)
    # bn2 + relu after this conv: its mask, and BN-backward's apply coefficients.
    c = shape.c_out
    scale2 = (torch.rand(c, device=DEV) + 0.5) * torch.rsqrt(var + 1e-5)
    _, mask = bn.apply(y, scale2, -mean * scale2, None, RELU, 0.0, bn.SAVE_MASK)
    coef = torch.stack([scale2, torch.randn(c, device=DEV) * 0.1,
                        torch.randn(c, device=DEV) * 0.1 * scale2 ** 2])
    gy = torch.randn(y.shape, device=DEV).to(dtype).contiguous(memory_format=torch.channels_last)
    gp = bwd.GradPrologue(mask, bn.SAVE_MASK, y, mean, coef, RELU, 0.0)
    ga = bwd.conv2d_input_grad(gy, wt, x.shape, *ca, grad_prologue=gp)
    gw = bwd.conv2d_weight_grad(gy, x, wt.shape, *ca, grad_prologue=gp, prologue=pro)
    # References: g_z written by the (separately tested) apply kernel in `dtype`, and in
    # float64 from the same mask and z; then PyTorch's convolution backward.
    gz_lp = bn.backward_apply(gy, mask, bn.SAVE_MASK, y, mean, coef, RELU, 0.0)
    cf = [t.double().view(1, -1, 1, 1) for t in (*coef, mean)]
    gz64 = cf[0] * gy.double() * _mask_bits(mask, y) + cf[1] + cf[2] * (y.double() - cf[3])
    y_lp, ga_lp, gw_lp = _reference(x, wt, scale, shift, gz_lp, shape, dtype)
    y64, ga64, gw64 = _reference(x.double(), wt.double(), scale.double(), shift.double(), gz64,
                                 shape, torch.float64)
    _compare(y, y_lp, y64, dtype, "y")
    _compare(ga, ga_lp, ga64, dtype, "g_a")
    _compare(gw.to(dtype), gw_lp, gw64, dtype, "g_w")
    v64, m64 = torch.var_mean(y64, dim=(0, 2, 3), correction=0)
    vl, ml = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)  # of z as stored
    assert_exactish(mean.double(), ml, 1e-5 * max(1.0, m64.abs().max().item()), "mean")
    assert_exactish(var.double(), vl, 1e-5 * max(1.0, v64.abs().max().item()), "var")
