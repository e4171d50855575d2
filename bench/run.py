#!/usr/bin/env python3
"""resfuse against eager PyTorch and torch.compile: ops, blocks and whole ResNets, on this device.

    python bench/run.py                                   # the quick suite (about 2 min on 2 CPU cores)
    python bench/run.py --suite all --dtype bfloat16      # on a GPU: everything (not yet timed there)
    python bench/run.py --suite blocks --compile both --layout channels_last,nchw --batch 128,256
    python bench/run.py --suite ops --only scale-bias --list     # what would run, without running

Suites (bench/suites.py): `ops` (conv-bn-act in eval, training forward and forward + backward;
scale-bias-add-act forward, backward and eval), `blocks` (every distinct ResNet-18 and ResNet-50
block: training forward, training step and eval), `models` (converted ResNet-18/50: training step with SGD, and
eval), `quick` (a few of each), `all`. Contestants from the same run: eager (resfuse.reference,
or torchvision's model), torch.compile (default; max-autotune with --compile max-autotune or
both), and resfuse with each available backend.

Every case is first checked (bench/suites.py: ops and blocks tensor by tensor against eager in
float64 by the tolerance rule of docs/design.md; models on logits, running statistics and loss against eager), then
timed: contestants interleaved, warm-up excluded, inputs rotated past the last-level cache,
CUDA events on a GPU; median with 20th/80th percentiles; peak memory on a GPU. The copy
bandwidth and compute ceiling of the device are measured at the start of the run, and each row
is reported against them (bench/counts.py gives each case's bytes and FLOPs from its shapes).

Writes DIR/<date>-<device>-<suite>-<commit>.json and .csv (a -2, -3, ... suffix where a
run of the same day and commit is there already) after every case (every row tagged
with device, driver, versions, commit, dtype, layout and shapes; a run cut short keeps its rows,
marked incomplete) and, where matplotlib is installed, PNG
plots (bench/plots.py); prints a table. `python bench/report.py` renders the README's results
section from the committed files under bench/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import signal
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import resfuse  # noqa: E402
from resfuse.backend import AUTO_ORDER  # noqa: E402

import measure  # noqa: E402
import suites  # noqa: E402
from suites import AUTOTUNE, BARE_ONEDNN, COMPILE, EAGER, FREEZING  # noqa: E402

SCHEMA = "resfuse-bench/2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
KERNEL_BACKENDS = ("cuda", "triton")
TAGS = ("device", "device_type", "driver", "torch", "triton", "cuda", "commit", "date")


def _list(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--suite", default="quick", choices=suites.SUITES)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    p.add_argument("--dtype", default=None,
                   help="comma list of float32, bfloat16, float16, float64 "
                        "(default: bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--layout", default="channels_last", help="comma list of channels_last, nchw")
    p.add_argument("--batch", default=None, help="comma list (default: 256 on a GPU, 8 on a CPU)")
    p.add_argument("--image", type=int, default=None,
                   help="image side the shapes derive from (default: 224 on a GPU, 112 on a CPU)")
    p.add_argument("--backends", default=None,
                   help="comma list of resfuse backends to contest (default: auto, and on a GPU "
                        "each available kernel backend other than the one auto takes first)")
    p.add_argument("--compile", default=None, choices=["off", "default", "max-autotune", "both"],
                   help="torch.compile contestants (default: 'default' on a GPU, 'off' on a CPU)")
    p.add_argument("--freezing", action="store_true",
                   help="models, eval: add torch.compile with inductor's freezing (weights as "
                        "constants, BN folded, conv weights prepacked)")
    p.add_argument("--mode", default=None,
                   help="comma list of modes to run (eval, train_step, ...; default: all)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="models on a GPU: add the converted training step replayed from a CUDA graph")
    p.add_argument("--repeats", type=int, default=None, help="default: 30 on a GPU, 10 on a CPU")
    p.add_argument("--warmup", type=int, default=None, help="default: 5 on a GPU, 2 on a CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--only", default=None, help="run only the cases whose name contains this")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out"),
                   help="folder for the JSON, CSV and plots")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="on a GPU: leave torch.backends.cudnn.benchmark off (default: on)")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                   help="--suite memory: also find each contestant's largest batch whose "
                        "measured memory fits GB (1e9 bytes); see bench/memory.py")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    a.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = a.device.type == "cuda"
    try:
        a.dtypes = [DTYPES[d] for d in _list(a.dtype or ("bfloat16" if gpu else "float32"))]
    except KeyError as e:
        p.error(f"--dtype: unknown {e}; one of {', '.join(DTYPES)}")
    a.layouts = _list(a.layout)
    if not set(a.layouts) <= {"channels_last", "nchw"}:
        p.error("--layout: channels_last and/or nchw")
    a.batches = [int(b) for b in _list(a.batch or ("256" if gpu else "8"))]
    a.image = a.image or (224 if gpu else 112)
    a.compile = a.compile or ("default" if gpu else "off")
    a.repeats = a.repeats or (30 if gpu else 10)
    a.warmup = a.warmup if a.warmup is not None else (5 if gpu else 2)
    if min(a.batches) < 1 or a.image < 32 or a.repeats < 1:
        p.error("--batch >= 1, --image >= 32, --repeats >= 1")
    return a


def contestants(a: argparse.Namespace) -> tuple:
    """(names, skipped: {name: why}) for this run."""
    status = resfuse.backends()
    if a.backends is None:
        # auto, and each other available kernel backend: the one auto takes first is auto.
        ready = [b for b in AUTO_ORDER if b in KERNEL_BACKENDS and status.get(b) == "ok"]
        wanted = ["auto"] + ready[1:] if a.device.type == "cuda" else ["auto"]
    else:
        wanted = _list(a.backends)
    names, skipped = [EAGER], {}
    if a.compile in ("default", "both"):
        names.append(COMPILE)
    if a.compile in ("max-autotune", "both"):
        names.append(AUTOTUNE)
    if getattr(a, "freezing", False):
        names.append(FREEZING)
    for b in wanted:
        if b != "auto" and status.get(b, "unknown backend") != "ok":
            skipped[f"resfuse[{b}]"] = status.get(b, "unknown backend")
            continue
        names.append(f"resfuse[{b}]")
        if b == "auto" and a.compile != "off":
            names.append("resfuse[auto]+compile")
        if b == "auto" and a.cuda_graphs:
            if a.device.type == "cuda":
                names.append("resfuse[auto]+cuda-graph")
            else:
                skipped["resfuse[auto]+cuda-graph"] = "CUDA graphs need a GPU"
    return names, skipped


def _configure_compile():
    # Every case compiles its own functions; torch._dynamo.reset() between cases, and limits
    # high enough that a recompile never silently falls back to eager.
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 64)
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 4096)


class DeviceBroken(RuntimeError):
    """A CUDA error other than running out of memory: the context is unusable, later cases
    would fail or be blamed for it, so the run stops (after writing what it has). `rows`: the
    failing case's error row."""

    def __init__(self, message: str, rows: list):
        super().__init__(message)
        self.rows = rows


