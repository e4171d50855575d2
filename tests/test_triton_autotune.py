"""The opt-in tile autotuner (triton_kernels/tiles.py, RESFUSE_TRITON_AUTOTUNE=1): off by
default and off the GPU; picks the fastest candidate, keeps it for the process and, with
RESFUSE_TRITON_AUTOTUNE_CACHE, across processes; skips a candidate that fails; and every
candidate of every convolution kernel computes the right result. Timing means nothing in the
interpreter, so the selection is checked with a fake clock (tiles._bench) and the candidates
are run on CPU tensors by forcing tuning there (tiles._TUNE_ON_CPU). The GPU test of tuned
blocks is in test_triton_gpu.py."""
import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # (TRITON_INTERPRET=1 without a GPU: tests/conftest.py)

from resfuse.triton_kernels import bn_act as BA, conv as TC, conv_backward as CB  # noqa: E402
from resfuse.triton_kernels import tiles as T  # noqa: E402

CPU = torch.device("cpu")
PROBLEM = dict(rows=300, cols=40, red=24, dtype=torch.float32)


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch, no_tf32):
    """Each test starts with no choices and no cache file read, autotuning off."""
    monkeypatch.setattr(T, "_chosen", {})
    monkeypatch.setattr(T, "_cache_loaded", {})
    monkeypatch.delenv(T.AUTOTUNE_ENV, raising=False)
    monkeypatch.delenv(T.AUTOTUNE_CACHE_ENV, raising=False)


