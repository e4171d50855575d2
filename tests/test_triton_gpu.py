"""The `triton` backend on a GPU against the eager reference (skipped without one: CI and the
development machine check the same kernels on CPU tensors in Triton's interpreter, in the
other test files). `bench/gpu_check.sh` runs it on a lent GPU.

Every fused op in fp32 (TF32 off, so BN math compares tightly), fp16, bf16 and fp64, NCHW,
channels_last and odd strides, every activation and BN mode; every distinct conv layer of
ResNet-18/50/101 and ResNeXt-50 at its own spatial size; a residual block as the chain;
determinism (also with the opt-in autotuner); and a converted ResNet-50 training step against
eager (loss, every gradient, running statistics)."""
import copy

import pytest
import torch

import resfuse
from conftest import assert_honest, randomize_bn, to_layout
from harness import OpCase, check, check_converted_resnet50_step
from resnet_shapes import layer_shapes
from test_cuda_backend import BN_MODES, bn_case
from test_functional import ACTIVATIONS, MORE_ACTIVATIONS

ACTS = {**ACTIVATIONS, **MORE_ACTIVATIONS}

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or resfuse.backends()["triton"] != "ok",
    reason="no CUDA device" if not torch.cuda.is_available()
    else f"triton: {resfuse.backends()['triton']}")
DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(autouse=True)
def _no_tf32(no_tf32):
    """Compare against exact fp32 convolutions (conftest.no_tf32)."""


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("form", ["post", "bn_act", "pre"])
def test_activation_grid(form, act, dtype, layout):
    check(OpCase(form=form, n=3, c_in=16, c_out=24, hw=(9, 7), **ACTS[act]), "triton",
          dtype, layout, DEV)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", BN_MODES)
def test_bn_modes(mode, dtype, layout):
    check(bn_case(mode), "triton", dtype, layout, DEV)


LAYERS = layer_shapes()


@pytest.mark.parametrize("dtype,layout", [(torch.bfloat16, "channels_last"),
                                          (torch.float16, "channels_last"),
                                          (torch.float32, "nchw")], ids=str)
@pytest.mark.parametrize("layer", LAYERS)
def test_resnet_layers(layer, dtype, layout):
    s = LAYERS[layer]
    check(OpCase(n=2, c_in=s.c_in, c_out=s.c_out, hw=s.hw, kernel=(s.kernel, s.kernel),
                 stride=s.stride, groups=s.groups, padding=s.padding), "triton", dtype, layout,
          DEV)


def _block_step(block, x, g):
    x = x.clone().requires_grad_()
    y = block(x)
    y.backward(g)
    return [y.detach(), x.grad] + [p.grad for p in block.parameters()] + list(block.buffers())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("cfg", [dict(in_channels=256, channels=64, bottleneck=True),
                                 dict(in_channels=256, channels=128, stride=2, bottleneck=True),
                                 dict(in_channels=128, channels=128, stride=1),
                                 dict(in_channels=256, channels=128, bottleneck=True, groups=32,
                                      base_width=4)],
                         ids=["bottleneck", "bottleneck-s2", "basic", "resnext"])
def test_block_chain(cfg, dtype):
    """A block in training as the chain: output, gradients and running statistics by the
    honest rule against the eager block (float64 on the GPU as the reference)."""
    torch.manual_seed(0)
    plain = randomize_bn(resfuse.reference.ResidualBlock(**cfg)).to(DEV)
    fused = resfuse.FusedResidualBlock(**cfg, backend="triton").to(DEV)
    fused.load_state_dict(plain.state_dict())
    x = to_layout(torch.randn(8, cfg["in_channels"], 28, 28, device=DEV), "channels_last")
    assert fused._runs_chain(x.to(dtype))
    with torch.no_grad():  # (an eval copy: plain's running statistics stay as loaded)
        g = torch.randn_like(copy.deepcopy(plain).eval()(x))
    r64 = _block_step(copy.deepcopy(plain).double(), x.double(), g.double())
    rlp = _block_step(copy.deepcopy(plain).to(dtype), x.to(dtype), g.to(dtype))
    out = _block_step(fused.to(dtype), x.to(dtype), g.to(dtype))
    for i, (a, b, c) in enumerate(zip(out, rlp, r64)):
        if c.dtype == torch.int64:  # num_batches_tracked
            assert torch.equal(a, b)
        else:
            assert_honest(a.float().cpu().to(b.dtype), b.cpu(), c.cpu(), f"tensor {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(dtype):
    torch.manual_seed(0)
    block = resfuse.FusedResidualBlock(256, 64, bottleneck=True, backend="triton").to(DEV, dtype)
    state = copy.deepcopy(block.state_dict())
    x = to_layout(torch.randn(16, 256, 28, 28, device=DEV, dtype=dtype), "channels_last")
    g = torch.randn_like(x)
    runs = []
    for _ in range(2):
        block.load_state_dict(state)
        block.zero_grad()
        runs.append(_block_step(block, x, g))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_converted_resnet50_training_step(dtype):
    check_converted_resnet50_step("triton", dtype, DEV)


def test_autotuned_block_chain(monkeypatch, tmp_path):
    """With the opt-in autotuner on (tiles.py), a block in training is still right, two steps
    in the process give identical bits, and the choices go to the cache file."""
    from resfuse.triton_kernels import tiles
    monkeypatch.setattr(tiles, "_chosen", {})
    monkeypatch.setattr(tiles, "_cache_loaded", {})
    monkeypatch.setenv(tiles.AUTOTUNE_ENV, "1")
    monkeypatch.setenv(tiles.AUTOTUNE_CACHE_ENV, str(tmp_path / "tiles.json"))
    test_block_chain(dict(in_channels=256, channels=64, bottleneck=True), torch.bfloat16)
    assert tiles._chosen and (tmp_path / "tiles.json").exists()
    test_deterministic(torch.bfloat16)
