"""The Triton implicit-GEMM convolution (triton_kernels/conv.py) against torch's, with its
prologue (BN + activation on load), epilogues (bias; statistics; residual + activation),
NCHW and channels_last, groups, stride, padding, dilation. On the CPU the kernels run under
TRITON_INTERPRET=1 (fp32 and fp64, small shapes); skipped where triton is not installed."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # (TRITON_INTERPRET=1 without a GPU: tests/conftest.py)

from resfuse.triton_kernels import conv as TC  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _no_tf32(no_tf32):
    """Compare against exact fp32 convolutions (conftest.no_tf32)."""


# (N, Cin, Cout, H, W, k, stride, pad, dil, groups)
SHAPES = [
    (2, 8, 16, 7, 7, 3, 1, 1, 1, 1),
    (2, 8, 16, 7, 7, 3, 2, 1, 1, 1),
    (1, 6, 12, 8, 8, 1, 1, 0, 1, 1),
    (2, 3, 16, 11, 11, 7, 2, 3, 1, 1),   # a stem
    (2, 8, 8, 9, 9, 3, 1, 2, 2, 4),      # grouped, dilated
    (2, 36, 70, 5, 5, 3, 1, 1, 1, 1),    # channels past one K and one N block
    (1, 4, 4, 6, 5, 3, 2, 0, 1, 2),      # no padding, odd sizes
    (2, 8, 8, 4, 4, 1, 2, 0, 1, 1),      # strided 1x1 (a downsample)
]
ACTS = {"relu": (TC.ACT_RELU, torch.relu), "silu": (TC.ACT_SILU, F.silu),
        "gelu_tanh": (TC.ACT_GELU_TANH, lambda u: F.gelu(u, approximate="tanh"))}


def _inputs(shape, dtype, channels_last, seed=0):
    N, cin, cout, H, W, k, s, p, d, g = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, cin, H, W, generator=gen, dtype=dtype)
    w = torch.randn(cout, cin // g, k, k, generator=gen, dtype=dtype) * (cin // g * k * k) ** -0.5
    b = torch.randn(cout, generator=gen, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)


def _tol(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-5


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_plain_conv(shape, dtype, channels_last, bias):
    x, w, b = _inputs(shape, dtype, channels_last)
    b = b if bias else None
    _, _, _, _, _, _, s, p, d, g = shape
    y, st = TC.conv2d(x, w, b, (s, s), (p, p), (d, d), g)
    ref = F.conv2d(x, w, b, s, p, d, g)
    assert st is None and y.shape == ref.shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last or ref.shape[2:] == (1, 1)
    assert ((y - ref).abs().max() / ref.abs().max()).item() < _tol(dtype)


@pytest.mark.parametrize("shape", SHAPES[:6], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("act", list(ACTS))
def test_prologue_bn_act_on_load(shape, dtype, act):
    """conv(act(x * scale + shift)): padding is applied to the activation (zeros), not to x."""
    x, w, b = _inputs(shape, dtype, True, seed=1)
    _, cin, _, _, _, _, s, p, d, g = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(cin, dtype=acc) + 0.5).to(DEVICE)
    shift = (torch.randn(cin, dtype=acc) * 0.5).to(DEVICE)
    code, fn = ACTS[act]
    a = fn(x.to(acc) * scale[None, :, None, None] + shift[None, :, None, None]).to(dtype)
    ref = F.conv2d(a, w, b, s, p, d, g)
    y, _ = TC.conv2d(x, w, b, (s, s), (p, p), (d, d), g, prologue=TC.Prologue(scale, shift, code))
    assert ((y - ref).abs().max() / ref.abs().max()).item() < _tol(dtype) * 10


@pytest.mark.parametrize("shape", SHAPES[:6], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "gelu"])
def test_epilogue_residual_act(shape, dtype, act):
    x, w, b = _inputs(shape, dtype, True, seed=2)
    _, _, _, _, _, _, s, p, d, g = shape
    z = F.conv2d(x, w, b, s, p, d, g)
    r = torch.randn(z.shape, dtype=dtype).to(DEVICE)
    code = {"identity": TC.ACT_IDENTITY, "relu": TC.ACT_RELU, "leaky_relu": TC.ACT_LEAKY_RELU,
            "gelu": TC.ACT_GELU}[act]
    fn = {"identity": lambda u: u, "relu": torch.relu,
          "leaky_relu": lambda u: F.leaky_relu(u, 0.2), "gelu": F.gelu}[act]
    ref = fn(z + r)
    y, _ = TC.conv2d(x, w, b, (s, s), (p, p), (d, d), g, residual=r, act=code, slope=0.2)
    assert ((y - ref).abs().max() / ref.abs().max()).item() < _tol(dtype) * 10


# The activations added for the mobile / timm models: one shape each, values spread over
# their kinks (-3, 0, 3, 6) and mish's saturation (scale up to 4.5: u in about -15..15).
NEW_ACTS = {"relu6": (TC.ACT_RELU6, F.relu6), "hardswish": (TC.ACT_HARDSWISH, F.hardswish),
            "hardsigmoid": (TC.ACT_HARDSIGMOID, F.hardsigmoid), "mish": (TC.ACT_MISH, F.mish)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("act", list(NEW_ACTS))
def test_more_activations_in_prologue_and_epilogue(act, dtype):
    shape = SHAPES[1]
    x, w, b = _inputs(shape, dtype, True, seed=4)
    _, cin, _, _, _, _, s, p, d, g = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    code, fn = NEW_ACTS[act]
    scale = (torch.rand(cin, dtype=acc) * 4 + 0.5).to(DEVICE)
    shift = (torch.randn(cin, dtype=acc) * 2).to(DEVICE)
    a = fn(x.to(acc) * scale[None, :, None, None] + shift[None, :, None, None]).to(dtype)
    ref = F.conv2d(a, w, b, s, p, d, g)
    y, _ = TC.conv2d(x, w, b, (s, s), (p, p), (d, d), g, prologue=TC.Prologue(scale, shift, code))
    assert ((y - ref).abs().max() / ref.abs().max()).item() < _tol(dtype) * 10
    z = F.conv2d(x, w * 6, b, s, p, d, g)
    r = torch.randn(z.shape, dtype=dtype).to(DEVICE)
    ref = fn(z + r)
    y, _ = TC.conv2d(x, w * 6, b, (s, s), (p, p), (d, d), g, residual=r, act=code)
    assert ((y - ref).abs().max() / ref.abs().max()).item() < _tol(dtype) * 10


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_statistics_epilogue(shape, dtype):
    """Per-channel mean and biased variance of the stored conv output, merged from per-tile
    partials; the output itself unchanged; two runs bit-identical."""
    x, w, b = _inputs(shape, dtype, True, seed=3)
    _, _, _, _, _, _, s, p, d, g = shape
    z = F.conv2d(x, w, b, s, p, d, g)
    y, parts = TC.conv2d(x, w, b, (s, s), (p, p), (d, d), g, stats=True)
    mean, var = TC.merge_stats(parts)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    v_ref, m_ref = torch.var_mean(z.to(acc), dim=(0, 2, 3), correction=0)
    assert mean.dtype == acc and var.dtype == acc
    scale = z.abs().max().item()
    assert (mean - m_ref).abs().max().item() < _tol(dtype) * scale
    assert (var - v_ref).abs().max().item() < _tol(dtype) * scale * scale
    assert ((y - z).abs().max() / z.abs().max()).item() < _tol(dtype)
    y2, parts2 = TC.conv2d(x, w, b, (s, s), (p, p), (d, d), g, stats=True)
    assert torch.equal(y, y2) and all(torch.equal(u, v) for u, v in zip(parts, parts2))


def test_statistics_reject_an_epilogue():
    x, w, b = _inputs(SHAPES[0], torch.float32, True)
    with pytest.raises(ValueError, match="stats"):
        TC.conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1, stats=True, act=TC.ACT_RELU)