def _tune_here(monkeypatch, clock):
    """Autotuning on, on the CPU, with `clock(fn) -> ms` as the timer."""
    monkeypatch.setenv(T.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(T, "_TUNE_ON_CPU", True)
    monkeypatch.setattr(T, "_bench", clock)


def _pick(run, key=("k",), **problem):
    p = dict(PROBLEM, **problem)
    return T.pick_tiles("test", key, run, CPU, p["rows"], p["cols"], p["red"], p["dtype"],
                        precision="ieee")


def _default(**problem):
    p = dict(PROBLEM, **problem)
    return T.gemm_tiles(p["rows"], p["cols"], p["red"], p["dtype"], False, precision="ieee")


def test_off_by_default_and_off_the_gpu(monkeypatch):
    ran = []
    assert _pick(ran.append) == _default() and ran == []
    monkeypatch.setenv(T.AUTOTUNE_ENV, "1")  # on, but a CPU tensor: the interpreter's tiles
    assert _pick(ran.append) == _default() and ran == []
    monkeypatch.setenv(T.AUTOTUNE_ENV, "0")
    monkeypatch.setattr(T, "_TUNE_ON_CPU", True)
    assert _pick(ran.append) == _default() and ran == []


def test_candidates_start_with_the_default_and_fit_the_problem():
    for dtype, precision in [(torch.float16, "tf32"), (torch.bfloat16, "tf32"),
                             (torch.float32, "tf32"), (torch.float32, "ieee"),
                             (torch.float64, "ieee")]:
        for rows, cols, red, operands in [(8192, 256, 256, 1), (100, 4, 4, 3), (50176, 64, 576, 3),
                                          (64, 2304, 12544, 1)]:
            got = T.gemm_candidates(rows, cols, red, dtype, operands=operands,
                                    precision=precision)
            base = T.gemm_tiles(rows, cols, red, dtype, True, operands=operands,
                                precision=precision)
            assert got[0] == base and len(got) == len(set(got)) > 2
            for t in got:
                for size, dim, floor in [(t.rows, rows, base.rows), (t.cols, cols, base.cols),
                                         (t.red, red, base.red)]:
                    assert size >= 16 and size & (size - 1) == 0  # a power of two for tl.dot
                    assert size <= max(floor, T._pow2(dim, 16, 256))  # no wider than needed
                assert t.num_warps in (4, 8) and t.num_stages in (2, 3, 4)


def _candidates():
    return T.gemm_candidates(PROBLEM["rows"], PROBLEM["cols"], PROBLEM["red"], PROBLEM["dtype"],
                             precision="ieee")


def _out_of_resources():
    from triton.runtime.errors import OutOfResources
    return OutOfResources(300000, 232448, "shared memory")


def test_picks_the_fastest_skips_failures_and_keeps_the_choice(monkeypatch):
    candidates = _candidates()
    fastest, broken = candidates[2], candidates[1]
    times = {t: 1.0 + i for i, t in enumerate(candidates)}
    times[fastest] = 0.5
    times[broken] = 0.1  # would win, but does not fit

    def run(t):
        ran.append(t)
        if t == broken:
            raise _out_of_resources()
        return t

    _tune_here(monkeypatch, lambda fn: times[fn()])
    ran = []
    assert _pick(run) == fastest
    assert set(ran) == set(candidates)  # each timed (the broken one tried once)
    ran.clear()
    assert _pick(run) == fastest and ran == []  # kept: not timed again
    assert _pick(run, key=("other",)) == fastest and ran  # another key is tuned on its own


def test_a_bug_is_raised_not_skipped(monkeypatch):
    def run(t):
        raise TypeError("a bug in the launcher")
    _tune_here(monkeypatch, lambda fn: fn())
    with pytest.raises(TypeError, match="a bug"):
        _pick(run)


def test_when_nothing_fits_the_default_is_left_to_raise_and_nothing_is_kept(monkeypatch,
                                                                             tmp_path):
    path = tmp_path / "tiles.json"
    monkeypatch.setenv(T.AUTOTUNE_CACHE_ENV, str(path))
    ran = []

    def run(t):
        ran.append(t)
        raise _out_of_resources()
    _tune_here(monkeypatch, lambda fn: fn())
    assert _pick(run) == _default() and T._chosen == {} and not path.exists()
    assert len(ran) == len(_candidates())


def test_inside_graph_capture_the_default_is_kept_for_the_process(monkeypatch):
    ran = []
    _tune_here(monkeypatch, lambda fn: fn() or 1.0)
    monkeypatch.setattr(T, "_capturing", lambda device: True)
    assert _pick(ran.append) == _default() and ran == []
    monkeypatch.setattr(T, "_capturing", lambda device: False)
    assert _pick(ran.append) == _default() and ran == []  # the same tiles as in the graph


def test_choices_survive_the_process_through_the_cache_file(monkeypatch, tmp_path):
    path = tmp_path / "sub" / "tiles.json"
    monkeypatch.setenv(T.AUTOTUNE_CACHE_ENV, str(path))
    want = _candidates()[-1]
    _tune_here(monkeypatch, lambda fn: 0.0 if fn() == want else 1.0)
    assert _pick(lambda t: t) == want
    saved = json.loads(path.read_text())
    assert list(saved.values()) == [list(want)]

    def new_process():  # only the file remembers
        monkeypatch.setattr(T, "_chosen", {})
        monkeypatch.setattr(T, "_cache_loaded", {})
    new_process()
    ran = []
    assert _pick(ran.append) == want and ran == []
    for damaged in ("{not json", json.dumps({k: [1, 2] for k in saved}),
                    json.dumps({k: [9999, 16, 16, 4, 2] for k in saved})):
        path.write_text(damaged)  # unreadable, malformed, or not a candidate: tuned again
        new_process()
        assert _pick(lambda t: t) == want
        assert list(json.loads(path.read_text()).values()) == [list(want)]


def test_the_first_choice_written_wins(monkeypatch, tmp_path):
    """Two processes tuning the same problem at once: the second adopts the first's choice."""
    path = tmp_path / "tiles.json"
    monkeypatch.setenv(T.AUTOTUNE_CACHE_ENV, str(path))
    mine, theirs = _candidates()[1], _candidates()[2]
    name = T._problem_name("test", ("k",), CPU)

    def clock(fn):
        if not path.exists():  # the other process finishes while this one is timing
            path.write_text(json.dumps({name: list(theirs)}))
        return 0.0 if fn() == mine else 1.0
    _tune_here(monkeypatch, clock)
    assert _pick(lambda t: t) == theirs
    assert json.loads(path.read_text()) == {name: list(theirs)}


# ------------------------------------------------------- every candidate computes the right thing

# float64 on a GPU only: in the interpreter the index math does not depend on the dtype, and
# float64's list adds one tile to float32's, (32, 32, 16), whose row and column widths the
# float32 tiles (32, 64, 16) and (64, 32, 16) each run (float64 took 90 s of CI's 2 cores).
GPU = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float64] if GPU else [torch.float32]


def _record_every_candidate(monkeypatch):
    """Tuning on the CPU with a clock that keeps each candidate's result; the last candidate
    is the fastest (so the launcher's own result comes from a non-default tile)."""
    results = []

    def clock(fn):
        results.append(fn())
        return 1.0 / len(results)
    _tune_here(monkeypatch, clock)
    return results


