"""Stage programs (resfuse.stage_program): a FusedStage's CPU eval forward without gradients
is captured once and replayed as its oneDNN calls alone. A replay must give the modules'
results bit for bit (the same calls in the same order), and must never run once anything it
was captured from has changed: weights (in place, by an optimizer, by load_state_dict, by a
new Parameter or `.data`), BN mode, the stage's or a block's modules, activation, hooks."""
import copy
import gc
import threading
import weakref

import pytest
import torch
import torch.nn as nn

import resfuse
from resfuse import eval_plan, models, reference, stage_program, value_bounds
from resfuse.activations import as_activation
from conftest import randomize_bn

CL = torch.channels_last

pytestmark = [pytest.mark.usefixtures("fresh_eval_plans"),
              pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                 reason="no oneDNN in this torch")]


@pytest.fixture(autouse=True)
def programs_on():
    old = stage_program.set_enabled(True)
    yield
    stage_program.set_enabled(old)


@pytest.fixture
def replays(monkeypatch):
    """How many stage calls a program answered (replay returned a tensor)."""
    count = {"n": 0}
    real = stage_program.replay

    def counting(stage, x):
        y = real(stage, x)
        count["n"] += y is not None
        return y
    monkeypatch.setattr(stage_program, "replay", counting)
    return count


def _resnet(name, layout="nchw", dtype=torch.float32):
    torch.manual_seed(0)
    plain = randomize_bn(getattr(models, name)(num_classes=5)).eval().to(dtype)
    plain.to(memory_format=CL if layout == "channels_last" else torch.contiguous_format)
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    return plain, fused


def _input(layout="nchw", dtype=torch.float32, batch=2, side=64):
    x = torch.randn(batch, 3, side, side, dtype=dtype)
    return x.contiguous(memory_format=CL) if layout == "channels_last" else x


def _modules_path(model, x):
    """The model's output with stage programs off (the stages run through their modules)."""
    with stage_program.disabled():
        return model(x)


def _close(got, want, dtype=torch.float32):
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert (got.float() - want.float()).abs().max().item() <= tol * want.float().abs().max().item()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_replay_gives_the_modules_results_bit_for_bit(name, layout, dtype, mode, replays):
    plain, fused = _resnet(name, layout, dtype)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        x = _input(layout, dtype)
        want = plain(x)
        first = fused(x)  # plans made (and, for a projection's first sum, a copy)
        assert replays["n"] == 0
        second = fused(x)  # captured, if not already
        third = fused(x)
        assert replays["n"] >= 4  # the four stages, at the third call at the latest
        modules = _modules_path(fused, x)
        for got in (first, second, third):
            assert torch.equal(got, modules)
        _close(third, want, dtype)
        # a fresh input of the same kind: replayed, and the modules' values again
        x2 = _input(layout, dtype)
        n = replays["n"]
        got = fused(x2)
        assert replays["n"] == n + 4 and torch.equal(got, _modules_path(fused, x2))
        _close(got, plain(x2), dtype)


def _warm(fused, x, replays):
    with torch.no_grad():
        for _ in range(3):
            fused(x)
    assert replays["n"] >= 4


def _check(plain, fused, x, replays=None):
    with torch.no_grad():
        n = None if replays is None else replays["n"]
        got, want = fused(x), plain(x)
        _close(got, want)
        assert torch.equal(got, _modules_path(fused, x))
        again = fused(x)  # (captured again where the change dropped the program)
        assert torch.equal(again, got)
    return n


def _both(plain, fused, edit):
    edit(plain)
    edit(fused)


def _scale_in_place(m):
    with torch.no_grad():
        m.layer2[0].conv1.weight.mul_(1.7)
        m.layer3[1].bn2.running_var.mul_(3.0)


def _new_parameter(m):
    torch.manual_seed(5)
    conv = m.layer4[0].conv2
    conv.weight = nn.Parameter(torch.randn_like(conv.weight) * 0.05)


def _set_data(m):
    with torch.no_grad():
        w = m.layer1[1].conv2.weight
        w.data = w.data * -1.0  # a new storage, no version bump


def _new_buffer(m):
    bn = m.layer3[0].bn1
    bn.running_mean = torch.full_like(bn.running_mean, 0.3)


@pytest.mark.parametrize("edit", [_scale_in_place, _new_parameter, _set_data, _new_buffer],
                         ids=["in-place", "new Parameter", ".data", "new buffer"])
def test_a_weight_change_is_seen_on_the_next_call(edit, replays):
    plain, fused = _resnet("resnet18")
    x = _input()
    _warm(fused, x, replays)
    _both(plain, fused, edit)
    _check(plain, fused, x)


