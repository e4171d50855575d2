#!/usr/bin/env python3
"""Render the measured results from the committed result files, and `auto`'s table.

    python bench/report.py            # rewrites the results sections of README.md (compact)
                                      # and docs/benchmarks.md (every table), and
                                      # resfuse/backend/measured.py (auto's measured choices)
    python bench/report.py --print    # prints the full section instead

Every figure comes from a JSON file under bench/results/ (bench/run.py's suites; also
bench/cuda_kernels.py's kernel runs and the model-only runs of bench/run.py before the suites),
with its date, device, commit and settings; plots are the PNG files bench/run.py wrote beside a
result (`--plots` makes them from the JSON where they are missing: needs matplotlib).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- results:start -->", "<!-- results:end -->"
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")
MEASURED = os.path.join(ROOT, "resfuse", "backend", "measured.py")


SCHEMA = "resfuse-bench/2"


def load(results_dir: str) -> list:
    """The runs to show, newest first: per device type, the newest bench/run.py run of each
    suite (suites older than a newer `all` run of the same device type left out, and runs
    whose every row newer runs measured again); the newest
    bench/cuda_kernels.py run per device; and older model-only runs (schema 1) only for a
    device type with no suite run."""
    runs = read_all(results_dir)
    newest = {}

    def keep(key, r):
        if key not in newest or r["env"]["date"] > newest[key]["env"]["date"]:
            newest[key] = r
    suite_types = {r["env"]["device_type"] for r in runs if r.get("schema") == SCHEMA}
    for r in runs:
        if r.get("schema") == SCHEMA:
            # (a run restricted to some modes or cases, `--mode`, `--only`, stands beside the
            # others)
            keep(("suite", r["env"]["device_type"], r["settings"]["suite"],
                  r["settings"].get("mode"), r["settings"].get("only")), r)
        elif r.get("kind") == "cuda-kernels":  # bench/cuda_kernels.py: its own table
            keep(("cuda-kernels", r["env"]["device"], r["dtype"], r["layout"]), r)
        elif r.get("kind") == "decide-grid":  # bench/decide.py's correctness grid
            keep(("decide-grid", r["env"]["device"]), r)
        elif r.get("kind") is not None:  # a kind this report does not know: not shown
            continue
        elif r["env"]["device_type"] not in suite_types:  # bench/run.py before the suites
            s = r["settings"]
            keep((r["env"]["device_type"], s["model"], s["dtype"], s["layout"]), r)
    for key, r in list(newest.items()):
        if key[0] == "suite" and key[2] not in ("all", "decide"):
            full = newest.get(("suite", key[1], "all", None, None))
            if full is not None and full["env"]["date"] >= r["env"]["date"]:
                del newest[key]
    # A suite run every one of whose rows (case, mode, dtype, layout, batch, image) a newer
    # shown run of the same device type also measured is superseded (a models run redone as an
    # eval run and a training run, say).
    def row_keys(r):
        return {(x.get("suite"), x.get("case"), x.get("mode"), x.get("dtype"), x.get("layout"),
                 x.get("batch"), r["settings"].get("image")) for x in r.get("rows", [])}
    suite_runs = [r for r in newest.values() if r.get("schema") == SCHEMA]
    for key, r in list(newest.items()):
        if key[0] != "suite" or not r.get("rows"):
            continue
        newer = set().union(*(row_keys(o) for o in suite_runs if o is not r
                              and o["env"]["device_type"] == r["env"]["device_type"]
                              and o["env"]["date"] > r["env"]["date"]))
        if row_keys(r) <= newer:
            del newest[key]
    order = lambda r: (r.get("schema") != SCHEMA and r.get("kind") != "decide-grid",  # noqa: E731
                       r["env"].get("device_type") != "cuda", r.get("kind") == "cuda-kernels")
    return sorted(sorted(newest.values(), key=lambda r: r["env"]["date"], reverse=True), key=order)


def read_all(results_dir: str) -> list:
    """Every JSON result file under `results_dir`, oldest name first, each with `_file`."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        r["_file"] = os.path.relpath(path, ROOT)
        runs.append(r)
    return runs


