"""The benchmark harness itself (bench/), on the CPU: byte and FLOP counts for known shapes,
the timing and roofline helpers, the result files' schema, the quick suite end to end, the
torch.compile contestants, the README report and the plots."""
import csv
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))  # after tests/: tests/harness.py is a different module

import counts  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402
from counts import BlockShape, Chain, Conv  # noqa: E402

from resfuse import models, reference  # noqa: E402

RUN = os.path.join(ROOT, "bench", "run.py")
TINY = ["--batch", "2", "--image", "32", "--repeats", "2", "--warmup", "0", "--device", "cpu",
        "--no-progress", "--no-plots"]


# -- counts ------------------------------------------------------------------------------------
def test_design_roofline_figures():
    """The roofline figures of docs/design.md ("Targets"): a ResNet-50 stage-1 bottleneck training step at batch 256 in bf16
    moves about 14.2 GB unfused and 8.3 GB fused; the stage-4 block is about 0.42 ms of
    tensor-core time at 800 TFLOP/s."""
    stage1 = BlockShape("resnet50", 1, 256, 64, 1, True, 56).chain(256, 2)
    assert stage1.bytes("train_step", "eager") / 1e9 == pytest.approx(14.2, abs=0.05)
    assert stage1.bytes("train_step") / 1e9 == pytest.approx(8.3, abs=0.05)
    stage4 = BlockShape("resnet50", 4, 2048, 512, 1, True, 7).chain(256, 2)
    assert stage4.flops("train_step") / 800e12 * 1e3 == pytest.approx(0.42, abs=0.005)


def test_scale_bias_add_act_bytes_by_hand():
    # 2x4x4x4 fp32: 128 elements, 512 bytes per tensor, a 16-byte ReLU mask.
    c = Chain((), "external", 2, 4, 4, 4, 4)
    assert c.bytes("train_fwd") == 512 + (3 * 512 + 16)  # stats read; z, r -> y, mask
    assert c.bytes("train_bwd") == 2 * (3 * 512 + 16)  # g, mask, z -> g_r; g, mask, z -> g_z
    assert c.bytes("eval") == 3 * 512
    assert c.bytes("train_fwd", "eager") == (3 + 3 + 2) * 512  # bn (z read twice), add, relu
    assert c.bytes("train_bwd", "eager") == (3 + 5) * 512  # relu backward, bn backward
    assert c.flops("train_step") == 0


def test_conv_shapes_and_flops():
    conv = Conv(128, 128, 3, 2)
    assert conv.out_hw(56, 56) == (28, 28)
    assert Conv(64, 64, 3, dilation=2).out_hw(20, 20) == (20, 20)
    assert conv.macs(2, 56, 56) == 2 * 28 * 28 * 128 * 128 * 9
    assert Conv(64, 64, 3, groups=32).weight_numel() == 64 * 2 * 9
    c = Chain((conv,), "none", 2, 128, 56, 56, 2)
    fwd = 2 * conv.macs(2, 56, 56)
    assert c.flops("eval") == c.flops("train_fwd") == fwd
    assert c.flops("train_bwd") == 2 * fwd and c.flops("train_step") == 3 * fwd
    assert Chain((conv,), "none", 2, 128, 56, 56, 2, input_grad=False).flops("train_bwd") == fwd


@pytest.mark.parametrize("name,gmacs", [("resnet18", 1.814), ("resnet34", 3.664),
                                        ("resnet50", 4.089), ("resnet101", 7.801)])
def test_resnet_macs_published(name, gmacs):
    """The published multiply-accumulate counts at 224x224 (torchvision's model card: 1.81,
    3.66, 4.09, 7.80 GFLOPS counted as MACs)."""
    assert counts.resnet_conv_macs(name) / 1e9 == pytest.approx(gmacs, abs=0.001)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_flops_match_torch_flop_counter(name):
    """The counts from shapes agree with torch's own FLOP counter on the model itself."""
    from torch.utils.flop_counter import FlopCounterMode
    model = getattr(models, name)().eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.randn(1, 3, 96, 96))
    assert fc.get_total_flops() == 2 * counts.resnet_conv_macs(name, 96)


