"""The modules' CPU training plans (resfuse.train_plan): the functional path's checks and
backend choice once per module pair and kind of call, then eager's differentiable ops; the
checked path (and its errors) for every call of another kind; every change of the modules'
tensors or settings seen."""
import copy
import gc

import pytest
import torch
import torch.nn as nn

import resfuse
import resfuse.functional as RF
from resfuse import models, reference, train_plan
from resfuse.validation import ResfuseInputError
from conftest import randomize_bn

CL = torch.channels_last


@pytest.fixture(autouse=True)
def fresh_train_plans():
    train_plan.clear()
    yield
    train_plan.clear()


class _CheckedCalls:
    """Counts the checked functional path's calls (monkeypatched in `resfuse.functional`)."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = RF.conv_bn_act

        def counted(*a, **k):
            self.n += 1
            return real(*a, **k)
        monkeypatch.setattr(RF, "conv_bn_act", counted)


def _pair(cin=4, cout=6, **conv_kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, padding=1, **conv_kw)
    bn = randomize_bn(nn.BatchNorm2d(cout))
    return conv, bn


def _step(m, x, r=None):
    """One forward and backward of `m` in training: (output, x's gradient, the parameters'
    gradients, the buffers), gradients cleared after."""
    x = x.detach().clone().requires_grad_()
    y = m(x) if r is None else m(x, r)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    out = (y.detach(), x.grad, [p.grad.clone() for p in m.parameters()],
           [b.clone() for b in m.buffers()])
    for p in m.parameters():
        p.grad = None
    return out


def _assert_same(a, b, tol=1e-6):
    ya, gxa, gpa, ba = a
    yb, gxb, gpb, bb = b
    for what, ta, tb in ([("output", ya, yb), ("x grad", gxa, gxb)]
                         + [("param grad", p, q) for p, q in zip(gpa, gpb)]
                         + [("buffer", p, q) for p, q in zip(ba, bb)]):
        assert ta.shape == tb.shape, what
        scale = max(1.0, tb.double().abs().max().item()) if tb.numel() else 1.0
        err = (ta.double() - tb.double()).abs().max().item() if ta.numel() else 0.0
        assert err <= tol * scale, f"{what}: {err:.3e}"


def _fused_and_plain(act="relu", **conv_kw):
    conv, bn = _pair(**conv_kw)
    fused = resfuse.FusedConvBNAct.from_modules(conv, bn, act).train()
    plain = reference.ConvBNAct(copy.deepcopy(conv), copy.deepcopy(bn), act).train()
    return fused, plain


def test_checks_and_backend_choice_run_once_per_kind_of_call(monkeypatch):
    """After the first call of a kind, neither the checked path nor the backend choice run
    again; a new input shape or layout is checked once, then planned too."""
    fused, plain = _fused_and_plain()
    checked = _CheckedCalls(monkeypatch)
    selected = {"n": 0}
    real_select = resfuse.backend.select

    def select(*a, **k):
        selected["n"] += 1
        return real_select(*a, **k)
    monkeypatch.setattr(resfuse.backend, "select", select)
    x = torch.randn(2, 4, 6, 6)
    for _ in range(3):
        _assert_same(_step(fused, x), _step(plain, x))
    assert checked.n == 1 and selected["n"] == 2  # (the checked call's choice, the plan's)
    for x in (torch.randn(3, 4, 6, 6), torch.randn(3, 4, 6, 6).contiguous(memory_format=CL)):
        before = checked.n
        for _ in range(2):
            _assert_same(_step(fused, x), _step(plain, x))
        assert checked.n == before + 1


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_training_steps_by_plans_are_eagers(name, layout):
    """A converted ResNet trained for three SGD steps: from the second on, every fused
    conv runs by its plan, with eager's outputs, gradients and running statistics."""
    torch.manual_seed(0)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    plain = randomize_bn(getattr(models, name)(num_classes=5)).train().to(memory_format=fmt)
    fused = copy.deepcopy(plain)
    assert resfuse.convert(fused).swapped
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 3, 40, 40).contiguous(memory_format=fmt)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in plain.modules())
    for step in range(3):
        got, want = _step_keep(fused, x), _step_keep(plain, x)
        _assert_same(got, want, tol=1e-5)
        opt_p.step(), opt_f.step()
        opt_p.zero_grad(), opt_f.zero_grad()
        if step == 0:
            assert len(train_plan._plans) == n_convs  # (the stem's too: a converted chain)
            plans = dict(train_plan._plans)
        else:  # (an optimizer step changes values only: the same plans answer)
            assert dict(train_plan._plans) == plans