def test_load_state_dict_and_an_optimizer_step_are_seen(replays):
    plain, fused = _resnet("resnet18")
    x = _input()
    _warm(fused, x, replays)
    torch.manual_seed(1)
    other = randomize_bn(models.resnet18(num_classes=5))
    plain.load_state_dict(other.state_dict())
    fused.load_state_dict(other.state_dict())
    _check(plain, fused, x)
    # a training step (BN statistics and weights change), then eval again
    fused.train()
    opt = torch.optim.SGD(fused.parameters(), lr=0.1)
    fused(_input()).square().mean().backward()
    opt.step()
    fused.eval()
    plain.load_state_dict(fused.state_dict())
    _check(plain, fused, x)


def test_module_changes_are_seen(replays):
    plain, fused = _resnet("resnet18")
    x = _input()
    _warm(fused, x, replays)
    # a BN back in training mode (batch statistics under no_grad; momentum 0 keeps the
    # running statistics, which each of the several calls would otherwise move)
    _both(plain, fused, lambda m: setattr(m.layer2[1].bn1, "momentum", 0.0))
    _both(plain, fused, lambda m: m.layer2[1].bn1.train())
    _check(plain, fused, x)
    _both(plain, fused, lambda m: m.layer2[1].bn1.eval())
    _check(plain, fused, x)
    n = _check(plain, fused, x, replays)
    assert replays["n"] >= n + 4  # (a BN that was in training for a while stops nothing)
    # a block replaced, and a block's activation changed
    torch.manual_seed(3)
    block = randomize_bn(reference.ResidualBlock(128, 128)).eval()
    plain.layer2[1] = copy.deepcopy(block)
    b = copy.deepcopy(block)
    fused.layer2[1] = resfuse.FusedResidualBlock.from_modules(b.conv1, b.bn1, b.conv2, b.bn2)
    _check(plain, fused, x)
    _both(plain, fused, lambda m: setattr(m.layer3[0], "activation", as_activation("silu")))
    _check(plain, fused, x)


def test_hooks_and_an_own_forward_are_called(replays):
    plain, fused = _resnet("resnet18")
    x = _input()
    _warm(fused, x, replays)
    seen = []
    handle = fused.layer3[1].register_forward_hook(lambda m, a, y: seen.append(y.shape))
    _check(plain, fused, x)
    assert len(seen) == 3
    handle.remove()
    n = _check(plain, fused, x, replays)
    assert replays["n"] > n  # programs again once the hook is gone
    block = fused.layer1[0]
    block.forward = lambda t: reference.ResidualBlock.forward(block, t)  # an instance's own
    _check(plain, fused, x)


def test_with_gradients_the_modules_run(replays):
    plain, fused = _resnet("resnet18")
    x = _input()
    _warm(fused, x, replays)
    n = replays["n"]
    y = fused(x)  # eval, but gradients enabled: the checked path, with a graph
    assert replays["n"] == n and y.requires_grad
    _close(y, plain(x))
    y.sum().backward()
    assert fused.layer2[0].conv1.weight.grad is not None


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_nan_reaches_the_output_as_in_eager(mode, replays):
    plain, fused = _resnet("resnet50", "channels_last")
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    x = _input("channels_last")
    with ctx():
        for _ in range(3):
            fused(x)
        assert replays["n"] >= 4
        bad = x.clone()
        bad[0, :, 10, 20] = float("nan")
        got, want = fused(bad), plain(bad)
        assert want[0].isnan().all() and torch.equal(got.isnan(), want.isnan())
        # a NaN weight written in place after capture: the program is dropped, eager's NaN
        with torch.no_grad():
            plain.layer3[2].conv2.weight[0, 0, 0, 0] = float("nan")
            fused.layer3[2].conv2.weight[0, 0, 0, 0] = float("nan")
        got, want = fused(x), plain(x)
        assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())
        assert torch.equal(fused(x).isnan(), want.isnan())


def _stage_of(blocks):
    holder = nn.Sequential(nn.Sequential(*blocks))
    resfuse.convert(holder)
    assert type(holder[0]) is resfuse.FusedStage
    return holder[0].eval()


def _block(cin, cout, stride=1, pool=False, bottleneck=False):
    width = cout // 4 if bottleneck else cout
    ds = None
    if stride != 1 or cin != cout:
        layers = [reference.conv1x1(cin, cout, 1 if pool else stride), nn.BatchNorm2d(cout)]
        if pool:
            layers.insert(0, nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False))
        ds = nn.Sequential(*layers)
    b = reference.ResidualBlock(cin, width, stride, downsample=ds, bottleneck=bottleneck)
    return randomize_bn(b).eval()