@pytest.mark.parametrize("block", [b for b, _ in counts.resnet_blocks("resnet50", 64)][:3] +
                         [b for b, _ in counts.resnet_blocks("resnet18", 64)][1:2],
                         ids=lambda b: b.name())
def test_block_training_flops_match_flop_counter(block):
    from torch.utils.flop_counter import FlopCounterMode
    m = reference.ResidualBlock(block.inplanes, block.planes, block.stride,
                                bottleneck=block.bottleneck)
    x = torch.randn(2, block.inplanes, block.hw, block.hw, requires_grad=True)
    chain = block.chain(2, 4)
    with FlopCounterMode(display=False) as fc:
        y = m(x)
    assert fc.get_total_flops() == chain.flops("train_fwd")
    with FlopCounterMode(display=False) as fc:
        y.backward(torch.randn_like(y))
    assert fc.get_total_flops() == chain.flops("train_bwd")
    assert tuple(y.shape) == chain.out_shape()


def test_resnet_blocks_cover_every_block():
    assert sum(t for _, t in counts.resnet_blocks("resnet50")) == 16
    assert sum(t for _, t in counts.resnet_blocks("resnet18")) == 8
    assert len(counts.resnet_blocks("resnet50")) == 8 and len(counts.resnet_blocks("resnet18")) == 7
    b = counts.resnet_blocks("resnet50")[2][0]
    assert (b.inplanes, b.planes, b.stride, b.hw, b.projection) == (256, 128, 2, 56, True)


def test_fused_never_moves_more_than_eager():
    for model in ("resnet18", "resnet50"):
        for b, _ in counts.resnet_blocks(model):
            c = b.chain(8, 2)
            for mode in counts.MODES:
                assert 0 < c.bytes(mode) < c.bytes(mode, "eager"), (b.name(), mode)


def test_counts_reject_bad_arguments():
    c = Chain((), "none", 1, 1, 1, 1, 4)
    with pytest.raises(ValueError, match="mode"):
        c.bytes("training")
    with pytest.raises(ValueError, match="schedule"):
        c.bytes("eval", "cudnn")
    with pytest.raises(ValueError, match="shortcut"):
        Chain((), "skip", 1, 1, 1, 1, 4)
    with pytest.raises(ValueError, match="projection"):
        Chain((), "projection", 1, 1, 1, 1, 4)
    with pytest.raises(ValueError, match="channels"):
        Chain((Conv(3, 8),), "none", 1, 4, 1, 1, 4)


