"""What training keeps for backward, in `memory="default"` and `memory="low"`, tensor by tensor.

For each block kind and backend, the tensors autograd saves in a forward (seen by
`saved_tensors_hooks`, each storage once, parameters and per-channel statistics aside) are
compared with the exact list the mode promises, by role (x, each conv's output z_k, the
normalized activations a_k of eager's own chain, the block output y, the 1-bit mask), so one
extra saved activation fails. Then parity with the plain module chain (output, every gradient,
running statistics) and float64 gradcheck in both modes, whole models' saved bytes, and bad
`memory=` values.
"""
import collections
import copy

import pytest
import torch
import torch.nn as nn

import resfuse
from resfuse import functional as RF, models, reference
from resfuse.modules import FusedResidualBlock
from conftest import assert_exactish, randomize_bn

D = torch.float64
TRITON = resfuse.backends()["triton"] == "ok"
BACKENDS = ["eager", "pieces"] + (["triton"] if TRITON else [])
MODES = ["default", "low"]
KINDS = {
    "basic": dict(in_channels=4, channels=4),
    "basic-s2-proj": dict(in_channels=4, channels=8, stride=2),
    "bottleneck": dict(in_channels=16, channels=4, bottleneck=True),
    "bottleneck-s2-proj": dict(in_channels=8, channels=4, stride=2, bottleneck=True),
    "preact-basic": dict(in_channels=4, channels=4, preact=True),
    "preact-bottleneck": dict(in_channels=16, channels=4, bottleneck=True, preact=True),
}