def _step_keep(m, x):
    """`_step` for a whole model, gradients kept for the optimizer; parameters and buffers
    in the order of their names (a converted model has the plain one's names)."""
    x = x.detach().clone().requires_grad_()
    y = m(x)
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    params, buffers = dict(m.named_parameters()), dict(m.named_buffers())
    return (y.detach(), x.grad, [params[n].grad.clone() for n in sorted(params)],
            [buffers[n].clone() for n in sorted(buffers)])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pre_activation_chains_by_plans_are_eagers(layout):
    """DenseNet's BN -> ReLU -> conv chains (the converter's pre-activation slots) and a
    pre-activation block's: planned too, with eager's results step after step."""
    torch.manual_seed(0)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    for plain, x in ((models.densenet121(num_classes=5), torch.randn(2, 3, 32, 32)),
                     (reference.ResidualBlock(8, 8, preact=True), torch.randn(2, 8, 6, 6))):
        plain = randomize_bn(plain).train().to(memory_format=fmt)
        holder = nn.Sequential(copy.deepcopy(plain))
        report = resfuse.convert(holder)
        assert report.swapped or report.chains
        x = x.contiguous(memory_format=fmt)
        for _ in range(3):
            _assert_same(_step_keep(holder[0], x), _step_keep(plain, x), tol=1e-5)
            for m in (plain, holder):
                m.zero_grad()
        pre = [p for p in train_plan._plans.values() if not p.conv_first]
        assert pre, type(plain).__name__
        train_plan.clear()