@pytest.mark.parametrize("pool", [False, True], ids=["conv projection", "avg-pool projection"])
def test_a_projection_stage_replays(pool, replays):
    torch.manual_seed(0)
    blocks = [_block(16, 32, 2, pool, bottleneck=True), _block(32, 32, bottleneck=True)]
    plain = nn.Sequential(*copy.deepcopy(blocks)).eval()
    stage = _stage_of(blocks)
    x = torch.randn(2, 16, 9, 9)
    x0 = x.clone()
    with torch.no_grad():
        outs = [stage(x) for _ in range(3)]
        assert replays["n"] >= 1
        want = plain(x)
        for got in outs:
            assert torch.equal(got, _modules_path(stage, x))
        _close(outs[-1], want)
        assert torch.equal(x, x0)  # (the input is never written)
        bad = x.clone()
        bad[1, 3, 4, 4] = float("nan")
        w = plain(bad)
        assert torch.equal(stage(bad).isnan(), w.isnan()) and w[1].isnan().any()


def test_a_refused_call_in_a_replay_runs_the_modules(replays):
    plain, fused = _resnet("resnet18")
    x = _input()
    _warm(fused, x, replays)
    progs = stage_program._programs[id(fused.layer2)]
    (key, prog), = progs.items()
    step = list(prog.steps[1])

    def refusing(*args):
        raise RuntimeError("oneDNN refused")
    step[1] = refusing
    prog.steps = (prog.steps[0], tuple(step)) + prog.steps[2:]
    with torch.no_grad():
        got = fused(x)
        _close(got, plain(x))
        assert torch.equal(got, _modules_path(fused, x))
        # the same call ran the modules and captured afresh (had oneDNN gone on refusing,
        # that capture would fail too, and two failures stop the captures of this input)
        assert type(progs[key]) is stage_program._Program and progs[key] is not prog
        n = replays["n"]
        assert torch.equal(fused(x), got) and replays["n"] == n + 4


def test_stages_a_program_cannot_stand_for_run_their_modules(replays):
    torch.manual_seed(0)
    blocks = [_block(8, 8), _block(8, 8)]
    stage = _stage_of(blocks)
    stage.insert(1, nn.Identity())  # not a fused block
    plain = nn.Sequential(*copy.deepcopy(blocks)).eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        for _ in range(3):
            got = stage(x)
    assert replays["n"] == 0 and id(stage) not in stage_program._programs
    _close(got, plain(x))


def test_off_cleared_and_gone_with_the_model(replays):
    plain, fused = _resnet("resnet18")
    x = _input()
    _warm(fused, x, replays)
    assert len(stage_program._programs) == 4
    eval_plan.clear_plans()
    assert not stage_program._programs
    n = replays["n"]
    with stage_program.disabled(), torch.no_grad():
        for _ in range(3):
            fused(x)
    assert replays["n"] == n and not stage_program._programs
    _warm(fused, x, replays)
    ref = weakref.ref(fused.layer1)
    del fused
    gc.collect()
    assert ref() is None and not stage_program._programs


def test_input_kinds_each_have_a_program(replays):
    plain, fused = _resnet("resnet18")
    kinds = [_input(), _input("channels_last"), _input(batch=1), _input(side=48)]
    with torch.no_grad():
        for x in kinds:
            for _ in range(3):
                got = fused(x)
            assert torch.equal(got, _modules_path(fused, x))
            _close(got, plain(x))
    # (the stem hands every stage a channels_last input: NCHW and channels_last model inputs
    # are one kind of stage input)
    assert all(len(p) == len(kinds) - 1 for p in stage_program._programs.values())
    with torch.no_grad():  # more kinds than are kept: started over, still right
        for side in range(33, 33 + stage_program._MAX_KEYS):
            x = _input(batch=1, side=side)
            for _ in range(2):
                _close(fused(x), plain(x))
    assert all(len(p) <= stage_program._MAX_KEYS for p in stage_program._programs.values())


def test_a_capture_records_only_its_own_thread():
    plain, fused = _resnet("resnet18")
    x = torch.randn(2, 64, 16, 16)
    events, started, done = [], threading.Event(), threading.Event()

    def recording():  # another thread's capture in progress
        old = eval_plan.set_recorder(events)
        started.set()
        done.wait(10)
        eval_plan.set_recorder(old)
    other = threading.Thread(target=recording)
    other.start()
    started.wait(10)
    try:
        with torch.no_grad():
            fused.layer1(x)
    finally:
        done.set()
        other.join()
    assert events == [] and eval_plan._recorders == 0