def _saved(fn):
    """(result of fn(), [tensors saved for backward, one per storage], excluding parameters
    and anything without a batch dimension: per-channel statistics)."""
    seen = {}

    def pack(t):
        if not isinstance(t, nn.Parameter) and t.numel():
            seen.setdefault(t.untyped_storage().data_ptr(), t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, list(seen.values())


def _sig(t):
    return (tuple(t.shape), t.dtype)


def _mask(y):
    return ((y.numel() + 31) // 32,), torch.int32


def _conv_outputs(plain, x):
    """Shapes of each main conv's output (conv1, conv2[, conv3]) and the projection's."""
    outs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, name=name: outs.__setitem__(name, o.shape))
             for name, m in plain.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        plain(x)
    for h in hooks:
        h.remove()
    main = [outs[n] for n in ("conv1", "conv2", "conv3") if n in outs]
    return main, outs.get("downsample.0")


def expected(kind, backend, memory, x, y, plain):
    """The saved tensors' (shape, dtype) that `memory` promises on `backend`, by role."""
    main, proj = _conv_outputs(plain, x)
    z = [(tuple(s), x.dtype) for s in main]
    out = [_sig(x)]
    kept_output = _mask(y) if backend == "triton" else _sig(y)  # relu: 1 bit, or y itself
    eager_chain = backend == "eager" and memory == "default"
    if KINDS[kind].get("preact"):  # conv(act(bn(z))): the last z is the block's output
        if eager_chain:  # torch's chain keeps each act(bn(.)) too
            return out + [_sig(x)] + [t for zi in z[:-1] for t in (zi, zi)]
        return out + z[:-1]
    if eager_chain:
        out += [t for zi in z[:-1] for t in (zi, zi)] + [z[-1], _sig(y)]
    elif memory == "default":
        out += z + [kept_output]
    else:
        out += z[:-1] + [kept_output]
    if proj is not None and memory == "default":
        out.append((tuple(proj), x.dtype))
    return out


def _blocks(kind, backend, memory, dtype=D):
    torch.manual_seed(0)
    plain = randomize_bn(reference.ResidualBlock(**KINDS[kind]).to(dtype))
    fused = FusedResidualBlock(**KINDS[kind], backend=backend, memory=memory).to(dtype)
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def _input(kind, dtype=D):
    return torch.randn(2, KINDS[kind]["in_channels"], 6, 6, dtype=dtype)


@pytest.mark.parametrize("memory", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_saved_tensors_are_the_promised_list(kind, backend, memory):
    plain, fused = _blocks(kind, backend, memory, torch.float32)
    x = _input(kind, torch.float32).requires_grad_()
    y, saved = _saved(lambda: fused(x))
    got = sorted(_sig(t) for t in saved if t.dim() == 4 or t.dtype == torch.int32)
    assert got == sorted(expected(kind, backend, memory, x, y, plain))
    # Beside them, only per-channel statistics (at most a few per BN).
    others = [t for t in saved if not (t.dim() == 4 or t.dtype == torch.int32)]
    assert all(t.dim() == 1 for t in others), [_sig(t) for t in others]
    if not KINDS[kind].get("preact") and backend != "eager" or memory == "low":
        # never a normalized activation: each saved 4-D tensor is x, a z or y itself
        assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                   for t in saved)


def _step(m, x, g):
    x = x.clone().requires_grad_()
    y = m(x)
    y.backward(g)
    return [y.detach(), x.grad] + [p.grad for p in m.parameters()] + [
        b.clone() for b in m.buffers() if b.is_floating_point()]


@pytest.mark.parametrize("memory", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["basic-s2-proj", "bottleneck", "bottleneck-s2-proj",
                                  "preact-bottleneck"])
def test_parity_with_the_module_chain(kind, backend, memory):
    """Output, every gradient and the running statistics, two steps, float64."""
    plain, fused = _blocks(kind, backend, memory)
    x = _input(kind)
    for _ in range(2):
        g = torch.randn_like(plain(x.clone()).detach())
        plain.load_state_dict(fused.state_dict())  # (the extra forward moved its stats)
        want, got = _step(plain, x, g), _step(fused, x, g)
        for i, (a, b) in enumerate(zip(got, want)):
            assert_exactish(a, b, 1e-10 * max(1.0, b.abs().max().item()), f"tensor {i}")
        plain.zero_grad(), fused.zero_grad()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_low_gradients_equal_default_gradients_bit_for_bit(backend):
    """Low recomputes the last conv with the same kernel on the same inputs: the same bits as
    the default chain. (Eager's default is torch's own chain, another order of operations:
    the parity test covers it.)"""
    kind = "bottleneck-s2-proj"
    _, default = _blocks(kind, backend, "default")
    _, low = _blocks(kind, backend, "low")
    x = _input(kind)
    g = torch.randn(2, 16, 3, 3, dtype=D)
    for a, b in zip(_step(low, x, g), _step(default, x, g)):
        assert torch.equal(a, b)


def _bn(c, **kw):
    return dict(bn_weight=(torch.rand(c, dtype=D) + 0.5).requires_grad_(),
                bn_bias=torch.randn(c, dtype=D, requires_grad=True), **kw)


@pytest.mark.parametrize("memory", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_block_tail(backend, memory):
    """float64 gradcheck of the tail act(bn_out(conv(act(bn(x)))) + residual), through the
    statistics handed in, with running statistics updated (their values do not feed the
    output in training)."""
    x = torch.randn(2, 2, 4, 4, dtype=D, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=D, requires_grad=True)
    b = torch.randn(3, dtype=D, requires_grad=True)
    r = torch.randn(2, 3, 4, 4, dtype=D, requires_grad=True)
    bn, bo = _bn(2), _bn(3)

    def f(x, w, b, bw, bb, ow, ob, r):
        stats = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=0)[::-1]
        return RF.bn_act_conv_bn_act(
            x, bw, bb, torch.zeros(2, dtype=D), torch.ones(2, dtype=D), w, b, ow, ob,
            torch.zeros(3, dtype=D), torch.ones(3, dtype=D), training=True,
            activation="silu", residual=r, padding=1, backend=backend, batch_stats=stats,
            memory=memory)

    assert torch.autograd.gradcheck(
        f, (x, w, b, bn["bn_weight"], bn["bn_bias"], bo["bn_weight"], bo["bn_bias"], r),
        fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_conv_bn_act_low(backend):
    x = torch.randn(2, 2, 5, 5, dtype=D, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=D, requires_grad=True)
    bn = _bn(3)
    r = torch.randn(2, 3, 3, 3, dtype=D, requires_grad=True)

    def f(x, w, bw, bb, r):
        return RF.conv_bn_act(x, w, None, bw, bb, training=True, activation="relu",
                              residual=r, stride=2, padding=1, backend=backend, memory="low")

    assert torch.autograd.gradcheck(f, (x, w, bn["bn_weight"], bn["bn_bias"], r),
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_act_low_keeps_no_conv_output(backend):
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    bn = dict(bn_weight=torch.ones(5, requires_grad=True), bn_bias=torch.zeros(5))
    for memory, n_z in (("default", 1), ("low", 0)):
        y, saved = _saved(lambda: RF.conv_bn_act(x, w, None, **bn, training=True, padding=1,
                                                 backend=backend, memory=memory))
        shapes = [t.shape for t in saved if t is not w and t.untyped_storage().data_ptr()
                  not in (w.untyped_storage().data_ptr(), y.untyped_storage().data_ptr())]
        assert shapes.count(torch.Size([2, 5, 6, 6])) == n_z, (memory, shapes)


def _model_saved_bytes(model, x):
    """Bytes saved for backward by a forward of `model`, per-channel statistics aside."""
    _, saved = _saved(lambda: model(x))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(t.untyped_storage().nbytes() for t in saved
               if t.untyped_storage().data_ptr() not in params
               and not (t.dim() == 1 and t.is_floating_point()))


def _expected_model_bytes(plain, x, backend, memory):
    """What the converted model keeps: the stem's (image, conv output — not in low mode,
    where the fused stem chain recomputes it —, relu output, max-pool indices), each block's
    promised list (its input being the previous block's output, kept
    once), the classifier's input."""
    total = collections.Counter()
    item = x.element_size()
    n = x.shape[0]
    with torch.no_grad():
        stem = plain.relu(plain.bn1(plain.conv1(x)))
        pooled = plain.maxpool(stem)
    # image, conv1's output (default mode only), relu's output, max-pool's indices (int64)
    # and output
    stem_kept = 2 if memory == "default" else 1
    total["stem"] = ((x.numel() + stem_kept * stem.numel() + pooled.numel()) * item
                     + pooled.numel() * 8)
    h = pooled
    for layer in (plain.layer1, plain.layer2, plain.layer3, plain.layer4):
        for block in layer:
            with torch.no_grad():
                y = block(h)
            kind = "bottleneck" if block.bottleneck else "basic"
            kind += "-s2-proj" if block.downsample is not None else ""
            sigs = expected(kind, backend, memory, h, y, block)[1:]  # x: the last block's y
            if backend != "triton":
                sigs.remove((tuple(y.shape), y.dtype))  # kept as the next one's input
                total["blocks"] += y.numel() * item
            total["blocks"] += sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size()
                                   for s, d in sigs)
            h = y
    total["head"] = n * h.shape[1] * item  # fc's input; avgpool keeps the last y (counted)
    return sum(total.values())


@pytest.mark.parametrize("memory", MODES)
@pytest.mark.parametrize("backend", ["eager", "pieces"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_model_saved_bytes(name, backend, memory):
    """A converted ResNet keeps exactly its blocks' promised lists plus the stem and head."""
    torch.manual_seed(0)
    plain = getattr(models, name)(num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    fused = copy.deepcopy(plain)
    resfuse.convert(fused, backend=backend, memory=memory)
    assert all(b.memory == memory for b in fused.modules() if isinstance(b, FusedResidualBlock))
    got = _model_saved_bytes(fused.train(), x)
    want = _expected_model_bytes(plain.train(), x, backend, memory)
    assert got == want
    if memory == "low":  # (the ratios themselves are bench/'s: docs/memory.md)
        assert got < _model_saved_bytes(plain, x)


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("bad", ["lowest", "LOW", None, 1])
def test_bad_memory_values(bad):
    msg = r"memory: expected one of \('default', 'low'\)"
    with pytest.raises(ValueError, match=msg):
        FusedResidualBlock(8, 8, memory=bad)
    with pytest.raises(ValueError, match=msg):
        resfuse.FusedBottleneck(16, 4, memory=bad)
    with pytest.raises(ValueError, match=msg):
        resfuse.FusedConvBNAct(3, 4, 3, memory=bad)
    model = models.resnet18(num_classes=10)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=msg):
        resfuse.convert(model, memory=bad)
    assert [type(m) for m in model.modules()] == before  # nothing changed
    x = torch.randn(2, 3, 4, 4)
    rm = torch.zeros(4)
    with pytest.raises(ValueError, match=msg):
        RF.conv_bn_act(x, torch.randn(4, 3, 1, 1), None, None, None, rm, torch.ones(4),
                       training=True, memory=bad)
    with pytest.raises(ValueError, match=msg):
        RF.bn_act_conv(x, None, None, None, None, torch.randn(4, 3, 1, 1), memory=bad)
    with pytest.raises(ValueError, match=msg):
        RF.bn_act_conv_bn_act(x, None, None, None, None, torch.randn(4, 3, 1, 1), memory=bad)
    assert torch.equal(rm, torch.zeros(4))


def test_memory_attribute_and_repr():
    m = resfuse.FusedBasicBlock(8, 8, memory="low")
    assert m.memory == "low" and "memory=low" in repr(m)
    assert resfuse.FusedBottleneck(16, 4).memory == "default"


@pytest.mark.parametrize("backend", ["eager", "pieces"])
def test_conv_fwd_op_fake_agrees(backend):
    """The recompute op's fake output (shape, strides) is the real one's, for torch.compile."""
    from torch.library import opcheck
    x = torch.randn(2, 3, 6, 6, dtype=D)
    w = torch.randn(4, 3, 3, 3, dtype=D).contiguous(memory_format=torch.channels_last)
    for stats in (False, True):
        opcheck(torch.ops.resfuse.conv_fwd.default, (x, w, None, [1, 1], [1, 1], [1, 1], 1,
                                                     backend, stats),
                test_utils=("test_schema", "test_faketensor"))


def test_low_block_compiles_whole():
    """torch.compile(fullgraph=True) keeps a low-memory block's chain whole (one graph) and
    gives the module chain's step."""
    import torch._dynamo.testing
    plain, fused = _blocks("bottleneck-s2-proj", "pieces", "low")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend=counter, fullgraph=True)
    x = _input("bottleneck-s2-proj")
    g = torch.randn(2, 16, 3, 3, dtype=D)
    for a, b in zip(_step(compiled, x, g), _step(plain, x, g)):
        assert_exactish(a, b, 1e-10 * max(1.0, b.abs().max().item()))
    assert counter.frame_count == 1


# ------------------------------------------------------------------------------ bench's count

def _bench():
    import os
    import sys
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if path not in sys.path:
        sys.path.append(path)  # after tests/: tests/harness.py is another module
    import measure
    import memory
    return measure, memory


def test_bench_saved_bytes_count_each_storage_once_without_parameters():
    measure, _ = _bench()
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)

    def fwd():
        h = lin(x)          # saves x (and lin.weight: a parameter, left out)
        return h * h        # saves h twice: once
    assert measure.saved_for_backward(fwd) == x.numel() * 4 + 4 * 8 * 4
    y = torch.randn(4, 8, requires_grad=True)  # x * y saves both: y is left out
    assert measure.saved_for_backward(lambda: x * y, exclude=[y]) == x.numel() * 4


def test_bench_budget_search_doubles_then_bisects_measured_points(monkeypatch):
    _, memory = _bench()
    per_image, fixed = 1000, 500
    calls = []

    def fake_memory_at(m, batch, s):
        calls.append(batch)
        return fixed + per_image * batch
    monkeypatch.setattr(memory, "memory_at", fake_memory_at)
    m = nn.Linear(1, 1)
    from types import SimpleNamespace
    found = memory.largest_batch(m, fixed + per_image * 37,
                                 SimpleNamespace(device=torch.device("cpu")))
    assert found["batch"] == 37 and not found["capped"]
    assert calls[:6] == [2, 4, 8, 16, 32, 64]  # doubling, then bisection between 32 and 64
    assert [b for b, _ in found["points"]] == calls and 37 in calls and 38 in calls