def _close(a, b, dtype):
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    scale = b.abs().max().clamp_min(1)
    assert (a - b).abs().max() <= tol * scale


def _data(dtype, channels_last, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 80, 9, 9, generator=gen, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(COUT, 40, 3, 3, generator=gen, dtype=dtype) / 20
    scale = torch.rand(80, generator=gen, dtype=dtype) + 0.5
    shift = torch.randn(80, generator=gen, dtype=dtype)
    return x, w, scale, shift


# Two groups of 40 -> 72 channels: several K steps, and more than one column tile for some
# candidates; 2x5x5 outputs: more than one row tile for 32-row candidates.
COUT = 144
CONV = dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [True, False], ids=["cl", "nchw"])
def test_every_forward_candidate(monkeypatch, dtype, channels_last):
    x, w, scale, shift = _data(dtype, channels_last)
    a = torch.relu(x * scale[:, None, None] + shift[:, None, None])
    ref = F.conv2d(a, w, None, **CONV)
    results = _record_every_candidate(monkeypatch)
    y, partials = TC.conv2d(x, w, None, *CONV.values(), prologue=TC.Prologue(scale, shift, 1, 0.0),
                            stats=True)
    assert len(results) > 2
    for y_t, partials_t in results + [(y, partials)]:
        _close(y_t, ref, dtype)
        mean, var = TC.merge_stats(partials_t)
        _close(mean, ref.mean((0, 2, 3)), dtype)
        _close(var, ref.var((0, 2, 3), unbiased=False), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_forward_candidate_with_the_eval_epilogue(monkeypatch, dtype):
    x, w, _, _ = _data(dtype, True)
    bias = torch.randn(COUT, dtype=dtype)
    res = torch.randn(2, COUT, 5, 5, dtype=dtype)
    ref = torch.relu(F.conv2d(x, w, bias, **CONV) + res)
    results = _record_every_candidate(monkeypatch)
    y, _ = TC.conv2d(x, w, bias, *CONV.values(), residual=res, act=TC.ACT_RELU)
    assert len(results) > 2
    for y_t, _ in results + [(y, None)]:
        _close(y_t, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_data_gradient_candidate(monkeypatch, dtype):
    x, w, _, _ = _data(dtype, True)
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, COUT, 5, 5, generator=gen, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    gy = torch.randn_like(z)
    mean = z.mean((0, 2, 3))
    coef = torch.randn(3, COUT, dtype=dtype, generator=gen)
    u = torch.randn_like(z)  # the saved pre-activation (BA.SAVE_INPUT-style "u")
    gz = BA.backward_apply(gy, u, BA.SAVE_INPUT, z, mean, coef, TC.ACT_SILU, 0.0)
    ref = torch.ops.aten.convolution_backward(
        gz, x, w, None, list(CONV["stride"]), list(CONV["padding"]), list(CONV["dilation"]),
        False, [0, 0], CONV["groups"], (True, False, False))[0]
    results = _record_every_candidate(monkeypatch)
    gp = CB.GradPrologue(u, BA.SAVE_INPUT, z, mean, coef, TC.ACT_SILU, 0.0)
    gx = CB.conv2d_input_grad(gy, w, x.shape, *CONV.values(), grad_prologue=gp)
    assert len(results) > 2
    for got in results + [gx]:
        _close(got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_weight_gradient_candidate(monkeypatch, dtype):
    x, w, scale, shift = _data(dtype, False)
    a = F.leaky_relu(x * scale[:, None, None] + shift[:, None, None], 0.1)
    gy = torch.randn(2, COUT, 5, 5, dtype=dtype, generator=torch.Generator().manual_seed(2))
    ref = torch.ops.aten.convolution_backward(
        gy, a, w, None, list(CONV["stride"]), list(CONV["padding"]), list(CONV["dilation"]),
        False, [0, 0], CONV["groups"], (False, True, False))[1]
    results = _record_every_candidate(monkeypatch)
    gw = CB.conv2d_weight_grad(gy, x, w.shape, *CONV.values(),
                               prologue=TC.Prologue(scale, shift, TC.ACT_LEAKY_RELU, 0.1))
    assert len(results) > 2
    for got in results:
        got = got.view(COUT, 3, 3, 40).permute(0, 3, 1, 2)  # (the launcher's own result: below)
        _close(got, ref, dtype)
    _close(gw, ref, dtype)