def _is_fatal(e: BaseException) -> bool:
    text = str(e)
    return (isinstance(e, RuntimeError) and "CUDA" in text and "out of memory" not in text
            and not isinstance(e, torch.cuda.OutOfMemoryError))


def run_case(case: suites.Case, s: suites.Settings, env: dict) -> list:
    """The rows of one case (one per contestant); an error becomes one row that says so."""
    base = dict(suite=case.suite, case=case.name, mode=case.mode, dtype=s.dtype_name,
                layout=s.layout, batch=s.batch, image=s.image, shapes=case.shapes,
                bytes=case.nbytes, bytes_eager=case.nbytes_eager, flops=case.flops,
                **{k: env[k] for k in TAGS})
    built, fatal, error_rows = None, None, None
    # Backward alone is timed through graphs kept with retain_graph=True, which
    # torch.compile's donated buffers forbid.
    patch = (torch._functorch.config.patch(donated_buffer=False) if case.mode == "train_bwd"
             and hasattr(torch._functorch.config, "donated_buffer") else contextlib.nullcontext())
    try:
        with patch:
            built = case.build(s)
            checks, source = built.checks, built.source
            times = measure.time_interleaved(built.fns, max(s.repeats, case.min_repeats),
                                             s.warmup, s.device, case.clock)
            # A graph replay allocates nothing (its pool is reserved at capture): no peak.
            peaks = {n: None if n.endswith("+cuda-graph") else measure.peak_memory(fn, s.device)
                     for n, fn in built.fns.items()}
            # Bytes saved for backward, every training row with a forward (a graph replay and
            # backward alone save nothing new).
            saved = {n: measure.saved_for_backward(fn, built.params or ())
                     if case.mode in ("train_fwd", "train_step") and not n.endswith("+cuda-graph")
                     else None for n, fn in built.fns.items()}
            if s.device.type == "cuda":
                torch.cuda.synchronize(s.device)  # an asynchronous error is this case's
    except Exception as e:  # noqa: BLE001 - one failing case must not end a long run
        fatal = e if _is_fatal(e) else None
        error_rows = [dict(base, contestant=None, error=f"{type(e).__name__}: {e}",
                           traceback=traceback.format_exc(limit=6))]
    finally:
        built = None
        try:  # nothing compiled or allocated for this case outlives it
            torch._dynamo.reset()
            gc.collect()
            if s.device.type == "cuda" and fatal is None:
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            fatal = fatal or e
            error_rows = error_rows or [dict(base, contestant=None, error=f"cleanup: {e}")]
    if fatal is not None:
        raise DeviceBroken(f"{type(fatal).__name__}: {fatal}", error_rows) from fatal
    if error_rows is not None:
        return error_rows
    rows = []
    for name, ms in times.items():
        st = measure.summarize(ms)
        rows.append(dict(base, contestant=name, backend=suites.resfuse_backend(name), **st,
                         img_per_s=case.images / (st["median_ms"] * 1e-3),
                         peak_bytes=peaks[name], mem_saved_bytes=saved[name],
                         **checks.get(name, {}),
                         **({"model_source": source} if source else {})))
    if case.fused_calls:
        per_call_overhead(rows, case.fused_calls)
    return rows