def test_threads_capturing_and_replaying_at_once(replays):
    """Several threads run one model at once from its first call (captures overlapping):
    every output is the modules' and no recorder is left set."""
    plain, fused = _resnet("resnet18")
    xs = [_input() for _ in range(4)]
    with torch.no_grad():
        want = [_modules_path(fused, x) for x in xs]
    eval_plan.clear_plans()
    got, errors = {}, []

    def run(i):
        try:
            with torch.no_grad():
                for k in range(4):
                    got[i, k] = fused(xs[i])
        except Exception as e:  # (reported below)
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(y, want[i]) for (i, _), y in got.items())
    assert eval_plan._recorders == 0 and replays["n"] > 0


def test_the_output_carries_its_bound_to_the_next_stage(replays):
    plain, fused = _resnet("resnet50")
    x = _input()
    _warm(fused, x, replays)
    with torch.no_grad():
        h = fused.maxpool(fused.relu(fused.bn1(fused.conv1(x))))
        y = fused.layer1(h)
    b = value_bounds.known(y)
    assert b is not None and y.abs().max().item() <= b


def test_under_inference_mode_a_replay_fuses_every_relu(replays):
    """The stage's measured input bounds its first block's shortcut too: every ReLU of
    ResNet-18's first stage runs as oneDNN's in a replay (the modules, which cannot trust an
    inference tensor's bound as a residual, run torch's for that block: tests/test_value_bounds.py)."""
    plain, fused = _resnet("resnet18")
    x = _input()
    with torch.inference_mode():
        for _ in range(3):
            fused(x)
        assert replays["n"] >= 4
        (key, prog), = stage_program._programs[id(fused.layer1)].items()
        unaries = []

        def spying(op, kind):
            def call(*args):
                unaries.append(args[7] if kind == stage_program._NO_RESIDUAL else args[10])
                return op(*args)
            return call
        prog.steps = tuple(tuple(s[:1]) + (spying(s[1], s[0]),) + tuple(s[2:])
                           for s in prog.steps)
        got = fused(x)
        _close(got, plain(x))
    assert unaries == ["relu"] * 4


# ---- the torchvision and timm mirrors (tests/mirrors.py), and the real models where they import

import mirrors  # noqa: E402