def render(runs: list) -> str:
    """Every table of the shown runs (docs/benchmarks.md)."""
    if not runs:
        return "No results recorded yet."
    out = []
    if not any(r.get("schema") == SCHEMA and r["env"]["device_type"] == "cuda" for r in runs):
        out += ["No GPU run of the benchmark suite (`bench/run.py`) is recorded yet; the GPU "
                "figures below are from `bench/cuda_kernels.py`.", ""]
    for r in runs:
        if r.get("schema") == SCHEMA:
            out += render_suite(r)
        elif r.get("kind") == "cuda-kernels":
            out += render_kernels(r)
        elif r.get("kind") == "decide-grid":
            out += render_grid(r)
        else:
            out += render_model_run(r)
    return "\n".join(out).rstrip()


# -- bench/run.py suites ------------------------------------------------------------------------
MODE_NAMES = {"train_step": "training step", "train_fwd": "training forward",
              "train_bwd": "training backward", "eval": "eval"}


def _x(v) -> str:
    return "" if v is None else f"{v:.2f}×"


def _ms(v) -> str:
    return "" if v is None else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def _find(rows, suite, case_prefix, mode, contestant):
    for r in rows:
        if (r.get("suite") == suite and r.get("case", "").startswith(case_prefix)
                and r.get("mode") == mode and r.get("contestant") == contestant
                and r.get("median_ms")):
            return r
    return None


def targets(run: dict) -> list:
    """The targets (docs/design.md, "Targets") against this run: (target, measured, met) rows, for what
    the run measured (the GPU targets at ResNet-50 stage-1 shapes)."""
    rows, out = run["rows"], []
    auto = "resfuse[auto]"

    def add(text, value, at_least=None, at_most=None, fmt=_x):
        if value is None:
            out.append((text, "not measured", ""))
            return
        ok = (at_least is None or value >= at_least) and (at_most is None or value <= at_most)
        shown = fmt(value)
        if not ok and fmt is _x and shown in (fmt(at_least), fmt(at_most)):
            shown = f"{value:.3f}×"  # (a miss that rounds to the target: "1.00× no" reads wrong)
        out.append((text, shown, "yes" if ok else "no"))

    def get(r, key):
        return None if r is None else r.get(key)
    if run["settings"].get("suite") == "memory":  # bench/memory.py: the memory targets alone
        for r in rows:
            if r.get("case") != "resnet50" or r.get("mem_saved_vs_eager") is None:
                continue
            c = r["contestant"]
            if c.endswith(":low"):
                add(f"ResNet-50 saved activations, {c} ≤ 0.55× eager",
                    r["mem_saved_vs_eager"], at_most=0.55)
            elif c.startswith("resfuse[") and not (  # (the CPU's eager backend: torch's chain)
                    run["env"]["device_type"] == "cpu" and c in ("resfuse[auto]", "resfuse[eager]")):
                add(f"ResNet-50 saved activations, {c} (default) ≤ 0.85× eager",
                    r["mem_saved_vs_eager"], at_most=0.85)
        return out
    if run["env"]["device_type"] == "cuda":
        side = max((r["shapes"]["x"][2] for r in rows
                    if r.get("case", "").startswith("scale-bias-add-relu 256 @")), default=None)
        for mode, what in (("train_fwd", "forward"), ("train_bwd", "backward")):
            gbs = get(_find(rows, "ops", f"scale-bias-add-relu 256 @{side}", mode, auto), "gbs")
            add(f"scale-bias-add-act {what} ≥ 85 % of copy bandwidth",
                None if gbs is None else gbs / run["ceilings"]["copy_gbs"], 0.85,
                fmt=lambda v: f"{v:.0%}")
        r = _find(rows, "blocks", "resnet50 layer1 bottleneck 256->64->256", "train_step", auto)
        add("bottleneck training step ≥ 1.5× eager", get(r, "speedup_vs_eager"), 1.5)
        add("bottleneck training step ≥ 1.25× torch.compile", get(r, "speedup_vs_compile"), 1.25)
        r = _find(rows, "models", "resnet50", "train_step", auto)
        add("ResNet-50 training step ≥ 1.4× eager", get(r, "speedup_vs_eager"), 1.4)
        add("ResNet-50 training step, img/s (long run: ≈ 7,000)", get(r, "img_per_s"), 7000,
            fmt=lambda v: f"{v:,.0f}")
        e = _find(rows, "models", "resnet50", "train_step", "eager")
        peak, peak_eager = get(r, "peak_bytes"), get(e, "peak_bytes")
        r = _find(rows, "models", "resnet50", "eval", auto)
        add("ResNet-50 eval ≥ 1.5× eager", get(r, "speedup_vs_eager"), 1.5)
        add("ResNet-50 eval ≥ torch.compile", get(r, "speedup_vs_compile"), 1.0)
        add("peak training memory ≤ 0.75× eager (above the step's inputs)",
            peak / peak_eager if peak and peak_eager else None, at_most=0.75)
    else:  # the CPU: converted models without a compile step, per layout and batch
        def at(model, mode, layout, batch):
            return next((x for x in rows if x.get("suite") == "models" and x.get("case") == model
                         and x.get("mode") == mode and x.get("contestant") == auto
                         and x.get("layout") == layout and x.get("batch") == batch), None)
        for model, name in (("resnet50", "ResNet-50"), ("resnet18", "ResNet-18")):
            for b in sorted({x["batch"] for x in rows if x.get("case") == model}):
                r = at(model, "eval", "nchw", b)
                if r is not None:
                    add(f"CPU: {name} eval, NCHW, batch {b} ≥ 1.4× eager",
                        r.get("speedup_vs_eager"), 1.4)
                    if r.get("speedup_vs_freezing") is not None:
                        add(f"CPU: {name} eval, NCHW, batch {b} ≥ torch.compile(freezing)",
                            r["speedup_vs_freezing"], 1.0)
                r = at(model, "eval", "channels_last", b)
                if r is not None:
                    add(f"CPU: {name} eval, channels_last, batch {b} ≥ 1.15× eager",
                        r.get("speedup_vs_eager"), 1.15)
                for layout in ("nchw", "channels_last"):
                    r = at(model, "train_step", layout, b)
                    if r is not None:
                        add(f"CPU: {name} training step, {layout}, batch {b} within 5 % of "
                            "eager (≥ 0.95×)", r.get("speedup_vs_eager"), 0.95)
    return out


