"""Shared helpers: random BN state, the honest-tolerance comparison, layouts."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/mirrors.py

# Without a GPU the Triton kernels run under Triton's interpreter. Set before anything imports
# triton: triton reads it once, and a kernel and the @triton.jit helpers it calls must agree.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Floors of the tolerance rule, per dtype (absolute, for O(1) values).
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture
def no_tf32():
    """fp32 convolutions and matmuls without TF32 for the test (tight comparisons); the
    Triton kernels follow torch's convolution setting, so they run IEEE fp32 too."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def wide_interpreter_tiles(monkeypatch):
    """Under Triton's interpreter, tiles up to 256 wide for the test (the default cap is 64):
    the interpreter's cost is per program and loop step, so a network's wide layers run 7-11x
    faster. For tests of whole layers and models; the small-shape kernel tests keep the
    default, where their shapes span several tiles. No effect on a GPU."""
    if not torch.cuda.is_available():
        try:
            from resfuse.triton_kernels import tiles
        except ImportError:
            return
        monkeypatch.setattr(tiles, "INTERPRETER_TILE_CAP", 256)


def spy_eval_runner(monkeypatch, seen):
    """Calls `seen(runner, x, residual, into, bounded)` before each call of a CPU eval plan's
    oneDNN runner (`resfuse.backend.eager.OneDNNEvalConv`), then the real call. Stage programs
    are turned off meanwhile: a replay calls oneDNN without the runner (the tests of
    `resfuse.stage_program` compare the two paths)."""
    from resfuse import stage_program
    from resfuse.backend import eager
    real = eager.OneDNNEvalConv.__call__
    monkeypatch.setattr(stage_program, "_enabled", False)

    def spying(self, x, w, residual, into=False, bounded=False):
        seen(self, x, residual, into, bounded)
        return real(self, x, w, residual, into, bounded)
    monkeypatch.setattr(eager.OneDNNEvalConv, "__call__", spying)


@pytest.fixture
def fresh_eval_plans():
    """The CPU eval fast path on, with no plans and no remembered oneDNN refusals, before and
    after the test (the switch restored)."""
    from resfuse import eval_plan
    from resfuse.backend import eager
    old = eager.set_cpu_fused_conv(True)
    eager._refused.clear()
    eval_plan.clear_plans()
    yield
    eager.set_cpu_fused_conv(old)
    eager._refused.clear()
    eval_plan.clear_plans()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def assert_honest(out: torch.Tensor, ref_lp: torch.Tensor, ref_64: torch.Tensor, what: str = ""):
    """The fused result may be at most twice as far from the float64 reference as the
    same-dtype eager result is, plus a small per-dtype floor (docs/design.md)."""
    assert out.shape == ref_64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref_64.shape)}"
    assert out.dtype == ref_lp.dtype, f"{what}: dtype {out.dtype} != {ref_lp.dtype}"
    scale = max(1.0, ref_64.abs().max().item())
    err = (out.double() - ref_64).abs().max().item()
    base = (ref_lp.double() - ref_64).abs().max().item()
    bound = 2 * base + FLOOR[out.dtype] * scale
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (eager error {base:.3e})"


def assert_exactish(a: torch.Tensor, b: torch.Tensor, tol: float, what: str = ""):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: max abs difference {err:.3e} > {tol:.1e}"


def randomize_bn(module: torch.nn.Module):
    """Non-trivial affine parameters and running statistics in every BN below `module`."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
    return module


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """'nchw', 'channels_last', or 'strided' (a non-contiguous view with the same values)."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        big = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        view = big[..., ::2]
        assert not view.is_contiguous()
        return view
    raise ValueError(layout)