def per_call_overhead(rows: list, calls: int):
    """The overhead case: microseconds per fused call of each contestant, and resfuse's
    Python overhead per call over the bare oneDNN calls."""
    us = {r["contestant"]: r["median_ms"] * 1e3 / calls for r in rows}
    for r in rows:
        r["us_per_fused_call"] = us[r["contestant"]]
        if r["backend"] is not None and BARE_ONEDNN in us:
            r["python_overhead_us"] = us[r["contestant"]] - us[BARE_ONEDNN]


def finish_rows(rows: list, ceil: dict):
    """Speed-ups against eager and torch.compile of the same case, and roofline fractions."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["suite"], r["case"], r["mode"], r["dtype"], r["layout"], r["batch"]),
                           []).append(r)
    for group in by_case.values():
        ref = {r["contestant"]: r["median_ms"] for r in group if r.get("median_ms")}
        for r in group:
            if not r.get("median_ms"):
                continue
            r["speedup_vs_eager"] = ref[EAGER] / r["median_ms"] if EAGER in ref else None
            r["speedup_vs_compile"] = ref[COMPILE] / r["median_ms"] if COMPILE in ref else None
            saved_eager = next((q.get("mem_saved_bytes") for q in group
                                if q["contestant"] == EAGER), None)
            r["mem_saved_vs_eager"] = (r["mem_saved_bytes"] / saved_eager
                                       if r.get("mem_saved_bytes") is not None and saved_eager
                                       else None)
            if FREEZING in ref:
                r["speedup_vs_freezing"] = ref[FREEZING] / r["median_ms"]
            if r.get("bytes") is not None and r.get("flops") is not None:
                r.update(measure.roofline(r["bytes"], r["flops"], r["median_ms"], ceil, r["dtype"]))


def print_table(rows: list, out=sys.stdout):
    cols = ("case", "mode", "contestant", "median ms", "p20-p80", "vs eager", "vs compile",
            "GB/s", "TFLOP/s", "of roof", "peak MiB", "saved MiB", "saved/eager", "rel err")
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append((r["case"][:58], r["mode"], "ERROR", r["error"][:60], "", "", "", "", "",
                          "", "", "", "", ""))
            continue
        if r.get("mode") == "budget":  # bench/memory.py: a batch found, not a time
            lines.append((r["case"][:58], r["mode"], r["contestant"],
                          f"batch {r['mem_budget_batch']}", "", "", "", "", "", "", "", "",
                          "" if r.get("mem_budget_batch_vs_eager") is None else
                          f"x{r['mem_budget_batch_vs_eager']:.2f} eager's", ""))
            continue
        f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
        lines.append((r["case"][:58], r["mode"], r["contestant"], f(r["median_ms"], ".3f"),
                      f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", f(r.get("speedup_vs_eager"), ".2f"),
                      f(r.get("speedup_vs_compile"), ".2f"), f(r.get("gbs"), ".0f"),
                      f(r.get("tflops"), ".1f"), f(r.get("frac_of_roofline"), ".0%"),
                      f(None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20, ".0f"),
                      f(None if r.get("mem_saved_bytes") is None else r["mem_saved_bytes"] / 2**20,
                        ".1f"), f(r.get("mem_saved_vs_eager"), ".2f"),
                      ("" if r.get("rel_err") is None else
                       f"{r['rel_err']:.1e}" + (" !" if r.get("parity_ok") is False else ""))))
    widths = [max(len(c), *(len(l[i]) for l in lines)) if lines else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)), file=out)
    last = None
    for l in lines:
        key = (l[0], l[1])
        if last is not None and key[0] != last[0]:
            print("", file=out)
        last = key
        print("  ".join(v.ljust(w) for v, w in zip(l, widths)), file=out)


CSV_FIELDS = ("suite", "case", "mode", "contestant", "backend", "dtype", "layout", "batch",
              "image", "shapes", "median_ms", "p20_ms", "p80_ms", "repeats", "img_per_s",
              "speedup_vs_eager", "speedup_vs_compile", "speedup_vs_freezing", "bytes",
              "bytes_eager", "flops", "gbs", "tflops", "bound", "floor_ms", "frac_of_roofline",
              "peak_bytes", "mem_saved_bytes", "mem_saved_vs_eager", "mem_budget_bytes",
              "mem_budget_batch", "mem_budget_batch_vs_eager", "rel_err", "rel_err_fp64",
              "judged_rel_err", "parity_ok", "us_per_fused_call", "python_overhead_us",
              "error") + TAGS


def fresh_stem(out_dir: str, stem: str) -> str:
    """`stem`, or `stem-2`, `stem-3`, ... : the first whose JSON and CSV are not in `out_dir`
    yet, so a second run on the same day and commit never replaces the first one's files."""
    name, n = stem, 1
    while any(os.path.exists(os.path.join(out_dir, name + ext)) for ext in (".json", ".csv")):
        n += 1
        name = f"{stem}-{n}"
    return name