def _grouped(rows, suite):
    groups = {}
    for r in rows:
        if r.get("suite") != suite:
            continue
        key = (r["case"], r["mode"], r["dtype"], r["layout"], r["batch"])
        groups.setdefault(key, []).append(r)
    return groups


def _case_table(run: dict, suite: str, contestants: list, multi: bool) -> list:
    head = ["case", "mode"] + (["dtype, layout, batch"] if multi else []) + ["eager ms"]
    head += [f"{c} vs eager" for c in contestants]
    head += ["resfuse[auto] of roofline", "rel. error vs eager"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * 2 + " --- |" * multi +
           " ---: |" * (len(head) - 2 - multi)]
    for (case, mode, dtype, layout, batch), group in _grouped(run["rows"], suite).items():
        by = {r.get("contestant"): r for r in group}
        err = next((r for r in group if r.get("error")), None)
        cells = [case, mode] + ([f"{dtype}, {layout}, {batch}"] if multi else [])
        if err is not None:
            out.append("| " + " | ".join(cells + [f"error: {err['error'][:80]}"] +
                                         [""] * (len(head) - len(cells) - 1)) + " |")
            continue
        cells.append(_ms((by.get("eager") or {}).get("median_ms")))
        cells += [_x((by.get(c) or {}).get("speedup_vs_eager")) for c in contestants]
        a = by.get("resfuse[auto]") or {}
        cells.append("" if a.get("frac_of_roofline") is None else
                     f"{a['frac_of_roofline']:.0%} ({a.get('bound')})")
        diffs = [r["rel_err"] for r in group if r.get("rel_err") is not None]
        cells.append(f"{max(diffs):.1e}" if diffs else "")
        out.append("| " + " | ".join(cells) + " |")
    return out