def test_a_pre_activation_plan_is_not_a_post_activation_one(monkeypatch):
    """The same conv and BN called in the other order: checked again, not answered by the
    other order's plan."""
    conv, bn = _pair(cin=6)
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    from resfuse.modules import bn_act_conv_modules, conv_bn_act_modules
    act = resfuse.activations.as_activation("relu")
    conv_bn_act_modules(x, conv, bn, act), conv_bn_act_modules(x, conv, bn, act)
    checked = {"n": 0}
    real = RF.bn_act_conv

    def counted(*a, **k):
        checked["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(RF, "bn_act_conv", counted)
    want = reference.bn_act_conv(x, bn.weight, bn.bias, bn.running_mean.clone(),
                                 bn.running_var.clone(), conv.weight, conv.bias, training=True,
                                 activation="relu", padding=1)
    torch.testing.assert_close(bn_act_conv_modules(x, bn, conv, act), want)
    assert checked["n"] == 1


def _edit_momentum(conv, bn):
    bn.momentum = 0.3


def _edit_momentum_none(conv, bn):
    bn.momentum = None


def _edit_eps(conv, bn):
    bn.eps = 1e-2


def _edit_no_tracking(conv, bn):
    bn.track_running_stats = False


def _edit_new_weight(conv, bn):
    conv.weight = nn.Parameter(torch.randn_like(conv.weight))


def _edit_new_bn_bias(conv, bn):
    bn.bias = nn.Parameter(torch.randn_like(bn.bias))


def _edit_new_running_var(conv, bn):
    bn.running_var = torch.rand_like(bn.running_var) + 0.5


def _edit_stride(conv, bn):
    conv.stride = (2, 2)


def _edit_dilation(conv, bn):
    conv.dilation, conv.padding = (2, 2), (2, 2)


@pytest.mark.parametrize("edit", [_edit_momentum, _edit_momentum_none, _edit_eps,
                                  _edit_no_tracking, _edit_new_weight, _edit_new_bn_bias,
                                  _edit_new_running_var, _edit_stride, _edit_dilation],
                         ids=lambda f: f.__name__[6:])
def test_a_changed_module_is_checked_again(edit, monkeypatch):
    """An edit of the modules' tensors or settings after planning: the next call takes the
    checked path (once) and gives eager's results under the edit."""
    fused, plain = _fused_and_plain()
    x = torch.randn(2, 4, 6, 6)
    for _ in range(2):
        _assert_same(_step(fused, x), _step(plain, x))
    checked = _CheckedCalls(monkeypatch)
    edit(fused.conv, fused.bn)
    edit(plain.conv, plain.bn)
    plain.load_state_dict(fused.state_dict())  # (new random tensors: the same ones in both)
    for _ in range(2):
        _assert_same(_step(fused, x), _step(plain, x))
    assert checked.n == 1


@pytest.mark.parametrize("tracking", [True, False])
def test_dtype_change_and_new_activation_are_checked_again(tracking, monkeypatch):
    """`module.to(dtype)` keeps the Parameters (their data swapped) and replaces the buffers;
    without running statistics, only the Parameters' dtype shows it."""
    fused, plain = _fused_and_plain()
    fused.bn.track_running_stats = plain.bn.track_running_stats = tracking
    x = torch.randn(2, 4, 6, 6)
    _step(fused, x), _step(fused, x)
    checked = _CheckedCalls(monkeypatch)
    fused.double(), plain.double()  # (the Parameters kept, their data swapped)
    with pytest.raises(ResfuseInputError, match="dtype"):  # weights float64, x float32
        _step(fused, x)
    plain.load_state_dict(fused.state_dict())
    _assert_same(_step(fused, x.double()), _step(plain, x.double()), tol=1e-12)
    assert checked.n == 2
    fused.activation = resfuse.activations.as_activation("silu")
    plain.activation = resfuse.activations.as_activation("silu")
    for _ in range(2):
        _assert_same(_step(fused, x.double()), _step(plain, x.double()), tol=1e-12)
    assert checked.n == 3


def test_residual_kinds(monkeypatch):
    fused, plain = _fused_and_plain()
    x, r = torch.randn(2, 4, 6, 6), torch.randn(2, 6, 6, 6)
    for _ in range(2):
        _assert_same(_step(fused, x, r), _step(plain, x, r))
    checked = _CheckedCalls(monkeypatch)
    _assert_same(_step(fused, x), _step(plain, x))  # no residual: another kind of call
    _assert_same(_step(fused, x, r), _step(plain, x, r))  # (a conv keeps one plan)
    assert checked.n == 2
    rcl = r.contiguous(memory_format=CL)
    _assert_same(_step(fused, x, rcl), _step(plain, x, rcl))  # the residual's layout: the same
    assert checked.n == 2


def test_bad_input_after_planning_raises_and_writes_nothing():
    fused, _ = _fused_and_plain()
    x = torch.randn(2, 4, 6, 6)
    _step(fused, x, torch.randn(2, 6, 6, 6)), _step(fused, x, torch.randn(2, 6, 6, 6))
    assert train_plan._plans
    state = copy.deepcopy(fused.state_dict())
    bad = [((x, torch.randn(2, 6, 5, 5)), "residual"),
           ((x, torch.randn(2, 6, 6, 6, dtype=torch.float64)), "residual"),
           ((torch.randn(2, 5, 6, 6), torch.randn(2, 6, 6, 6)), "channels"),
           ((x, torch.randn(2, 6, 6, 6, dtype=torch.float64).int()), "residual")]
    for (xb, rb), match in bad:
        with pytest.raises(ResfuseInputError, match=match):
            fused(xb.requires_grad_(), rb)
        for k, v in fused.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_not_planned(monkeypatch):
    """Calls the plans leave to the checked path, with its results."""
    x = torch.randn(2, 4, 6, 6)
    cases = {
        "reflect padding": lambda: _fused_and_plain(padding_mode="reflect"),
        "low memory": lambda: _low(_fused_and_plain()),
        "synchronised BN": lambda: _sync(_fused_and_plain()),
    }
    for what, make in cases.items():
        fused, plain = make()
        for _ in range(2):
            _assert_same(_step(fused, x), _step(plain, x))
        assert not train_plan._plans, what
    fused, plain = _fused_and_plain()
    _step(fused, x)
    assert train_plan._plans
    checked = _CheckedCalls(monkeypatch)
    with torch.no_grad():  # no gradients: the checked path's op alone
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-6, atol=1e-6)
    assert checked.n == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x.requires_grad_())
    assert y.dtype == torch.bfloat16 and checked.n > 1
    before = checked.n
    with resfuse.use_backend("pieces"):  # a backend asked for: honoured
        _step(fused, x)
    assert checked.n == before + 1