def _replays_like_the_modules(plain, fused, replays, side=64):
    """Converted `fused` (a copy of `plain`, eval): replayed, the modules' values and eager's,
    a NaN pixel poisoning its image as in eager."""
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        for _ in range(3):
            got = fused(x)
        assert replays["n"] >= 4
        assert torch.equal(got, _modules_path(fused, x))
        _close(got, plain(x))
        bad = x.clone()
        bad[0, :, side // 2, side // 3] = float("nan")
        want = plain(bad)
        assert torch.equal(fused(bad).isnan(), want.isnan()) and want[0].isnan().all()


@pytest.mark.parametrize("name", ["tv_resnet50", "tv_resnext50_32x4d", "timm_resnet18",
                                  "timm_resnet50d"])
def test_mirrors_replay(name, replays):
    torch.manual_seed(0)
    plain = randomize_bn(getattr(mirrors, name)(num_classes=10)).eval()
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    _replays_like_the_modules(plain, fused, replays)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_real_torchvision_models_replay(name, replays):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    plain = randomize_bn(getattr(tv.models, name)(num_classes=10)).eval()
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    _replays_like_the_modules(plain, fused, replays)


@pytest.mark.parametrize("name", ["resnet18", "resnet50d", "resnet26t"])
def test_real_timm_models_replay(name, replays):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    plain = randomize_bn(timm.create_model(name, num_classes=10)).eval()
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    _replays_like_the_modules(plain, fused, replays)


def test_a_non_finite_weight_with_a_zero_input_keeps_its_nan():
    """0 * inf: a zero input's bound (0) times a NaN weight's gain (inf) is NaN, which must
    count as no bound (oneDNN's ReLU would turn the NaN into 0)."""
    torch.manual_seed(0)
    blocks = [_block(8, 8), _block(8, 8)]
    with torch.no_grad():
        blocks[0].conv1.weight[0, 0, 0, 0] = float("nan")
    plain = nn.Sequential(*copy.deepcopy(blocks)).eval()
    stage = _stage_of(blocks)
    x = torch.zeros(2, 8, 6, 6)
    with torch.no_grad():
        want = plain(x)
        assert want.isnan().any()
        for _ in range(3):
            got = stage(x)
            assert torch.equal(got.isnan(), want.isnan())
    assert any(type(p) is stage_program._Program
               for p in stage_program._programs[id(stage)].values())


@pytest.mark.parametrize("bad", [float("inf"), -float("inf")])
def test_an_infinite_pixel_as_in_eager(bad, replays):
    plain, fused = _resnet("resnet50")
    x = _input()
    _warm(fused, x, replays)
    x = x.clone()
    x[1, 0, 7, 9] = bad
    with torch.no_grad():
        got, want = fused(x), plain(x)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert not want[1].isfinite().all() and want[0].isfinite().all()


def test_backend_choice_and_switches_after_capture(replays, monkeypatch):
    from resfuse.backend import eager
    plain, fused = _resnet("resnet18")
    x = _input()
    _warm(fused, x, replays)

    def no_replay(*ctx):
        n = replays["n"]
        _check(plain, fused, x)
        assert replays["n"] == n
    old = eager.set_cpu_fused_conv(False)
    try:
        no_replay()
    finally:
        eager.set_cpu_fused_conv(old)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        n = replays["n"]
        with torch.no_grad():
            fused(x)
        assert replays["n"] == n
    with resfuse.use_backend("pieces"):
        no_replay()
    monkeypatch.setenv("RESFUSE_BACKEND", "pieces")
    no_replay()
    monkeypatch.delenv("RESFUSE_BACKEND")
    fused.layer2[1].backend = "pieces"
    n = replays["n"]
    _check(plain, fused, x)
    assert replays["n"] <= n + 6  # (layer2 no longer replays: its block asks for another backend)
    fused.layer2[1].backend = None
    _check(plain, fused, x)


def test_a_downsample_replaced_or_an_identity_pool(replays):
    torch.manual_seed(0)
    blocks = [_block(8, 16, 1), _block(16, 16)]
    ds = blocks[0].downsample
    blocks[0].downsample = nn.Sequential(nn.Identity(), ds[0], ds[1])  # timm's stride-1 ResNet-D
    plain = nn.Sequential(*copy.deepcopy(blocks)).eval()
    stage = _stage_of(blocks)
    x = torch.randn(2, 8, 7, 7)
    x0 = x.clone()
    with torch.no_grad():
        for _ in range(3):
            got = stage(x)
        assert replays["n"] >= 1 and torch.equal(x, x0)
        assert torch.equal(got, _modules_path(stage, x))
        _close(got, plain(x))
        torch.manual_seed(4)
        new = randomize_bn(nn.Sequential(reference.conv1x1(8, 16), nn.BatchNorm2d(16))).eval()
        plain[0].downsample = copy.deepcopy(new)
        stage[0].downsample = copy.deepcopy(new)
        got = stage(x)
        _close(got, plain(x))
        assert torch.equal(got, _modules_path(stage, x)) and torch.equal(stage(x), got)


def test_a_pool_changed_after_capture(replays):
    torch.manual_seed(0)
    blocks = [_block(8, 16, 2, pool=True), _block(16, 16)]
    plain = nn.Sequential(*copy.deepcopy(blocks)).eval()
    stage = _stage_of(blocks)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        for _ in range(3):
            stage(x)
        assert replays["n"] >= 1
        for m in (plain, stage):
            m[0].downsample[0].ceil_mode = False  # another output shape (4x4, not 5x5)
        with pytest.raises(RuntimeError):
            plain(x)  # (the shapes no longer add up: eager refuses)
        with pytest.raises(Exception):
            stage(x)


def test_to_another_dtype_and_back_after_capture(replays):
    plain, fused = _resnet("resnet18")
    x = _input()
    _warm(fused, x, replays)
    for m in (plain, fused):
        m.double()
    with torch.no_grad():
        _close(fused(x.double()), plain(x.double()))
    for m in (plain, fused):
        m.float()
    _check(plain, fused, x)


def test_a_stale_program_drops_the_other_input_kinds(replays):
    plain, fused = _resnet("resnet18")
    a, b = _input(), _input(side=48)
    _warm(fused, a, replays)
    _warm(fused, b, replays)
    assert all(len(p) == 2 for p in stage_program._programs.values())
    _both(plain, fused, _scale_in_place)
    _check(plain, fused, a)
    # layer2's and layer3's weights changed: their programs for `b` went with the stale ones
    # for `a`; layer1's and layer4's are still current, both kept
    counts = [len(stage_program._programs[id(getattr(fused, f"layer{i}"))]) for i in range(1, 5)]
    assert counts == [2, 1, 1, 2]