def _memory_table(run: dict) -> list:
    """The memory suite (bench/memory.py): bytes saved for backward per contestant, and the
    largest batch under the run's budget."""
    steps = [r for r in run["rows"] if r.get("suite") == "memory" and r.get("mode") == "train_step"]
    budget = [r for r in run["rows"] if r.get("suite") == "memory" and r.get("mode") == "budget"]
    if not steps and not budget:
        return []
    out = ["| model | contestant | saved for backward | vs eager | peak | step ms | step vs "
           "eager | largest batch in budget |", "| --- | --- |" + " ---: |" * 6]
    found = {(r["case"].split(" ")[0], r["contestant"]): r for r in budget}
    for r in steps:
        if r.get("error"):
            out.append(f"| {r['case']} | error: {r['error'][:80]} | | | | | | |")
            continue
        b = found.get((r["case"], r["contestant"])) or {}
        cells = [r["case"], r["contestant"],
                 "" if r.get("mem_saved_bytes") is None else f"{r['mem_saved_bytes'] / 2**20:.1f} MiB",
                 "" if r.get("mem_saved_vs_eager") is None else f"{r['mem_saved_vs_eager']:.2f}",
                 "" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.2f} GiB",
                 _ms(r.get("median_ms")), _x(r.get("speedup_vs_eager")),
                 "" if b.get("mem_budget_batch") is None else
                 f"{b['mem_budget_batch']} (×{b.get('mem_budget_batch_vs_eager') or 0:.2f})"]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def render_suite(run: dict) -> list:
    e, s, c = run["env"], run["settings"], run["ceilings"]
    stem = os.path.splitext(run["_file"])[0]
    files = f"[`{run['_file']}`]({run['_file']})"
    if os.path.exists(os.path.join(ROOT, stem + ".csv")):
        files += f", [csv]({stem}.csv)"
    dev = e["device"] + (f", driver {e['driver']}" if e.get("driver") else
                         f" ({e['threads']} threads)")
    out = [f"**Suite `{s['suite']}`** — {dev}; torch {e['torch']}"
           + (f" (CUDA {e['cuda']})" if e.get("cuda") else "")
           + (f", triton {e['triton']}" if e.get("triton") else "")
           + f"; resfuse {e['resfuse']} @ `{e['commit']}`, {e['date'][:10]}; "
           f"{', '.join(s['dtypes'])}, {', '.join(s['layouts'])}, batch "
           f"{', '.join(map(str, s['batches']))}, image side {s['image']}; medians of "
           f"{s['repeats']} interleaved repetitions ({files}). Ceilings measured in the same run: "
           f"copy {c['copy_gbs']:.0f} GB/s (read + write); "
           + "; ".join(f"{k} {v:.0f} TFLOP/s" if v >= 10 else f"{k} {v:.2f} TFLOP/s"
                       for k, v in c["compute_tflops"].items())
           + " (the larger of a matmul and a 1×1 convolution)."
           + ("" if s.get("complete", True) else
              f" **Incomplete run** ({s.get('stopped')}): only the cases measured are shown."),
           ""]
    tg = targets(run)
    if tg:
        out += ["| target (docs/design.md) | measured (resfuse[auto]) | met |", "| --- | ---: | :---: |"]
        out += [f"| {t} | {m} | {ok} |" for t, m, ok in tg]
        out.append("")
    multi = len(s["dtypes"]) * len(s["layouts"]) * len(s["batches"]) > 1
    others = [c for c in s["contestants"] if c != "eager"]
    models = [r for r in run["rows"] if r.get("suite") == "models"]
    if models:
        head = ["model", "mode"] + (["dtype, layout, batch"] if multi else []) + \
            ["contestant", "median ms", "p20–p80 ms", "img/s", "vs eager", "vs torch.compile",
             "peak memory", "rel. error vs eager"]
        out += ["| " + " | ".join(head) + " |",
                "|" + " --- |" * (3 + multi) + " ---: |" * (len(head) - 3 - multi)]
        for r in models:
            if r.get("error"):
                cells = [r["case"], r["mode"]] + (["" ] if multi else []) + \
                    [f"error: {r['error'][:80]}"]
                out.append("| " + " | ".join(cells + [""] * (len(head) - len(cells))) + " |")
                continue
            cells = [r["case"], MODE_NAMES.get(r["mode"], r["mode"])]
            cells += [f"{r['dtype']}, {r['layout']}, {r['batch']}"] if multi else []
            cells += [r["contestant"], _ms(r["median_ms"]), f"{_ms(r['p20_ms'])}–{_ms(r['p80_ms'])}",
                      f"{r['img_per_s']:,.0f}" if r["img_per_s"] >= 100 else f"{r['img_per_s']:.1f}",
                      _x(r.get("speedup_vs_eager")), _x(r.get("speedup_vs_compile")),
                      "" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**30:.2f} GiB",
                      "" if r.get("rel_err") is None else f"{r['rel_err']:.1e}"]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += _memory_table(run)
    for suite, title in (("blocks", "Blocks (ResNet-18 and ResNet-50 block shapes)"),
                         ("chains", "Lone chains (conv-BN, conv-BN-ReLU, BN-ReLU-conv, as convert fuses them)"),
                         ("ops", "Ops (conv-bn-act on ResNet-50's conv shapes; scale-bias-add-act)")):
        if any(r.get("suite") == suite for r in run["rows"]):
            cs = [c for c in others if "+" not in c]
            out += [f"<details><summary>{title}: speed-up of each contestant against eager</summary>", ""]
            out += _case_table(run, suite, cs, multi)
            out += ["", "</details>", ""]
    for kind in ("speedup", "roofline", "memory"):
        png = f"{stem}-{kind}.png"
        if os.path.exists(os.path.join(ROOT, png)):
            out += [f"![{kind}]({png})", ""]
    return out