def _low(pair):
    fused, plain = pair
    fused.memory = "low"
    return fused, plain


def _sync(pair):
    fused, plain = pair
    bn = resfuse.SyncBatchNorm(fused.bn.num_features)
    bn.load_state_dict(fused.bn.state_dict())
    fused.bn = bn.train()
    return fused, plain


def test_switched_off(monkeypatch):
    fused, plain = _fused_and_plain()
    x = torch.randn(2, 4, 6, 6)
    _step(fused, x), _step(plain, x)
    checked = _CheckedCalls(monkeypatch)
    with train_plan.disabled():
        for _ in range(2):
            _assert_same(_step(fused, x), _step(plain, x))
    assert checked.n == 2 and train_plan._enabled
    _assert_same(_step(fused, x), _step(plain, x))
    assert checked.n == 2


def _edit_padding_mode(conv, bn):
    conv.padding_mode = "reflect"  # (nn.Conv2d honours it: its reflect padding was made at init)


def _edit_data_kernel(conv, bn):
    # (the Parameter kept, its storage swapped; with padding="same", a 5x5 kernel pads by 2)
    conv.weight.data = torch.randn(conv.weight.shape[:2] + (5, 5))


def _edit_padding_in_place(conv, bn):
    conv.padding[0] = 0  # (a list: edited where the module holds it)


@pytest.mark.parametrize("conv_first", [True, False])
@pytest.mark.parametrize("edit", [_edit_padding_mode, _edit_data_kernel, _edit_padding_in_place],
                         ids=lambda f: f.__name__[6:])
def test_edits_the_identities_do_not_show(edit, conv_first):
    """Edits that keep every object: a padding mode, a weight's storage swapped through
    `.data`, a padding list edited in place. The next call follows them (checked again), on
    both the post- and the pre-activation path."""
    from resfuse.modules import bn_act_conv_modules, conv_bn_act_modules
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(6, 6, 3), randomize_bn(nn.BatchNorm2d(6))
    conv.padding = "same" if edit is _edit_data_kernel else [1, 1]
    plain_conv, plain_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    act = resfuse.activations.as_activation("relu")
    x = torch.randn(2, 6, 8, 8)

    def fused(t):
        return (conv_bn_act_modules(t, conv, bn, act) if conv_first
                else bn_act_conv_modules(t, bn, conv, act))

    def plain(t):
        return (act.forward(plain_bn(plain_conv(t))) if conv_first
                else plain_conv(act.forward(plain_bn(t))))
    for step in range(3):
        if step == 2:
            for c, b in ((conv, bn), (plain_conv, plain_bn)):
                torch.manual_seed(1)
                edit(c, b)
        yf, yp = fused(x.clone().requires_grad_()), plain(x.clone().requires_grad_())
        assert yf.shape == yp.shape
        torch.testing.assert_close(yf, yp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_mean, plain_bn.running_mean)
        assert train_plan._plans