# -- measure ------------------------------------------------------------------------------------
def test_summarize_and_rotation():
    s = measure.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["median_ms"] == 3.0 and s["p20_ms"] == pytest.approx(1.8) and s["p80_ms"] == pytest.approx(4.2)
    assert measure.summarize([2.0]) == dict(median_ms=2.0, p20_ms=2.0, p80_ms=2.0, repeats=1)
    with pytest.raises(ValueError):
        measure.summarize([])
    cpu = torch.device("cpu")
    assert measure.rotation(1 << 40, cpu) == 2
    assert measure.rotation(1, cpu) == 8
    assert 2 <= measure.rotation(measure.cache_bytes(cpu) // 3, cpu) <= 8


def test_roofline_picks_the_longer_floor():
    ceil = dict(copy_gbs=1000.0, compute_tflops={"bfloat16": 100.0})
    mem = measure.roofline(int(1e9), int(1e9), 2.0, ceil, "bfloat16")  # 1 ms of copy, 10 us of math
    assert mem["bound"] == "memory" and mem["frac_of_roofline"] == pytest.approx(0.5)
    assert mem["gbs"] == pytest.approx(500.0) and mem["floor_ms"] == pytest.approx(1.0)
    cmp = measure.roofline(int(1e6), int(1e12), 20.0, ceil, "float16")  # falls back to the peak
    assert cmp["bound"] == "compute" and cmp["frac_of_roofline"] == pytest.approx(0.5)


def test_time_interleaved_counts_calls():
    calls = {"a": 0, "b": 0}

    def f(k):
        def g():
            calls[k] += 1
        return g
    t = measure.time_interleaved({"a": f("a"), "b": f("b")}, 4, 1, torch.device("cpu"))
    assert calls == {"a": 5, "b": 5} and [len(v) for v in t.values()] == [4, 4]


def test_progress_lines():
    out = io.StringIO()
    p = measure.Progress(3, stream=out)
    for label in ("one", "two", "three"):
        p.step(label)
    lines = out.getvalue().splitlines()
    assert [l.split(" ", 1)[0] for l in lines] == ["[1/3]", "[2/3]", "[3/3]"]
    assert lines[0].endswith("· one") and "left" in lines[2]


# -- the entry point ---------------------------------------------------------------------------
def run_bench(*args, timeout=600):
    return subprocess.run([sys.executable, RUN, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def list_bench(*args):
    """bench/run.py's main in this process, for `--list` and argument errors only (nothing is
    timed or written): a subprocess costs a torch import, 4 s each on CI's machine."""
    import contextlib
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = mod.main(list(args))
        except SystemExit as e:  # argparse's errors
            code = e.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def test_quick_suite_end_to_end(tmp_path):
    """./run.sh bench's default run (tiny), plots included where matplotlib is installed."""
    proc = run_bench("--suite", "quick", "--out", str(tmp_path),
                     *[t for t in TINY if t != "--no-plots"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (jpath,) = tmp_path.glob("*.json")
    (cpath,) = tmp_path.glob("*.csv")
    stem = jpath.name[:-len(".json")]
    try:
        import matplotlib  # noqa: F401
        for kind in ("speedup", "roofline"):
            with open(tmp_path / f"{stem}-{kind}.png", "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "matplotlib is not installed" in proc.stdout
    r = json.loads(jpath.read_text())
    assert r["schema"] == "resfuse-bench/2"
    assert {"device", "device_type", "driver", "torch", "triton", "cuda", "commit", "date",
            "backends", "triton_autotune"} <= set(r["env"])
    assert r["ceilings"]["copy_gbs"] > 0 and r["ceilings"]["compute_tflops"]["float32"] > 0
    assert r["settings"]["contestants"] == ["eager", "resfuse[auto]"]
    suites = {row["suite"] for row in r["rows"]}
    assert suites == {"ops", "blocks", "models"}
    modes = {(row["suite"], row["mode"]) for row in r["rows"]}
    assert {("ops", m) for m in ("eval", "train_fwd", "train_bwd", "train_step")} <= modes
    assert {("blocks", "train_step"), ("blocks", "eval"), ("models", "train_step"),
            ("models", "eval")} <= modes
    for row in r["rows"]:
        assert not row.get("error"), row
        for tag in ("device", "driver", "torch", "triton", "cuda", "commit", "date", "dtype",
                    "layout", "shapes", "batch"):
            assert tag in row, tag
        assert row["dtype"] == "float32" and row["layout"] == "channels_last"
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"] and row["img_per_s"] > 0
        assert row["bytes"] > 0 and row["flops"] >= 0 and row["bound"] in ("memory", "compute")
        assert row["gbs"] == pytest.approx(row["bytes"] / row["median_ms"] / 1e6)
        if row["contestant"] == "eager":
            assert row["speedup_vs_eager"] == 1.0 and row["parity_ok"] is None
        else:
            assert row["parity_ok"] is True and row["rel_err"] < 1e-4, row
        if row["suite"] != "models":
            assert row["rel_err_fp64"] < 1e-2
    # The CSV has the same rows, tagged the same way.
    with open(cpath, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(r["rows"])
    assert {"device", "commit", "dtype", "layout", "shapes", "median_ms", "frac_of_roofline"} <= set(table[0])
    assert json.loads(table[0]["shapes"]) == r["rows"][0]["shapes"]
    assert "vs eager" in proc.stdout and "ceilings" in proc.stdout

    # The README's compact section, docs/benchmarks.md's full one and auto's table render
    # from it.
    readme, docs = tmp_path / "README.md", tmp_path / "benchmarks.md"
    for f in (readme, docs):
        f.write_text("x\n<!-- results:start -->\nold\n<!-- results:end -->\ny\n")
    measured = tmp_path / "measured.py"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), "--results",
                           str(tmp_path), "--readme", str(readme), "--docs", str(docs),
                           "--measured", str(measured)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text, full = readme.read_text(), docs.read_text()
    assert "old" not in text + full and text.endswith("y\n") and full.endswith("y\n")
    assert "CPU: ResNet-50 eval, channels_last, batch" in text
    # resfuse alone against eager with a target for each model case: the README shows the
    # targets, docs/benchmarks.md the case table too
    assert "| resnet50 | training step |" not in text
    assert "| resnet50 | training step | eager |" in full and jpath.name in full
    assert "TABLE = {}" in measured.read_text()  # a CPU run decides nothing

    # A second run on the same day and commit gets a name of its own.
    proc = run_bench("--suite", "quick", "--only", "scale-bias-add-relu", "--out", str(tmp_path),
                     *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted([jpath.name, stem + "-2.json"])


def test_compile_contestants_every_op_mode(tmp_path):
    """torch.compile (default and max-autotune) as contestants, backward alone included."""
    proc = run_bench("--suite", "ops", "--only", "scale-bias-add-relu 256", "--compile", "both",
                     "--out", str(tmp_path), *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(next(tmp_path.glob("*.json")).read_text())
    got = {(row["mode"], row["contestant"]) for row in r["rows"]}
    assert got == {(m, c) for m in ("eval", "train_fwd", "train_bwd")
                   for c in ("eager", "torch.compile", "torch.compile(max-autotune)", "resfuse[auto]")}
    for row in r["rows"]:
        assert row["speedup_vs_compile"] > 0 and (row["parity_ok"] in (True, None)), row


def test_list_and_bad_arguments():
    proc = list_bench("--suite", "all", "--list", "--device", "cpu")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    # (blocks: 15 blocks in three modes and 6 lone chains in two; models on a CPU: four models
    # in two modes, and the Python overhead case)
    assert lines[-1].startswith(f"{6 * 3 + 4 * 3 + 15 * 3 + 6 * 2 + 4 * 2 + 1} cases")
    assert sum("blocks " in l for l in lines) == 45 and sum("models " in l for l in lines) == 9
    assert sum(l.startswith("chains ") for l in lines) == 12
    for bad in (["--dtype", "float8"], ["--layout", "nhwc"], ["--batch", "0"], ["--suite", "x"]):
        proc = list_bench(*bad, "--list", "--device", "cpu")
        assert proc.returncode == 2 and "error" in proc.stderr, bad
    proc = list_bench("--backends", "cuda", "--list", "--device", "cpu")
    assert "resfuse[cuda]" not in proc.stdout.splitlines()[-1]


def test_models_suite_cpu_grid_listing():
    """The CPU models suite's grid in one run: both layouts, batch 1 and 8, eager,
    torch.compile default and with freezing, resfuse and resfuse under compile; --mode."""
    proc = list_bench("--suite", "models", "--device", "cpu", "--layout", "nchw,channels_last",
                     "--batch", "1,8", "--compile", "default", "--freezing", "--list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # 4 models x 2 modes x 2 layouts x 2 batches, and the Python overhead case per layout/batch
    assert lines[-1] == ("36 cases; contestants: eager, torch.compile, torch.compile(freezing), "
                         "resfuse[auto], resfuse[auto]+compile")
    proc = list_bench("--suite", "models", "--device", "cpu", "--mode", "eval", "--only",
                     "resnet50", "--list")
    assert proc.stdout.splitlines()[-1].startswith("1 cases")


def test_python_overhead_case(tmp_path):
    """The per-fused-call overhead case: checked against eager, microseconds per call and
    resfuse's overhead over the bare oneDNN calls in its rows."""
    proc = run_bench("--suite", "models", "--only", "python overhead", "--out", str(tmp_path),
                     *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(next(tmp_path.glob("*.json")).read_text())
    rows = {row["contestant"]: row for row in r["rows"]}
    assert set(rows) == {"eager", "resfuse[auto]", "oneDNN calls (bare)"}
    assert rows["resfuse[auto]"]["parity_ok"] and rows["oneDNN calls (bare)"]["parity_ok"]
    bare, fused = rows["oneDNN calls (bare)"], rows["resfuse[auto]"]
    assert fused["us_per_fused_call"] == pytest.approx(fused["median_ms"] * 1e3 / 160)
    assert fused["python_overhead_us"] == pytest.approx(fused["us_per_fused_call"]
                                                        - bare["us_per_fused_call"])
    assert all(row["repeats"] == 60 for row in rows.values())  # (its minimum, over TINY's)


# -- report and plots --------------------------------------------------------------------------
def _gpu_run(speedups: dict) -> dict:
    """A made-up GPU result (not a measurement) to check the target table's logic."""
    env = dict(date="2026-01-01T00:00:00+00:00", device="GPU X100", device_type="cuda",
               driver="1", torch="t", triton="t", cuda="13", commit="abc", resfuse="0",
               threads=1)
    rows = []

    def row(suite, case, mode, contestant, ms, **kw):
        rows.append(dict(suite=suite, case=case, mode=mode, contestant=contestant, median_ms=ms,
                         p20_ms=ms, p80_ms=ms, img_per_s=256 / ms * 1e3, dtype="bfloat16",
                         layout="channels_last", batch=256, shapes=dict(x=[256, 256, 56, 56]),
                         peak_bytes=kw.pop("peak", None), **kw))
    for mode, gbs in (("train_fwd", 2600.0), ("train_bwd", 2000.0)):
        row("ops", "scale-bias-add-relu 256 @56", mode, "resfuse[auto]", 1.0, gbs=gbs)
    row("blocks", "resnet50 layer1 bottleneck 256->64->256 @56 (identity)", "train_step",
        "resfuse[auto]", 1.0, speedup_vs_eager=speedups["block"], speedup_vs_compile=1.3)
    row("models", "resnet50", "train_step", "eager", 40.0, peak=100)
    row("models", "resnet50", "train_step", "resfuse[auto]", 30.0, peak=70,
        speedup_vs_eager=1.33, speedup_vs_compile=1.1)
    row("models", "resnet50", "eval", "resfuse[auto]", 10.0, speedup_vs_eager=1.6,
        speedup_vs_compile=0.9)
    return dict(schema="resfuse-bench/2", env=env, ceilings=dict(copy_gbs=3000.0,
                compute_tflops={"bfloat16": 800.0}), rows=rows, _file="bench/results/x.json",
                settings=dict(suite="all", dtypes=["bfloat16"], layouts=["channels_last"],
                              batches=[256], image=224, repeats=30,
                              contestants=["eager", "resfuse[auto]"]))


def test_targets_table():
    got = {t: (m, ok) for t, m, ok in report.targets(_gpu_run({"block": 1.6}))}
    assert got["scale-bias-add-act forward ≥ 85 % of copy bandwidth"] == ("87%", "yes")
    assert got["scale-bias-add-act backward ≥ 85 % of copy bandwidth"] == ("67%", "no")
    assert got["bottleneck training step ≥ 1.5× eager"] == ("1.60×", "yes")
    assert got["bottleneck training step ≥ 1.25× torch.compile"] == ("1.30×", "yes")
    assert got["ResNet-50 training step ≥ 1.4× eager"] == ("1.33×", "no")
    assert got["ResNet-50 eval ≥ torch.compile"] == ("0.90×", "no")
    assert got["peak training memory ≤ 0.75× eager (above the step's inputs)"] == ("0.70×", "yes")
    assert got["ResNet-50 training step, img/s (long run: ≈ 7,000)"] == ("8,533", "yes")
    text = "\n".join(report.render_suite(_gpu_run({"block": 1.2})))
    assert "| bottleneck training step ≥ 1.5× eager | 1.20× | no |" in text
    # a miss that would round to the target shows the digit that misses it
    run = _gpu_run({"block": 1.6})
    next(r for r in run["rows"] if r["mode"] == "eval")["speedup_vs_compile"] = 0.9991
    got = {t: (m, ok) for t, m, ok in report.targets(run)}
    assert got["ResNet-50 eval ≥ torch.compile"] == ("0.999×", "no")


def test_front_page_leaves_out_a_case_table_the_targets_repeat():
    """README's compact section: a run of resfuse alone against eager with at least as many
    targets as model cases shows the targets only; with other contestants, the cases too."""
    run = _gpu_run({"block": 1.6})
    text = "\n".join(report._front_suite(run))
    assert "| target (docs/design.md) |" in text and "| case | mode |" not in text
    run["settings"]["contestants"] = ["eager", "torch.compile", "resfuse[auto]"]
    assert "| case | mode |" in "\n".join(report._front_suite(run))


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    import plots
    run = _gpu_run({"block": 1.6})
    for r in run["rows"]:
        r.update(bytes=int(1e9), flops=int(1e12))
    made = plots.make_plots(run, str(tmp_path), stem="x")
    assert sorted(os.path.basename(p) for p in made) == ["x-roofline.png", "x-speedup.png"]
    for p in made:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_committed_results_render():
    """Every committed result file renders; README.md's compact results section and
    docs/benchmarks.md's full one are what bench/report.py makes of them now."""
    runs = report.load(os.path.join(ROOT, "bench", "results"))
    for path, text in ((report.README, report.render_front(runs)),
                       (report.DOCS, report.render(runs))):
        assert text and "Traceback" not in text
        with open(path) as f:
            page = f.read()
        got = page.split(report.START, 1)[1].split(report.END, 1)[0].strip()
        assert got == report.relink(text, path).strip(), \
            f"{os.path.relpath(path, ROOT)}'s results section is stale: run python bench/report.py"


def test_a_run_measured_again_row_by_row_is_superseded(tmp_path):
    """A models run whose every row newer runs measured again (as an eval run and a training
    run) is left out; one with a row no newer run has stays."""
    def run(name, date, mode, cases, modes=("train_step", "eval")):
        rows = [dict(suite="models", case=c, mode=m, dtype="float32", layout="nchw", batch=8,
                     contestant="eager") for c in cases for m in modes]
        r = dict(schema=report.SCHEMA, rows=rows,
                 env=dict(device_type="cpu", date=date, device="x", commit="c"),
                 settings=dict(suite="models", mode=mode, only=cases[0], image=112))
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    run("a-old", "2026-01-01T00:00", None, ["densenet121"])
    run("b-eval", "2026-01-02T00:00", "eval", ["densenet121"], ("eval",))
    run("c-old-two", "2026-01-01T00:00", None, ["mobilenet_v2"])
    run("d-eval-only", "2026-01-02T00:00", "eval", ["mobilenet_v2"], ("eval",))
    names = {os.path.basename(r["_file"]) for r in report.load(str(tmp_path))}
    assert names == {"a-old.json", "b-eval.json", "c-old-two.json", "d-eval-only.json"}
    run("e-train", "2026-01-03T00:00", "train_step", ["densenet121"], ("train_step",))
    names = {os.path.basename(r["_file"]) for r in report.load(str(tmp_path))}
    assert "a-old.json" not in names and {"b-eval.json", "e-train.json", "c-old-two.json"} <= names


def test_profile_residual_ops_table():
    """bench/profile_cpu_eval.py's residual-conv table: one row per ResNet-50 stage, and the
    sum into a copy gives the binary-add post-op's values bit for bit (skipped without oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch")
    import profile_cpu_eval
    with torch.no_grad():
        rows = profile_cpu_eval.residual_ops_table(1, 32)[2:]
    assert len(rows) == 4 and all(r.endswith("| yes |") for r in rows), rows


def test_profile_stage_ab_and_fault_count():
    """The profile's whole-model A/B of FusedStage against plain Sequential stages: the same
    logits bit for bit; and the page-fault count comes back per contestant."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch")
    import profile_cpu_eval
    with torch.no_grad():
        rows = profile_cpu_eval.residual_sum_ab("resnet18", 32, batches=(1,),
                                                layouts=("nchw",), repeats=1)[2:]
    assert len(rows) == 1 and rows[0].endswith("| yes |"), rows
    faults = {}
    med = profile_cpu_eval._interleaved_medians_ms({"a": lambda: torch.ones(1 << 20)}, 2, faults)
    assert set(med) == set(faults) == {"a"} and faults["a"] >= 0
    import copy
    import resfuse
    torch.manual_seed(0)
    plain = models.resnet18(num_classes=4).eval()
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    with torch.no_grad():
        rows = profile_cpu_eval.nan_logits({"eager": plain, "resfuse": fused},
                                           torch.randn(2, 3, 32, 32))[2:]
    assert rows == ["| eager | 4 / 4 | yes |", "| resfuse | 4 / 4 | yes |"], rows


def test_profile_time_split_counts_and_restores_the_runners():
    """The profile's split of resfuse's wall time: the conv calls' share is part of the wall
    time, every ReLU of a ResNet-18 runs as oneDNN's own (bounded), and the eval plans'
    runners are left as they were (the timing wrappers removed)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch")
    import resfuse
    import profile_cpu_eval
    from resfuse import eval_plan
    torch.manual_seed(0)
    fused = models.resnet18(num_classes=4).eval()
    resfuse.convert(fused)
    x = torch.randn(2, 3, 32, 32)
    # (this model's plans only: other tests' plans go whenever their modules are collected)
    convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)]

    def runners():
        plans = [eval_plan._plans.get(id(c)) for c in convs]
        return [(p.runner.op, p.runner.sum_into) for p in plans if p is not None]
    with torch.no_grad():
        fused(x)
        before = runners()
        rows = profile_cpu_eval.time_split(fused, x, lambda t: t.sum(), repeats=3)
        after = runners()
    assert len(before) == len(convs) and before == after
    wall, conv, rest, frozen, fused_acts, measured = [c.strip() for c in rows[2].strip("|").split("|")]
    assert 0 < float(conv) < float(wall) and float(rest) > 0 and float(frozen) >= 0
    assert fused_acts == "17 of 17" and int(measured) >= 1, rows


def test_process_spread_measures_all_three_in_one_process():
    """bench/process_spread.py's per-process measurement: eager, resfuse and freezing, each a
    positive median (resfuse's logits checked against eager's first)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch")
    import process_spread
    med = process_spread.one_process("resnet18", 1, 32, "nchw", 1)
    assert set(med) == {"eager", "resfuse", "freezing"} and min(med.values()) > 0


def test_process_spread_training_steps():
    """Its training mode: eager, resfuse, and the same converted model with training plans
    off (the switch restored after each step)."""
    import process_spread
    from resfuse import train_plan
    med = process_spread.one_process("resnet18", 2, 32, "nchw", 1, "train_step")
    assert set(med) == {"eager", "resfuse", "resfuse, training plans off"}
    assert min(med.values()) > 0 and train_plan._enabled


# -- the checks and the run's robustness ---------------------------------------------------------
import suites  # noqa: E402


def _settings(contestants, **kw):
    base = dict(device=torch.device("cpu"), dtype=torch.float32, layout="channels_last", batch=2,
                image=32, contestants=contestants, repeats=1, warmup=0)
    base.update(kw)
    return suites.Settings(**base)


def test_each_contestant_cycles_through_every_input_copy():
    s = _settings(["eager", "a", "b", "c"])
    xs = [torch.randn(2, 4, 4, 4) for _ in range(4)]
    rs = [None] * 4
    gys = [torch.randn(2, 4, 4, 4) for _ in range(4)]
    seen = {}

    def impl(name):
        def f(x, rm, rv, r, p):
            i = next((i for i, t in enumerate(xs) if t is x), None)  # None: the float64 check
            if i is not None:
                seen.setdefault(name, []).append(i)
            return reference.conv_bn_act(x, None, None, p[0], p[1], rm, rv, training=False)
        return f
    p = [torch.rand(4) + 0.5, torch.randn(4)]
    built = suites._op_built(s, "eval", impl, impl("eager"), p, xs, rs, gys, torch.zeros(4),
                             torch.ones(4))
    seen.clear()
    measure.time_interleaved(built.fns, 8, 0, torch.device("cpu"))
    assert set(seen) == set(built.fns)
    for name, copies in seen.items():
        assert sorted(set(copies)) == [0, 1, 2, 3], (name, copies)


def test_judge_is_tensor_by_tensor():
    torch.manual_seed(0)
    oracle = [torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)]
    eager = [oracle[0].float(), (oracle[1] + 0.1 * torch.randn(100, dtype=torch.float64)).float()]
    # Its output 1 % off: eager's own output error is ~1e-7, its gradient's 10 %; the large
    # gradient error must not excuse the output.
    bad = [eager[0] * 1.01, eager[1]]
    good = [eager[0].double().float(), eager[1]]
    got = suites.judge({"eager": eager, "bad": bad, "good": good}, oracle, torch.float32)
    assert got["bad"]["parity_ok"] is False and got["good"]["parity_ok"] is True
    assert got["eager"]["parity_ok"] is None and got["bad"]["rel_err"] == pytest.approx(0.01, rel=1e-3)


class _Scaled(nn.Module):
    """A block whose last BN output is scaled: a contestant that is slightly wrong."""

    def __init__(self, block, factor=1.0, momentum=None):
        super().__init__()
        self.block = block
        self.factor = factor
        if momentum is not None:
            block.bn1.momentum = momentum

    def forward(self, x):
        return self.block(x) * self.factor


@pytest.mark.parametrize("mode,wrong", [("train_step", "output"), ("eval", "output"),
                                        ("train_step", "running stats")])
def test_blocks_check_flags_a_slightly_wrong_contestant(mode, wrong):
    import copy
    s = _settings(["eager", "wrong"])
    torch.manual_seed(0)
    block = reference.ResidualBlock(16, 4, 1, bottleneck=True)
    suites._randomize_bn(block)
    plain = _Scaled(block).train(mode != "eval")
    bad = (_Scaled(copy.deepcopy(block), factor=1.01) if wrong == "output" else
           _Scaled(copy.deepcopy(block), momentum=0.2)).train(mode != "eval")
    xs = [torch.randn(2, 16, 6, 6, requires_grad=mode != "eval") for _ in range(2)]
    gys = [torch.randn(2, 16, 6, 6) for _ in range(2)]
    built = suites._module_built(s, mode, {"eager": plain, "wrong": bad}, plain, xs, gys)
    assert built.checks["wrong"]["parity_ok"] is False, built.checks


def test_a_failing_case_becomes_an_error_row_and_renders():
    import run as bench_run
    s = _settings(["eager"])
    env = measure.environment(torch.device("cpu"))

    def build(_):
        raise ValueError("no such shape")
    case = suites.Case("blocks", "broken block", "eval", dict(x=[1]), 1, build)
    rows = bench_run.run_case(case, s, env)
    assert len(rows) == 1 and rows[0]["error"] == "ValueError: no such shape"
    run = _gpu_run({"block": 1.6})
    run["rows"] += rows + [dict(rows[0], suite="models", case="resnet50")]
    text = "\n".join(report.render_suite(run))
    assert "error: ValueError: no such shape" in text
    lines = text.splitlines()
    header = next(l for l in lines if l.startswith("| model | mode |"))
    broken = [l for l in lines if l.startswith("| resnet50 | eval | error")]
    assert broken and all(l.count("|") == header.count("|") for l in broken), broken


def test_a_run_cut_short_keeps_its_rows(tmp_path):
    """SIGTERM (a `timeout`) ends the run with the cases measured so far written out."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, RUN, "--suite", "quick", "--out", str(tmp_path),
                             "--repeats", "3", *TINY[4:]], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    r = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert r["settings"]["complete"] is False and "signal" in r["settings"]["stopped"]
    assert r["rows"] and all(row.get("median_ms") for row in r["rows"])
    assert len(r["rows"]) < 2 * r["settings"]["cases"]


def test_freezing_contestant_compiles_its_own_graph():
    """With the plain torch.compile contestant of the same model class compiled first, the
    freezing contestant still compiles a graph of its own (dynamo would otherwise hand it the
    plain one, unfrozen), and gives eager's values."""
    import copy
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        suites.compiled(copy.deepcopy(plain), "default")(x)
        before = counters["frames"]["ok"]
        got = suites.FrozenCompiled(copy.deepcopy(plain))(x)
        assert counters["frames"]["ok"] == before + 1
        assert torch.allclose(got, plain(x), rtol=1e-4, atol=1e-5)