def write_results(result: dict, out_dir: str, stem: str = None) -> tuple:
    """The run's JSON and CSV as `out_dir/<stem>.{json,csv}` (rewritten after every case: the
    stem is chosen once per run, by `fresh_stem`)."""
    os.makedirs(out_dir, exist_ok=True)
    stem = stem or measure.result_stem(result)
    jpath = os.path.join(out_dir, stem + ".json")
    with open(jpath, "w") as f:
        json.dump(result, f, indent=1)
    cpath = os.path.join(out_dir, stem + ".csv")
    with open(cpath, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v
                        for k, v in r.items()})
    return jpath, cpath


def main(argv=None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    names, skipped = contestants(a)
    grid = [suites.Settings(a.device, dt, lay, b, a.image, names, a.repeats, a.warmup)
            for dt in a.dtypes for lay in a.layouts for b in a.batches]
    modes = None if a.mode is None else set(_list(a.mode))
    plan = [(s, c) for s in grid for c in suites.cases(a.suite, s)
            if (a.only is None or a.only in c.name) and (modes is None or c.mode in modes)]
    if a.list:
        for s, c in plan:
            print(f"{c.suite:7} {c.mode:10} {s.dtype_name:9} {s.layout:13} batch {s.batch:4}  {c.name}")
        print(f"{len(plan)} cases; contestants: {', '.join(names)}")
        return 0
    if not plan:
        print("no case matches", file=sys.stderr)
        return 2
    if a.compile != "off":
        _configure_compile()
    if a.device.type == "cuda":
        # cuDNN picks its convolution algorithms by measuring, as training scripts ask it to
        # (torchvision's reference scripts do): the same for every contestant.
        torch.backends.cudnn.benchmark = not a.no_cudnn_benchmark
    env = measure.environment(a.device)
    print(f"resfuse {env['resfuse']} @ {env['commit']} on {env['device']} ({env['device_type']}"
          f"{', driver ' + env['driver'] if env['driver'] else ''}), torch {env['torch']}, "
          f"triton {env['triton']}, CUDA {env['cuda']}, {env['threads']} threads")
    print(f"suite {a.suite}: {len(plan)} cases x {len(names)} contestants "
          f"({', '.join(names)})" + "".join(f"; skipped {k}: {v}" for k, v in skipped.items()))
    t0 = time.monotonic()
    ceil = measure.ceilings(a.device, a.dtypes)
    print("ceilings (measured now): copy {:.1f} GB/s; {}".format(
        ceil["copy_gbs"], "; ".join(f"{k} matmul {v:.2f}, 1x1 conv {ceil['conv1x1_tflops'][k]:.2f} TFLOP/s"
                                    for k, v in ceil["matmul_tflops"].items())))
    settings = dict(suite=a.suite, device=str(a.device), dtypes=[str(d)[6:] for d in a.dtypes],
                    layouts=a.layouts, batches=a.batches, image=a.image, contestants=names,
                    skipped_contestants=skipped, compile=a.compile, repeats=a.repeats,
                    warmup=a.warmup, only=a.only, mode=a.mode, freezing=a.freezing,
                    cudnn_benchmark=torch.backends.cudnn.benchmark,
                    memory_budget_gb=a.memory_budget,
                    parity_floor={str(k)[6:]: v for k, v in suites.FLOOR.items()},
                    model_parity_limit={str(k)[6:]: v for k, v in suites.MODEL_LIMIT.items()},
                    cases=len(plan), complete=False, stopped=None, seconds=None)
    result = dict(schema=SCHEMA, env=env, ceilings=ceil, settings=settings, rows=[])
    rows = result["rows"]
    stem = fresh_stem(a.out, measure.result_stem(result))  # never an earlier run's files

    def on_sigterm(signum, frame):  # e.g. `timeout`: end like Ctrl-C, keeping what was measured
        raise KeyboardInterrupt(f"signal {signum}")
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    progress = measure.Progress(len(plan), enabled=not a.no_progress)
    try:
        for s, case in plan:
            progress.step(f"{case.suite} · {case.name} · {case.mode} · {s.dtype_name} {s.layout} "
                          f"batch {s.batch}")
            rows += run_case(case, s, env)
            finish_rows(rows, ceil)
            settings["seconds"] = round(time.monotonic() - t0, 1)
            write_results(result, a.out, stem)  # after every case: a killed run keeps its rows
        if a.memory_budget is not None and a.suite == "memory":
            import memory
            for s in {(g.dtype, g.layout): g for g in grid}.values():  # (not per batch)
                progress.step(f"memory · largest batch in {a.memory_budget:g} GB · {s.dtype_name}")
                memory.budget_rows(a.memory_budget, s, env, tags=TAGS, rows=rows,
                                   models=[m for m in memory.MEMORY_MODELS
                                           if a.only is None or a.only in m])
                write_results(result, a.out, stem)
        settings["complete"] = True
    except (KeyboardInterrupt, DeviceBroken) as e:
        rows += getattr(e, "rows", [])
        settings["stopped"] = f"{type(e).__name__}: {e}"
        print(f"\nstopped after {len({(r['case'], r['mode'], r['dtype'], r['layout'], r['batch']) for r in rows})}"
              f" of {len(plan)} cases: {settings['stopped']}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
    finish_rows(rows, ceil)
    settings["seconds"] = round(time.monotonic() - t0, 1)
    print()
    print_table(rows)
    jpath, cpath = write_results(result, a.out, stem)
    print(f"\nwrote {os.path.relpath(jpath)} and {os.path.relpath(cpath)} "
          f"({result['settings']['seconds']:.0f} s)")
    plots_failed = False
    if not a.no_plots:
        import plots
        try:
            made = plots.make_plots(result, a.out, stem=stem)
        except Exception as e:  # noqa: BLE001 - the results are written; a plot bug costs the plot
            made, plots_failed = [], True
            print(f"plots FAILED ({type(e).__name__}: {e}); the results above are written",
                  file=sys.stderr)
        if made is None:
            print("plots: matplotlib is not installed (pip install 'resfuse[plots]')")
        for path in made or []:
            print(f"wrote {os.path.relpath(path)}")
    errors = [r for r in rows if r.get("error")]
    flagged = [r for r in rows if r.get("parity_ok") is False]
    for r in errors:
        print(f"ERROR {r['case']} {r['mode']}: {r['error']}", file=sys.stderr)
    for r in flagged:
        why = (f"error against float64 eager {r['rel_err_fp64']:.2e}, more than twice eager's "
               f"plus the floor" if r.get("rel_err_fp64") is not None else
               f"relative error against eager {r['judged_rel_err']:.2e} above the limit")
        print(f"PARITY {r['case']} {r['mode']} {r['contestant']}: {why}", file=sys.stderr)
    return 1 if errors or flagged or plots_failed or not settings["complete"] else 0


if __name__ == "__main__":
    sys.exit(main())