def test_modules_computing_their_weight_are_not_planned():
    """Pruning (and parametrizations, weight norm) keep the weight outside the parameter
    dict: such pairs take the checked path, also where the parametrization came after a plan
    was made."""
    import torch.nn.utils.prune as prune
    from torch.nn.utils import parametrize
    fused, plain = _fused_and_plain()
    x = torch.randn(2, 4, 6, 6)
    prune.l1_unstructured(fused.conv, "weight", amount=0.5)
    prune.l1_unstructured(plain.conv, "weight", amount=0.5)
    # (One step: pruning recomputes the weight in the conv's forward pre-hook, which a fused
    # module does not call.)
    _assert_same(_step(fused, x), _step(plain, x))
    assert not train_plan._plans

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w
    fused, plain = _fused_and_plain()
    for _ in range(2):
        _assert_same(_step(fused, x), _step(plain, x))
    assert train_plan._plans
    for m in (fused, plain):
        parametrize.register_parametrization(m.bn, "weight", Doubled())
    for _ in range(2):
        _assert_same(_step(fused, x), _step(plain, x))


def test_a_bad_counter_after_planning_is_refused():
    fused, _ = _fused_and_plain()
    x = torch.randn(2, 4, 6, 6)
    _step(fused, x), _step(fused, x)
    fused.bn.num_batches_tracked.data = torch.tensor([0, 0])
    state = copy.deepcopy(fused.state_dict())
    with pytest.raises(ResfuseInputError, match="num_batches_tracked"):
        fused(x.requires_grad_())
    for k, v in fused.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_an_activation_module_is_not_planned():
    """An activation given as a module may change (a LeakyReLU's slope): not planned."""
    from resfuse.modules import conv_bn_act_modules
    conv, bn = _pair()
    act = nn.LeakyReLU(0.1)
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    conv_bn_act_modules(x, conv, bn, act)
    assert not train_plan._plans
    act.negative_slope = 0.5
    y = conv_bn_act_modules(x, conv, bn, act)
    z = bn(conv(x))  # (the same batch: BN's output as the op normalized it)
    torch.testing.assert_close(y, torch.where(z > 0, z, 0.5 * z), rtol=1e-5, atol=1e-5)


def test_gradcheck_through_the_plan():
    conv, bn = _pair()
    fused = resfuse.FusedConvBNAct.from_modules(conv, bn, "silu").double().train()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    fused(x, r)
    assert train_plan._plans
    assert torch.autograd.gradcheck(lambda a, b: fused(a, b), (x, r))


def test_plans_go_with_their_modules():
    fused, _ = _fused_and_plain()
    _step(fused, torch.randn(2, 4, 6, 6))
    assert len(train_plan._plans) == 1
    del fused
    gc.collect()
    assert not train_plan._plans


def _two_steps_by_plans(plain):
    """Two forward and backward passes of `plain` and of its converted copy: the same results
    (the second through the plans)."""
    torch.manual_seed(0)
    plain = randomize_bn(plain).train()
    fused = copy.deepcopy(plain)
    assert resfuse.convert(fused).swapped
    x = torch.randn(2, 3, 48, 48)
    for _ in range(2):
        _assert_same(_step_keep(fused, x), _step_keep(plain, x), tol=1e-5)
        for m in (plain, fused):
            m.zero_grad()
    assert train_plan._plans


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_real_torchvision_training_by_plans(name):
    tv = pytest.importorskip("torchvision")
    _two_steps_by_plans(getattr(tv.models, name)(num_classes=5))


@pytest.mark.parametrize("name", ["resnet18", "resnet50d"])
def test_real_timm_training_by_plans(name):
    timm = pytest.importorskip("timm")
    _two_steps_by_plans(timm.create_model(name, num_classes=5))
