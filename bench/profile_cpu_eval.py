"""Where a converted model's CPU eval time goes, beside torch.compile with freezing.

    python bench/profile_cpu_eval.py [--model resnet50] [--batch 8] [--image 160]
                                     [--layout nchw] [--calls 3] [--residual-ops] [--out DIR]

Builds the model (`resfuse.models`, torchvision's structure), converts one copy with
`resfuse.convert` and compiles another with inductor's freezing (bench's
`torch.compile(freezing)` contestant), checks that both give eager's logits, then for each
runs `--calls` profiled forward passes under `torch.profiler` and writes the ops by self CPU
time (calls, total, share) to a Markdown file `<date>-cpu-profile-<model>-...-<commit>.md`.
Interleaved medians of unprofiled calls are written beside it, so the profile's split can be
set against the wall time. What this answers: how much of the gap to freezing is in the
convolutions themselves and how much in what lies between them (Python between the calls,
max-pooling, bound measures, any ReLU pass resfuse runs after oneDNN to keep eager's NaN).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure  # noqa: E402
import suites  # noqa: E402

import resfuse  # noqa: E402
from resfuse import models  # noqa: E402


def _op_table(prof, calls: int, limit: int = 12) -> list:
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    out = ["| op | calls per forward | self CPU ms per forward | share |",
           "| --- | ---: | ---: | ---: |"]
    for e in rows[:limit]:
        out.append(f"| `{e.key}` | {e.count / calls:g} | {e.self_cpu_time_total / 1e3 / calls:.2f} "
                   f"| {e.self_cpu_time_total / total:.1%} |")
    out.append(f"| (all) | | {total / 1e3 / calls:.2f} | |")
    return out


def _minor_faults() -> int:
    try:
        import resource
    except ImportError:  # (not on Windows)
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _interleaved_medians_ms(fns: dict, repeats: int, faults: dict = None) -> dict:
    """{name: median ms} of the callables called in turn, the order reversed every round.
    `faults`, if given, gets {name: minor page faults per call} (first touches of memory the
    allocator took fresh from the kernel)."""
    times = {name: [] for name in fns}
    counted = {name: 0 for name in fns}
    order = list(fns.items())
    for i in range(repeats):
        for name, f in (order if i % 2 else order[::-1]):
            f0 = _minor_faults()
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
            counted[name] += _minor_faults() - f0
    if faults is not None:
        faults.update({name: n / repeats for name, n in counted.items()})
    return {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}


def _median_ms(f, n: int = 40) -> float:
    for _ in range(5):
        f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1e3


def residual_ops_table(batch: int, image: int) -> list:
    """The residual conv of each ResNet-50 stage (1x1, bottleneck width -> 4x) three ways, in
    channels_last with the weight packed as the eval plan packs it: oneDNN's out-of-place
    binary-add post-op then ReLU (what resfuse runs where the residual is the caller's),
    oneDNN's in-place sum post-op into a copy of the residual then ReLU (the same values:
    checked), and the in-place sum into the residual itself (what freezing runs, and resfuse
    inside a FusedStage, where the residual is dead after the block)."""
    op = torch.ops.mkldnn._convolution_pointwise
    op_ = torch.ops.mkldnn._convolution_pointwise_
    cl = torch.channels_last
    out = ["| stage conv (8 = batch) | binary add + ReLU ms | copy + in-place sum + ReLU ms | "
           "in-place sum + ReLU ms | same values |", "| --- | ---: | ---: | ---: | :---: |"]
    side = image // 4
    for width in (64, 128, 256, 512):
        x = torch.randn(batch, width, side, side).contiguous(memory_format=cl)
        w, b = torch.randn(4 * width, width, 1, 1) / width ** 0.5, torch.randn(4 * width)
        args = ([0, 0], [1, 1], [1, 1], 1)
        wp = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), *args, list(x.shape))
        r = torch.randn(batch, 4 * width, side, side).contiguous(memory_format=cl)
        scratch = r.clone(memory_format=cl)

        def binary():
            return op.binary(x, r, wp, b, *args, "add", None, None, [], None).relu_()

        def copy_sum():
            return op_.binary(r.clone(memory_format=cl), x, wp, b, *args, "add", None, None, [],
                              None).relu_()

        def in_place():
            return op_.binary(scratch, x, wp, b, *args, "add", None, None, [], None).relu_()
        same = torch.equal(binary(), copy_sum())
        out.append(f"| {width}->{4 * width} 1x1 @ {side}x{side} | {_median_ms(binary):.2f} | "
                   f"{_median_ms(copy_sum):.2f} | {_median_ms(in_place):.2f} | "
                   f"{'yes' if same else 'no'} |")
        side = max(1, side // 2)
    return out


def residual_sum_ab(model: str, image: int, batches=(1, 8), layouts=("nchw", "channels_last"),
                    repeats: int = 16) -> list:
    """Two converted copies of the model, interleaved: the stages as the converter leaves them
    (FusedStage: each block's residual conv sums into the dead residual in place) against the
    same stages as plain nn.Sequential (oneDNN's binary-add post-op into a fresh output per
    block); outputs checked equal bit for bit."""
    import torch.nn as nn
    out = ["| layout, batch | stages in place ms | plain Sequential ms | plain / in place | "
           "equal |", "| --- | ---: | ---: | ---: | :---: |"]
    for layout in layouts:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        for n in batches:
            torch.manual_seed(0)
            plain = getattr(models, model)().eval().to(memory_format=fmt)
            a, b = copy.deepcopy(plain), copy.deepcopy(plain)
            resfuse.convert(a)
            resfuse.convert(b)
            for m in b.modules():
                if type(m) is resfuse.FusedStage:
                    m.__class__ = nn.Sequential
            x = torch.randn(n, 3, image, image).contiguous(memory_format=fmt)
            a(x), b(x)
            equal = torch.equal(a(x), b(x))
            med = _interleaved_medians_ms({"a": lambda: a(x), "b": lambda: b(x)},
                                          repeats if n > 1 else 4 * repeats)
            ma, mb = med["a"], med["b"]
            out.append(f"| {layout}, {n} | {ma:.1f} | {mb:.1f} | {mb / ma:.3f}× | "
                       f"{'yes' if equal else 'no'} |")
    return out


def time_split(model, x, frozen, repeats: int = 30) -> list:
    """resfuse's wall time per forward split in two: inside oneDNN's conv calls (timed around
    each call of every eval plan's op) and everything else (Python between the calls, the
    model's other modules, bound measures), with freezing's wall time beside it; each model
    is called `repeats` times in a row (not interleaved: the medians above are), the median
    call shown. Also how many relu-like convs ran oneDNN's own activation (their bound
    allowed it) and how many inputs were measured, per forward (counted with the stages
    run through their modules, whose choices a stage program repeats)."""
    from resfuse import eval_plan, stage_program, value_bounds
    from resfuse.backend import eager
    model(x)
    inside = [0.0]
    clock = time.perf_counter

    def timed(f):
        if f is None:
            return None

        def call(*args):
            t0 = clock()
            y = f(*args)
            inside[0] += clock() - t0
            return y
        return call
    runners = [p.runner for p in eval_plan._plans.values()]
    saved = [(r, r.op, r.binary, r.sum_into) for r in runners]
    counts = {"fused": 0, "torch": 0, "measured": 0}
    real_call, real_measure = eager.OneDNNEvalConv.__call__, value_bounds.measure

    def counting(self, x_, w, residual, into=False, bounded=False):
        if self.after is not None:
            counts["fused" if self.own_activation(bounded) else "torch"] += 1
        return real_call(self, x_, w, residual, into, bounded)

    def measuring(t):
        counts["measured"] += 1
        return real_measure(t)
    try:
        eager.OneDNNEvalConv.__call__ = counting
        value_bounds.measure = measuring
        without_stage_programs(model, x)  # (counted on the modules' path: a stage program
        #                                    replays the same calls)
        calls = dict(counts)
        eager.OneDNNEvalConv.__call__ = real_call
        value_bounds.measure = real_measure
        for r, op, binary, sum_into in saved:
            r.op, r.binary, r.sum_into = timed(op), timed(binary), timed(sum_into)
        stage_program.clear()  # (a program holds the ops it was captured with)
        model(x)
        walls, convs = [], []
        for _ in range(repeats):
            inside[0] = 0.0
            t0 = clock()
            model(x)
            walls.append(clock() - t0)
            convs.append(inside[0])
    finally:
        eager.OneDNNEvalConv.__call__ = real_call
        value_bounds.measure = real_measure
        for r, op, binary, sum_into in saved:
            r.op, r.binary, r.sum_into = op, binary, sum_into
        stage_program.clear()
    order = sorted(range(repeats), key=walls.__getitem__)
    mid = order[repeats // 2]  # the median call's own split
    wall, conv = walls[mid] * 1e3, convs[mid] * 1e3
    frozen(x)
    frozen_walls = []
    for _ in range(repeats):
        t0 = clock()
        frozen(x)
        frozen_walls.append(clock() - t0)
    frozen_ms = sorted(frozen_walls)[repeats // 2] * 1e3
    return ["| resfuse wall ms | inside oneDNN's conv calls ms | everything else ms | "
            "freezing wall ms | relu-like convs with oneDNN's activation | inputs measured |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {wall:.2f} | {conv:.2f} | {wall - conv:.2f} | {frozen_ms:.2f} | "
            f"{calls['fused']} of {calls['fused'] + calls['torch']} | {calls['measured']} |"]


# resfuse with its stages run through their modules (`resfuse.stage_program` off): the A/B of
# the stage programs, timed beside the others.
_NO_PROGRAMS = "resfuse[auto], stage programs off"


def without_stage_programs(model, x):
    """model(x) with stage programs off."""
    from resfuse import stage_program
    with stage_program.disabled():
        return model(x)


def nan_logits(models_: dict, x) -> list:
    """One NaN in the first image of the batch (one pixel, every channel): eager's logits for
    that image are all NaN, the other images' are finite. Per model, how many of the first
    image's logits are NaN, and whether the other images' logits are finite."""
    bad = x.clone()
    bad[0, :, x.shape[2] // 2, x.shape[3] // 2] = float("nan")
    out = ["| model | NaN logits, first image | other images finite |", "| --- | ---: | :---: |"]
    for name, m in models_.items():
        y = m(bad)
        out.append(f"| {name} | {int(y[0].isnan().sum())} / {y.shape[1]} | "
                   f"{'yes' if bool(y[1:].isfinite().all()) else 'no'} |")
    return out


def write_markdown(out_dir: str, name: str, lines: list) -> str:
    """Write `lines` to `<out_dir>/<name>.md` (the folder made if missing), print them and
    the path; returns the path (this and bench/process_spread.py's reports)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name + ".md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", choices=["resnet18", "resnet50"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image", type=int, default=160)
    p.add_argument("--layout", default="nchw", choices=["nchw", "channels_last"])
    p.add_argument("--calls", type=int, default=3, help="profiled forward passes each")
    p.add_argument("--repeats", type=int, default=20, help="unprofiled calls each, interleaved")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--residual-ops", action="store_true",
                   help="also time the residual conv's post-op choices (residual_ops_table)")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    fmt = torch.channels_last if a.layout == "channels_last" else torch.contiguous_format
    plain = getattr(models, a.model)().eval().to(memory_format=fmt)
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    frozen = suites.FrozenCompiled(copy.deepcopy(plain))
    x = torch.randn(a.batch, 3, a.image, a.image).contiguous(memory_format=fmt)
    contestants = {"resfuse[auto]": fused, suites.FREEZING: frozen}
    with torch.no_grad():
        want = plain(x)
        for name, m in contestants.items():
            got = m(x)
            err = suites.rel_err(got, want)
            if err > suites.MODEL_LIMIT[torch.float32]:
                print(f"{name}: relative error {err:.2e} against eager", file=sys.stderr)
                return 1
        faults = {}
        timed = {n: (lambda m=m: m(x)) for n, m in contestants.items()}
        timed[_NO_PROGRAMS] = lambda: without_stage_programs(fused, x)
        med = _interleaved_medians_ms(timed, a.repeats, faults)
        tables = {}
        for name, m in contestants.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(a.calls):
                    m(x)
            tables[name] = _op_table(prof, a.calls)
        nan_rows = nan_logits({"eager": plain, **contestants}, x)
        split_rows = time_split(fused, x, frozen, a.repeats)
    env = measure.environment(torch.device("cpu"))
    lines = [f"# CPU eval profile: {a.model}, batch {a.batch}, {a.image}×{a.image}, {a.layout}", "",
             f"{env['device']} ({env['threads']} threads); torch {env['torch']}; resfuse "
             f"{env['resfuse']} @ `{env['commit']}`, {env['date'][:10]}; "
             f"`python bench/profile_cpu_eval.py --model {a.model} --batch {a.batch} "
             f"--image {a.image} --layout {a.layout} --calls {a.calls} --repeats {a.repeats}"
             f"{' --residual-ops' if a.residual_ops else ''}`", "",
             "Unprofiled, interleaved medians of " + str(a.repeats) + " calls: " +
             ", ".join(f"{n} {ms:.1f} ms" for n, ms in med.items()) +
             f" (resfuse / freezing: {med[suites.FREEZING] / med['resfuse[auto]']:.3f}×; "
             f"stage programs on / off: {med[_NO_PROGRAMS] / med['resfuse[auto]']:.3f}×); "
             "minor page faults per call: " +
             ", ".join(f"{n} {k:.0f}" for n, k in faults.items()) + ".", ""]
    for name, table in tables.items():
        lines += [f"## {name}", "", *table, ""]
    lines += ["## Where resfuse's time goes", "", time_split.__doc__.replace("\n    ", " "), "",
              *split_rows, ""]
    lines += ["## NaN in the input", "", nan_logits.__doc__.replace("\n    ", " "), "",
              *nan_rows, ""]
    if a.residual_ops:
        with torch.no_grad():
            lines += ["## The residual sum in the whole model", "",
                      residual_sum_ab.__doc__.replace("\n    ", " "), "",
                      *residual_sum_ab(a.model, a.image), ""]
            lines += ["## The residual conv's post-op", "", residual_ops_table.__doc__.split(
                "\n\n")[0].replace("\n    ", " "), "", *residual_ops_table(a.batch, a.image), ""]
    write_markdown(a.out, f"{env['date'][:10]}-cpu-profile-{a.model}-b{a.batch}-{a.image}-"
                          f"{a.layout}-{env['commit']}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