# -- bench/run.py before the suites (schema 1) and bench/cuda_kernels.py -------------------------
def render_model_run(r: dict) -> list:
    e, s, p = r["env"], r["settings"], r["parity"]
    out = [f"**{s['model']}** ({s['model_source']}), batch {s['batch']}, {s['size']}×{s['size']}, "
           f"{s['dtype']}, {s['layout']} — {e['device']} ({e['threads']} threads), "
           f"torch {e['torch']}, resfuse {e['resfuse']} @ `{e['commit']}`, {e['date'][:10]}; "
           f"median of {s['repeats']} interleaved repetitions "
           f"([`{r['_file']}`]({r['_file']})):", "",
           "| mode | contestant | median ms | p20–p80 ms | img/s | vs eager |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        mode = {"eval": "eval (inference)", "train": "training step"}.get(row["mode"], row["mode"])
        out.append(f"| {mode} | {row['contestant']} | {row['median_ms']:.1f} | "
                   f"{row['p20_ms']:.1f}–{row['p80_ms']:.1f} | {row['img_per_s']:.1f} | "
                   f"{row['speedup_vs_eager']:.3f}× |")
    out += ["", f"Parity in the same run: eval output max relative difference "
            f"{p['eval_output_rel_diff']:.1e}; training-step loss {p['train_loss_resfuse']:.6f} "
            f"vs {p['train_loss_eager']:.6f} eager, largest parameter-gradient relative "
            f"difference {p['train_grad_max_rel_diff']:.1e}, running statistics "
            f"{p['running_stats_max_rel_diff']:.1e}.", ""]
    return out


def render_kernels(r: dict) -> list:
    """A bench/cuda_kernels.py run: kernels against the copy ceiling, blocks against eager and
    torch.compile."""
    e, c = r["env"], r["ceilings"]
    out = [f"**CUDA backend, kernels and a bottleneck block** — {e['device']}, {r['dtype']}, "
           f"{r['layout']}, batch {r['batch']}, torch {e['torch']} (CUDA {e['cuda']}), "
           f"resfuse @ `{e['commit']}`, {e['date'][:10]}; CUDA-event medians "
           f"([`{r['_file']}`]({r['_file']})). Ceilings measured in the same run: copy "
           f"{c['copy_gbs']:.0f} GB/s (read + write), bf16 matmul {c['matmul_bf16_tflops']:.0f} TFLOP/s.", "",
           "| kernel (N×256×56×56) | median ms | GB/s | of copy |", "| --- | ---: | ---: | ---: |"]
    for row in r["rows"]:
        if row["kind"] == "kernel":
            out.append(f"| {row['name']} | {row['ms']:.3f} | {row['gbs']:.0f} | {row['frac_copy']:.0%} |")
    out += ["", "| BN + add + ReLU, training forward + backward | median ms |", "| --- | ---: |"]
    for row in r["rows"]:
        if row["kind"] == "bn_act_train":
            out.append(f"| {row['name'].split(': ', 1)[-1]} | {row['ms']:.3f} |")
    out += ["", "| bottleneck 256-64-256, 56×56 | contestant | median ms | p20–p80 ms | vs eager | "
            "vs torch.compile | peak memory above inputs |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        if row["kind"].startswith("block_"):
            mode = "training step" if row["kind"] == "block_train" else "eval"
            out.append(f"| {mode} | {row['name']} | {row['ms']:.3f} | {row['p20']:.3f}–{row['p80']:.3f} | "
                       f"{row['speedup_vs_eager']:.2f}× | {row['speedup_vs_compile']:.2f}× | "
                       f"{row['peak_bytes'] / 2**30:.2f} GiB |")
    out.append("")
    return out


# -- bench/decide.py's correctness grid ----------------------------------------------------------
def _grid_counts(r: dict) -> dict:
    """{contestant: (passed, checked)}; errors count as failed under the key 'error'."""
    got = {}
    for row in r["rows"]:
        name = row.get("contestant") or "error"
        ok, n = got.get(name, (0, 0))
        got[name] = (ok + bool(row.get("parity_ok")), n + 1)
    return got


def render_grid(r: dict) -> list:
    e, s = r["env"], r["settings"]
    counts = "; ".join(f"{k}: {ok} of {n} pass" for k, (ok, n) in _grid_counts(r).items())
    out = [f"**Correctness grid** (`bench/decide.py grid`) — {e['device']}, resfuse @ "
           f"`{e['commit']}`, {e['date'][:10]}; the ResNet-50 stage blocks, training and eval, "
           f"fp32/bf16 × channels_last/NCHW (sampled), batch {s['batch']}, against eager in "
           f"float64 tensor by tensor ([`{r['_file']}`]({r['_file']})): {counts or 'nothing ran'}"
           + ("" if s.get("complete") else " (incomplete run)") + ".", ""]
    fails = [row for row in r["rows"] if not row.get("parity_ok")]
    if fails:
        out += ["| block | mode | dtype | layout | contestant | error vs fp64 eager |",
                "| --- | --- | --- | --- | --- | ---: |"]
        for row in fails:
            err = (row.get("error") or "")[:80] or f"{row['rel_err_fp64']:.1e}"
            out.append(f"| {row['case']} | {row['mode']} | {row['dtype']} | {row['layout']} | "
                       f"{row.get('contestant') or 'error'} | {err} |")
        out.append("")
    return out


# -- the front page: one compact table per run -----------------------------------------------------
def _front_suite(r: dict) -> list:
    e, s = r["env"], r["settings"]
    suites = ("models", "blocks") if s["suite"] == "decide" else ("models",)
    rows = [x for x in r["rows"] if x.get("suite") in suites]
    others = [c for c in s["contestants"] if c != "eager"]
    dev = e["device"] + ("" if e.get("device_type") == "cuda" else f" ({e.get('threads')} threads)")
    out = [f"**{dev}** — suite `{s['suite']}`, {', '.join(s['dtypes'])}, "
           f"{', '.join(s['layouts'])}, batch {', '.join(map(str, s['batches']))}, image "
           f"{s['image']}; `{e['commit']}`, {e['date'][:10]} ([result file]"
           f"({r['_file']})" + ("" if s.get("complete", True) else "; incomplete run") + ")", ""]
    tg = [t for t in targets(r) if t[1] != "not measured"]
    if not (tg or rows):
        return []  # nothing for the front page (a CPU blocks or chains run): docs/benchmarks.md
    if tg:
        out += ["| target (docs/design.md) | measured | met |", "| --- | ---: | :---: |"]
        out += [f"| {t} | {m} | {ok} |" for t, m, ok in tg] + [""]
    groups = {}
    for x in rows:
        groups.setdefault((x["case"], x["mode"], x["dtype"], x["layout"], x["batch"]), []).append(x)
    if others == ["resfuse[auto]"] and len(tg) >= len(groups):
        # (a run of as many targets as cases, resfuse alone against eager: the targets give
        # its ratios, the times are in docs/benchmarks.md)
        groups = {}
    if groups:
        out += ["| case | mode | eager ms | " + " | ".join(f"{c} vs eager" for c in others) + " |",
                "| --- | --- | ---: |" + " ---: |" * len(others)]
        multi = len({k[2:] for k in groups}) > 1  # several dtypes, layouts or batches
        for (case, mode, dtype, layout, batch), group in groups.items():
            if multi:
                case = f"{case} · {dtype} {layout} b{batch}"
            by = {x.get("contestant"): x for x in group}
            err = next((x for x in group if x.get("error")), None)
            if err is not None:
                cells = [f"error: {err['error'][:60]}"] + [""] * len(others)
            else:
                cells = [_ms((by.get("eager") or {}).get("median_ms"))]
                cells += [_x((by.get(c) or {}).get("speedup_vs_eager")) for c in others]
            out.append(f"| {case} | {MODE_NAMES.get(mode, mode)} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def _front_kernels(r: dict) -> list:
    e = r["env"]
    out = [f"**{e['device']}** — `bench/cuda_kernels.py`, CUDA backend, {r['dtype']}, "
           f"{r['layout']}, batch {r['batch']}; `{e['commit']}`, {e['date'][:10]} "
           f"([`{os.path.basename(r['_file'])}`]({r['_file']})): the ResNet-50 layer1 bottleneck "
           f"(256-64-256, 56×56)", "",
           "| mode | contestant | median ms | vs eager | vs torch.compile | peak memory |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        if row["kind"].startswith("block_"):
            mode = "training step" if row["kind"] == "block_train" else "eval"
            out.append(f"| {mode} | {row['name']} | {row['ms']:.3f} | {row['speedup_vs_eager']:.2f}× "
                       f"| {row['speedup_vs_compile']:.2f}× | {row['peak_bytes'] / 2**30:.2f} GiB |")
    return out + [""]


def render_front(runs: list) -> str:
    """The README's results section: per shown run one compact table (whole models; on a GPU
    also the stage blocks), the targets it measured, and the grid's verdict; every table is in
    docs/benchmarks.md."""
    if not runs:
        return "No results recorded yet."
    out = []
    if not any(r.get("schema") == SCHEMA and r["env"]["device_type"] == "cuda" for r in runs):
        out += ["No GPU run of the benchmark suite or of `bench/decide.py` is recorded yet.", ""]
    for r in runs:
        if r.get("schema") == SCHEMA:
            out += _front_suite(r)
        elif r.get("kind") == "cuda-kernels":
            out += _front_kernels(r)
        elif r.get("kind") == "decide-grid":
            out += render_grid(r)[:1] + [""]
    out.append("Every table, the kernels one by one and the plots: "
               "[docs/benchmarks.md](docs/benchmarks.md#measured).")
    return "\n".join(out).rstrip()


# -- auto's measured table (resfuse/backend/measured.py) --------------------------------------------
AUTO_BACKENDS = ("cuda", "triton", "eager")


def auto_entries(run: dict) -> dict:
    """{(GPU kind, training, dtype, layout): backend} from one GPU run's block rows: per mode
    (training step, eval), dtype and layout, the resfuse backend with the least total time over
    the blocks, among those measured on every one of them with their checks passed, where
    every kernel backend available in the run was timed under its own name. Empty for a CPU
    run (auto is eager there) and where no backend qualifies."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from measure import device_slug
    if run.get("schema") != SCHEMA or run["env"].get("device_type") != "cuda":
        return {}
    kind = device_slug(run["env"])
    groups = {}
    for r in run["rows"]:
        if r.get("suite") != "blocks" or r.get("mode") not in ("train_step", "eval"):
            continue
        groups.setdefault((kind, r["mode"] != "eval", r["dtype"], r["layout"]), []).append(r)
    # A kernel backend available in the run but timed only as resfuse[auto] (the suites' way)
    # cannot be compared by name: then the run decides nothing for that key.
    available = [b for b in ("cuda", "triton")
                 if (run["env"].get("backends") or {}).get(b) == "ok"]
    out = {}
    for key, rows in groups.items():
        cases = {(r["case"], r["batch"]) for r in rows}
        named = {b: {(r["case"], r["batch"]) for r in rows if r.get("contestant") == f"resfuse[{b}]"}
                 for b in available}
        if any(named[b] != cases for b in available):
            continue
        total = {}
        for b in AUTO_BACKENDS:
            got = {(r["case"], r["batch"]): r["median_ms"] for r in rows
                   if r.get("contestant") == f"resfuse[{b}]" and r.get("median_ms")
                   and r.get("parity_ok") is True and not r.get("error")}
            if set(got) == cases:
                total[b] = sum(got.values())
        if total:
            out[key] = min(total, key=total.get)
    return out


def auto_table(runs: list) -> dict:
    """{key: (backend, result file)}: for each key, the newest committed GPU run that decides it."""
    table, when = {}, {}
    for r in runs:
        for key, backend in auto_entries(r).items():
            if key not in when or r["env"]["date"] > when[key]:
                table[key], when[key] = (backend, r["_file"]), r["env"]["date"]
    return table


def render_measured_py(table: dict) -> str:
    body = "".join(f"    {k!r}: {v!r},\n" for k, v in sorted(table.items()))
    return ('"""The backends `auto` takes where a committed benchmark measured them fastest.\n\n'
            "Generated by `python bench/report.py` from the GPU result files under bench/results/ (the\n"
            "block rows of each resfuse backend; docs/backends.md says how): do not edit by hand. Keys:\n"
            "(GPU kind, training, dtype, layout) -> (backend, the result file it was measured in).\n"
            '"""\n\n' + ("TABLE = {\n" + body + "}\n" if table else "TABLE = {}\n"))


def relink(section: str, path: str) -> str:
    """`section`'s repository-relative links (bench/..., docs/...) made relative to `path`'s
    folder (docs/benchmarks.md links ../bench/results/...)."""
    up = os.path.relpath(ROOT, os.path.dirname(os.path.abspath(path)))
    if up == ".":
        return section
    for folder in ("bench/", "docs/"):
        section = section.replace(f"]({folder}", f"]({up}/{folder}")
    return section


def _replace_section(path: str, section: str) -> bool:
    section = relink(section, path)
    with open(path) as f:
        text = f.read()
    if START not in text or END not in text:
        print(f"{path}: no {START} ... {END} markers", file=sys.stderr)
        return False
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{START}\n{section}\n{END}{tail}")
    print(f"updated {os.path.relpath(path)}")
    return True


def make_missing_plots(results_dir: str):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import plots
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        stem = os.path.splitext(path)[0]
        if r.get("schema") != SCHEMA or os.path.exists(stem + "-speedup.png"):
            continue
        r["_stem"] = stem
        made = plots.make_plots(r, os.path.dirname(path), stem=os.path.basename(stem))
        if made is None:
            raise SystemExit("--plots: matplotlib is not installed (pip install 'resfuse[plots]')")
        for p in made:
            print(f"wrote {os.path.relpath(p)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--readme", default=README, help="gets the compact section")
    ap.add_argument("--docs", default=DOCS, help="gets every table")
    ap.add_argument("--measured", default=MEASURED, help="auto's table (a Python module)")
    ap.add_argument("--print", action="store_true", dest="print_only")
    ap.add_argument("--plots", action="store_true",
                    help="write the PNG plots of suite results that have none (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.plots:
        make_missing_plots(args.results)
    runs = load(args.results)
    if args.print_only:
        print(render(runs))
        return 0
    ok = _replace_section(args.readme, render_front(runs))
    ok = _replace_section(args.docs, render(runs)) and ok if os.path.exists(args.docs) else ok
    with open(args.measured, "w") as f:
        f.write(render_measured_py(auto_table(read_all(args.results))))
    print(f"updated {os.path.relpath(args.measured)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
