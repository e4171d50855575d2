"""Backend registry, choice (per call, scope, environment, auto), and the torch.library ops."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import resfuse
import resfuse.functional as RF
from resfuse import backend as dispatch
from resfuse.backend.base import Case


def test_backends_reports_every_backend_with_a_reason():
    b = resfuse.backends()
    assert b["eager"] == "ok" and b["pieces"] == "ok"
    # triton is "ok" with triton installed and a GPU, or TRITON_INTERPRET=1 (as tests/ sets
    # without a GPU); elsewhere it says why not.
    assert b["triton"] == "ok" or len(b["triton"]) > 10, b["triton"]
    # cuda is "ok" where resfuse._C is built and a GPU is visible; elsewhere it says why not.
    assert b["cuda"] == "ok" or len(b["cuda"]) > 10, b["cuda"]
    if not torch.cuda.is_available():
        assert "resfuse._C" in b["cuda"] or "not built" in b["cuda"] or "not implemented" in b["cuda"]


CPU_CASE = Case("conv_bn_act", "cpu", torch.float32, False)


def test_auto_picks_eager_on_cpu(monkeypatch):
    monkeypatch.delenv("RESFUSE_BACKEND", raising=False)
    assert dispatch.select(CPU_CASE).name == "eager"


def test_choice_precedence(monkeypatch):
    monkeypatch.setenv("RESFUSE_BACKEND", "pieces")
    assert dispatch.select(CPU_CASE).name == "pieces"
    with resfuse.use_backend("eager"):
        assert dispatch.select(CPU_CASE).name == "eager"  # scope beats environment
        assert dispatch.select(CPU_CASE, "pieces").name == "pieces"  # call beats scope
        with resfuse.use_backend("auto"):
            assert dispatch.select(CPU_CASE).name == "eager"
    monkeypatch.setenv("RESFUSE_BACKEND", "cuda")
    with pytest.raises(resfuse.BackendUnavailable, match="cuda"):
        dispatch.select(CPU_CASE)
    monkeypatch.setenv("RESFUSE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RESFUSE_BACKEND"):
        dispatch.select(CPU_CASE)


def test_scope_is_used_by_the_functional_call():
    calls = []
    real = dispatch._registry["pieces"].bn_act_forward

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    dispatch._registry["pieces"].bn_act_forward = spy
    try:
        with resfuse.use_backend("pieces"):
            RF.bn_act(torch.randn(2, 3, 4, 4), training=True)
        RF.bn_act(torch.randn(2, 3, 4, 4), training=True)
    finally:
        del dispatch._registry["pieces"].bn_act_forward
    assert len(calls) == 1


def test_ops_are_registered_with_fake_implementations():
    """The ops exist under torch.ops.resfuse and their fake (meta) versions give the shapes
    the real ones give, so torch.compile can trace through them."""
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(5, 3, 3, 3)
    rm, rv, nbt = torch.zeros(5), torch.ones(5), torch.tensor(0)
    args = (x, w, None, None, None, rm, rv, nbt, None, [2, 2], [1, 1], [1, 1], 1, True, 0.1,
            1e-5, "silu", 0.01, "eager", True)
    real = torch.ops.resfuse.conv_bn_act_fwd(*args)
    with FakeTensorMode() as mode:
        fargs = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = torch.ops.resfuse.conv_bn_act_fwd(*fargs)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype
    inf = torch.ops.resfuse.conv_bn_act_infer(x, w, None, None, None, rm, rv, None, [1, 1],
                                              [1, 1], [1, 1], 1, 1e-5, "relu", 0.01, "eager")
    with FakeTensorMode() as mode:
        f = torch.ops.resfuse.conv_bn_act_infer(*(mode.from_tensor(a) if isinstance(a, torch.Tensor)
                                                   else a for a in (x, w, None, None, None, rm, rv,
                                                                     None, [1, 1], [1, 1], [1, 1],
                                                                     1, 1e-5, "relu", 0.01, "eager")))
    assert f.shape == inf.shape


@pytest.mark.parametrize("save", [True, False])
def test_opcheck_forward_ops(save):
    """torch.library.opcheck: schema (mutation and aliasing annotations), fake tensors."""
    x = torch.randn(2, 3, 6, 6)
    w = torch.randn(4, 3, 3, 3)
    args = (x, w, torch.randn(4), torch.rand(4) + 0.5, torch.randn(4), torch.zeros(4),
            torch.ones(4), torch.tensor(0), torch.randn(2, 4, 6, 6), [1, 1], [1, 1], [1, 1], 1,
            True, None, 1e-5, "gelu", 0.01, "eager", save)
    torch.library.opcheck(torch.ops.resfuse.conv_bn_act_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    pre = (torch.randn(2, 4, 6, 6), torch.rand(4) + 0.5, torch.randn(4), torch.zeros(4),
           torch.ones(4), torch.tensor(0), w.transpose(0, 1).contiguous(), None, None, [1, 1],
           [1, 1], [1, 1], 1, True, 0.1, 1e-5, "relu", 0.01, "eager", save)
    torch.library.opcheck(torch.ops.resfuse.bn_act_conv_fwd.default, pre,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["eager", "pieces"])
def test_opcheck_backward_and_inference_ops(backend):
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    bw, bb = torch.rand(4) + 0.5, torch.randn(4)
    rm, rv = torch.zeros(4), torch.ones(4)
    y, z, mean, invstd, u = torch.ops.resfuse.conv_bn_act_fwd(
        x, w, None, bw, bb, rm.clone(), rv.clone(), None, None, [1, 1], [1, 1], [1, 1], 1, True,
        0.1, 1e-5, "silu", 0.01, backend, True)
    g = torch.randn_like(y)
    torch.library.opcheck(
        torch.ops.resfuse.conv_bn_act_bwd.default,
        (g, x, w, z, u, mean, invstd, bw, [1, 1], [1, 1], [1, 1], 1, True, "silu", 0.01, backend,
         False, [True, True, False, True, True, True]),
        test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(
        torch.ops.resfuse.conv_bn_act_infer.default,
        (x, w, torch.randn(4), bw, bb, rm, rv, torch.randn(2, 4, 6, 6), [1, 1], [1, 1], [1, 1], 1,
         1e-5, "relu", 0.01, backend),
        test_utils=("test_schema", "test_faketensor"))
    xa = torch.randn(2, 4, 6, 6)
    w2 = torch.randn(3, 4, 3, 3)
    y2, a, mean2, invstd2, _, _ = torch.ops.resfuse.bn_act_conv_fwd(
        xa, bw, bb, None, None, None, w2, None, None, [1, 1], [1, 1], [1, 1], 1, True, 0.1, 1e-5,
        "gelu", 0.01, backend, True)
    torch.library.opcheck(
        torch.ops.resfuse.bn_act_conv_bwd.default,
        (torch.randn_like(y2), xa, a, w2, mean2, invstd2, bw, bb, [1, 1], [1, 1], [1, 1], 1, True,
         "gelu", 0.01, backend, False, [True, True, True, True, False]),
        test_utils=("test_schema", "test_faketensor"))


def test_triton_without_gpu_needs_the_interpreter_and_auto_never_picks_it(monkeypatch):
    from resfuse.backend.triton import TritonBackend
    be = TritonBackend()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if be.unavailable_reason() is not None:
        pytest.skip(f"triton: {be.unavailable_reason()}")
    assert be.unsupported_reason(CPU_CASE) is None
    assert "float32 and float64" in be.unsupported_reason(
        Case("conv_bn_act", "cpu", torch.bfloat16, False))
    monkeypatch.delenv("RESFUSE_BACKEND", raising=False)
    assert dispatch.select(CPU_CASE).name == "eager"  # auto: never the interpreter
    assert dispatch.select(CPU_CASE, "triton").name == "triton"
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET=1" in be.unavailable_reason()
        assert "interpreter" in be.unsupported_reason(CPU_CASE)


def test_triton_training_takes_batch_statistics_from_the_conv_epilogue(monkeypatch):
    """A conv_bn_act training forward through `triton`: the statistics come from the conv's
    epilogue (no separate pass over z), and the result is the module chain's."""
    from resfuse.backend.triton import TritonBackend
    if resfuse.backends()["triton"] != "ok":
        pytest.skip(f"triton: {resfuse.backends()['triton']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def no_pass(self, z):
        raise AssertionError("bn_stats: a separate statistics pass over z")
    monkeypatch.setattr(TritonBackend, "bn_stats", no_pass)
    D = torch.float64
    x = torch.randn(3, 4, 7, 7, dtype=D, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 4, 3, 3, dtype=D, device=device)
    args = [torch.rand(6, dtype=D, device=device) + 0.5, torch.randn(6, dtype=D, device=device)]
    rm, rv = torch.zeros(6, dtype=D, device=device), torch.ones(6, dtype=D, device=device)
    rm2, rv2 = rm.clone(), rv.clone()
    y = RF.conv_bn_act(x, w, None, *args, rm, rv, training=True, padding=1, backend="triton")
    ref = resfuse.reference.conv_bn_act(x, w, None, *args, rm2, rv2, training=True, padding=1)
    assert (y - ref).abs().max().item() < 1e-10
    assert (rm - rm2).abs().max().item() < 1e-12 and (rv - rv2).abs().max().item() < 1e-12


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_triton_preactivation_inference_applies_bn_in_the_conv_prologue(monkeypatch, training, act):
    """bn_act_conv without gradients through `triton`: BN + activation applied as the conv
    loads x (act(bn(x)) never written), equal to the module chain, side effects included."""
    from resfuse.backend.triton import TritonBackend
    if resfuse.backends()["triton"] != "ok":
        pytest.skip(f"triton: {resfuse.backends()['triton']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def no_write(self, *a, **k):
        raise AssertionError("scale_shift_add_act: act(bn(x)) written")
    monkeypatch.setattr(TritonBackend, "scale_shift_add_act", no_write)
    D = torch.float64
    x = torch.randn(3, 4, 7, 7, dtype=D, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 4, 3, 3, dtype=D, device=device)
    bw, bb = torch.rand(4, dtype=D, device=device) + 0.5, torch.randn(4, dtype=D, device=device)
    rm, rv = torch.randn(4, dtype=D, device=device) * 0.1, torch.rand(4, dtype=D, device=device) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    r = torch.randn(3, 6, 7, 7, dtype=D, device=device)
    with torch.no_grad():
        y = RF.bn_act_conv(x, bw, bb, rm, rv, w, None, training=training, activation=act,
                           residual=r, padding=1, backend="triton")
    ref = resfuse.reference.bn_act_conv(x, bw, bb, rm2, rv2, w, None, training=training,
                                        activation=act, residual=r, padding=1)
    assert (y - ref).abs().max().item() < 1e-10
    assert (rm - rm2).abs().max().item() < 1e-12 and (rv - rv2).abs().max().item() < 1e-12
