#!/usr/bin/env python3
"""The one GPU call that decides the backends: `bash bench/gpu_check.sh decide` runs its three
stages, each under its own timeout, each writing its file as it goes (what finished is kept).

    python bench/decide.py grid  --out DIR   # sampled correctness grid: triton, cuda vs eager
    python bench/decide.py bench --out DIR   # stage blocks and ResNet-50: eager, torch.compile,
                                             # resfuse[cuda], resfuse[triton], peak memory
    python bench/decide.py table --out DIR   # which backend wins per op and shape (Markdown)
    ... --dry-run                            # the same on the CPU: Triton's interpreter, tiny
                                             # sizes (CI runs it so it cannot rot before a GPU)

- grid: the four ResNet-50 stage blocks (the identity bottleneck of each stage) in training
  (forward, backward, running statistics) and eval, in fp32 and bf16, channels_last and NCHW,
  sampled: each (block, mode) in two of the four dtype x layout pairs, every pair as often, the
  benchmark's own (bf16, channels_last) first. Each is bench/suites.py's block check: every
  output, running statistic and gradient against eager in float64, tensor by tensor, by the
  tolerance rule (docs/design.md). Writes `<date>-<gpu>-decide-grid-<commit>.json`.
- bench: those blocks' training step and eval, and the ResNet-50 training step, bf16,
  channels_last, batch 256, through bench/run.py's `run_case` (the same checks, timing and peak
  memory as the suites), most valuable first. Writes `<date>-<gpu>-decide-<commit>.json/.csv`,
  rewritten after every case.
- table: from those two files, `<date>-<gpu>-decide-table-<commit>.md`: per case the fastest
  resfuse backend, against eager and torch.compile, and the entries bench/report.py will put in
  `auto`'s table (resfuse/backend/measured.py) once the files are committed under bench/results/.

In the dry run bf16 is replaced by float64 in the grid and float32 in the bench (the interpreter
has no bf16), the sizes are tiny
(batch 2, image 64, 1/16 of the channels), torch.compile is left out, and the ResNet-50 step runs at image 32 without the
interpreted backends (a ResNet-50 step in Triton's interpreter takes minutes).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

KERNEL_BACKENDS = ("cuda", "triton")
MODES = ("train_step", "eval")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("grid", "bench", "table"))
    p.add_argument("--out", required=True, help="folder for the stage's file")
    p.add_argument("--dry-run", action="store_true",
                   help="on the CPU: Triton's interpreter, tiny sizes, float64 for bf16")
    p.add_argument("--batch", type=int, default=None, help="bench (default: 256; dry run: 2)")
    p.add_argument("--grid-batch", type=int, default=None, help="grid (default: 16; dry run: 2)")
    return p.parse_args(argv)


class Plan:
    """Sizes, dtypes and contestants of a decide run: on a GPU, or the dry run on the CPU."""

    def __init__(self, a: argparse.Namespace):
        import torch
        self.dry = a.dry_run
        if not self.dry and not torch.cuda.is_available():
            raise SystemExit("decide: no GPU visible (use --dry-run on a CPU)")
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.bf16 = torch.float64 if self.dry else torch.bfloat16
        self.dtypes = [torch.float32, self.bf16]
        self.bench_dtype = torch.float32 if self.dry else torch.bfloat16
        self.layouts = ["channels_last", "nchw"]
        self.image = 64 if self.dry else 224
        # The dry run's blocks are the stage blocks with 1/16 of the channels: the interpreter
        # runs one program at a time, and the full widths take minutes there.
        self.width_divisor = 16 if self.dry else 1
        self.batch = a.batch or (2 if self.dry else 256)
        self.grid_batch = a.grid_batch or (2 if self.dry else 16)
        self.repeats, self.warmup = (1, 0) if self.dry else (10, 2)

    def kernel_backends(self) -> tuple:
        """(available kernel backends, {contestant: why not} for the others)."""
        import resfuse
        status = resfuse.backends()
        ok = [b for b in KERNEL_BACKENDS if status.get(b) == "ok"]
        if self.dry and "triton" not in ok:  # the dry run is there to run it
            raise SystemExit(f"decide --dry-run: the triton backend does not run here: "
                             f"{status.get('triton')}")
        return ok, {f"resfuse[{b}]": status.get(b) for b in KERNEL_BACKENDS if b not in ok}

    def stage_blocks(self) -> list:
        """The identity bottleneck of each ResNet-50 stage, at this plan's image side."""
        import dataclasses
        import counts
        k = self.width_divisor
        return [dataclasses.replace(b, inplanes=b.inplanes // k, planes=b.planes // k)
                for b, _ in counts.resnet_blocks("resnet50", self.image) if not b.projection]


def _setup_env(dry: bool):
    if dry:  # before triton and resfuse are imported: the kernels run on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"
    os.environ.pop("RESFUSE_BACKEND", None)  # every contestant names its backend


def _stem(env: dict, what: str) -> str:
    import measure
    return "{}-{}-{}-{}".format(env["date"][:10], measure.device_slug(env), what, env["commit"])


def _write_json(path: str, obj: dict):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)  # a stage killed mid-write keeps the previous complete file


def grid_sample(blocks: list, dtypes: list, layouts: list) -> list:
    """(block, mode, dtype, layout) to check: each (block, mode) in two opposite dtype x layout
    pairs (the other dtype and the other layout), each (mode, dtype, layout) equally often; the
    first half first, the benchmark's pair (the last dtype, the first layout) leading it."""
    pairs = [(d, l) for d in reversed(dtypes) for l in layouts]  # opposite of p: 3 - p
    first, second = [], []
    for i, b in enumerate(blocks):
        for j, mode in enumerate(MODES):
            p = (i + j) % len(pairs)
            first.append((b, mode) + pairs[p])
            second.append((b, mode) + pairs[len(pairs) - 1 - p])
    return first + second


def run_grid(plan: Plan, out: str) -> int:
    import measure
    import run as bench_run
    import suites
    env = measure.environment(plan.device)
    backends, skipped = plan.kernel_backends()
    names = [suites.EAGER] + [f"resfuse[{b}]" for b in backends]
    sample = grid_sample(plan.stage_blocks(), plan.dtypes, plan.layouts)
    result = dict(kind="decide-grid", schema="resfuse-decide-grid/1", env=env,
                  settings=dict(dry_run=plan.dry, batch=plan.grid_batch, image=plan.image,
                                contestants=names, skipped_contestants=skipped,
                                cases=len(sample), complete=False, seconds=None,
                                parity_floor={str(k)[6:]: v for k, v in suites.FLOOR.items()}),
                  rows=[])
    path = os.path.join(out, bench_run.fresh_stem(out, _stem(env, "decide-grid")) + ".json")
    print(f"grid: {len(sample)} checks x {names}" + "".join(
        f"; skipped {k}: {v}" for k, v in skipped.items()), flush=True)
    bad = 0
    try:
        bad = _grid_loop(plan, sample, names, result, path)
    except KeyboardInterrupt as e:
        result["settings"]["stopped"] = f"KeyboardInterrupt: {e}"
        _write_json(path, result)
        print(f"grid: stopped ({e}); wrote {path}", flush=True)
        return 1
    result["settings"]["complete"] = True
    _write_json(path, result)
    print(f"grid: {bad} failing of {len(sample)} ({result['settings']['seconds']:.0f} s); "
          f"wrote {path}", flush=True)
    return 1 if bad else 0


def _grid_loop(plan: Plan, sample: list, names: list, result: dict, path: str) -> int:
    """Check each sampled case, writing the grid file after each; the number failing."""
    import torch
    import run as bench_run
    import suites
    t0, bad = time.monotonic(), 0
    for block, mode, dtype, layout in sample:
        s = suites.Settings(plan.device, dtype, layout, plan.grid_batch, plan.image, names, 1, 0)
        base = dict(case=block.name(), mode=mode, dtype=s.dtype_name, layout=layout,
                    batch=plan.grid_batch)
        try:
            checks = suites.block_case(block, mode, s).build(s).checks
            for name in names[1:]:
                c = checks[name]
                result["rows"].append(dict(base, contestant=name, rel_err=c["rel_err"],
                                           rel_err_fp64=c["rel_err_fp64"], parity_ok=c["parity_ok"]))
                bad += not c["parity_ok"]
            line = " ".join(f"{n}={'ok' if checks[n]['parity_ok'] else 'FAIL'}"
                            f"({checks[n]['rel_err_fp64']:.1e})" for n in names[1:])
        except Exception as e:  # noqa: BLE001 - one broken case must not hide the others
            bad += 1
            result["rows"].append(dict(base, contestant=None, error=f"{type(e).__name__}: {e}",
                                       traceback=traceback.format_exc(limit=6)))
            line = f"ERROR {type(e).__name__}: {e}"
            if bench_run._is_fatal(e):  # the CUDA context is gone: later cases cannot run
                print(f"  {base['case']} {mode} {base['dtype']} {layout}: {line}", flush=True)
                raise KeyboardInterrupt(f"CUDA context broken: {line}") from e
        finally:
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
        result["settings"]["seconds"] = round(time.monotonic() - t0, 1)
        _write_json(path, result)
        print(f"  {base['case']} {mode} {base['dtype']} {layout}: {line}", flush=True)
    return bad


def bench_cases(plan: Plan, s) -> list:
    """[(case, its settings)], most valuable first: the blocks' training steps, their evals,
    the ResNet-50 training step (in the dry run at image 32 and without the interpreter)."""
    import dataclasses
    import suites
    blocks = plan.stage_blocks()
    out = [(suites.block_case(b, "train_step", s), s) for b in blocks]
    out += [(suites.block_case(b, "eval", s), s) for b in blocks]
    sm = s if not plan.dry else dataclasses.replace(
        s, image=32, contestants=[suites.EAGER, "resfuse[auto]"])
    out.append((suites.model_case("resnet50", "train_step", sm), sm))
    for c, _ in out:
        if c.chain is not None:
            c.flops, c.nbytes = c.chain.flops(c.mode), c.chain.bytes(c.mode)
            c.nbytes_eager = c.chain.bytes(c.mode, "eager")
    return out


def run_bench(plan: Plan, out: str) -> int:
    import torch
    import measure
    import run as bench_run
    import suites
    backends, skipped = plan.kernel_backends()
    names = [suites.EAGER] + ([] if plan.dry else [suites.COMPILE])
    names += [f"resfuse[{b}]" for b in backends]
    if plan.dry:
        skipped[suites.COMPILE] = "dry run: left out (compiling takes minutes on a CPU)"
    dtype, layout = plan.bench_dtype, "channels_last"
    s = suites.Settings(plan.device, dtype, layout, plan.batch, plan.image, names, plan.repeats,
                        plan.warmup)
    cases = bench_cases(plan, s)
    if plan.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        bench_run._configure_compile()
    env = measure.environment(plan.device)
    ceil = measure.ceilings(plan.device, [dtype], repeats=1 if plan.dry else 10)
    settings = dict(suite="decide", device=str(plan.device), dtypes=[s.dtype_name],
                    layouts=[layout], batches=[plan.batch], image=plan.image, contestants=names,
                    skipped_contestants=skipped, compile="off" if plan.dry else "default",
                    repeats=plan.repeats, warmup=plan.warmup, only=None, dry_run=plan.dry,
                    cudnn_benchmark=torch.backends.cudnn.benchmark,
                    parity_floor={str(k)[6:]: v for k, v in suites.FLOOR.items()},
                    model_parity_limit={str(k)[6:]: v for k, v in suites.MODEL_LIMIT.items()},
                    cases=len(cases), complete=False, stopped=None, seconds=None)
    result = dict(schema=bench_run.SCHEMA, env=env, ceilings=ceil, settings=settings, rows=[])
    stem = bench_run.fresh_stem(out, measure.result_stem(result))
    print(f"bench: {len(cases)} cases x {names}" + "".join(
        f"; skipped {k}: {v}" for k, v in skipped.items()), flush=True)
    t0 = time.monotonic()
    status = 0
    try:
        for case, cs in cases:
            rows = bench_run.run_case(case, cs, env)
            result["rows"] += rows
            bench_run.finish_rows(result["rows"], ceil)
            settings["seconds"] = round(time.monotonic() - t0, 1)
            bench_run.write_results(result, out, stem)
            for r in rows:
                if r.get("error") or r.get("parity_ok") is False:
                    status = 1
                print(f"  {r['case']} {r['mode']} {r.get('contestant')}: " + (
                    f"ERROR {r['error']}" if r.get("error") else
                    f"{r['median_ms']:.3f} ms, parity {r.get('parity_ok')}"), flush=True)
        settings["complete"] = True
    except (KeyboardInterrupt, bench_run.DeviceBroken) as e:  # timeout's SIGTERM included
        result["rows"] += getattr(e, "rows", [])
        settings["stopped"] = f"{type(e).__name__}: {e}"
        status = 1
    settings["seconds"] = round(time.monotonic() - t0, 1)
    jpath, _ = bench_run.write_results(result, out, stem)
    print(f"bench: {settings['seconds']:.0f} s; wrote {jpath}", flush=True)
    return status


def _newest(paths: list):
    """The newest of `paths` (by modification time), loaded; None when there is none."""
    if not paths:
        return None
    with open(max(paths, key=os.path.getmtime)) as f:
        return json.load(f)


def render_table(bench: dict, grid: dict = None) -> str:
    """The decision in Markdown: the grid's verdicts, per case each contestant's time against
    eager and torch.compile with its peak memory and the fastest resfuse backend, and the
    entries `auto`'s table gets from this run."""
    import report
    out = []
    if grid is not None:
        g = grid["settings"]
        out += [f"## Correctness grid ({len(grid['rows'])} results of {g['cases']} sampled cases"
                f"{'' if g.get('complete') else ', INCOMPLETE'}; batch {g['batch']}, image "
                f"{g['image']})", ""]
        out += [f"Skipped: {k}: {v}" for k, v in g.get("skipped_contestants", {}).items()]
        out += ["", "| block | mode | dtype | layout | contestant | error vs fp64 eager | ok |",
                "| --- | --- | --- | --- | --- | ---: | :---: |"]
        for r in grid["rows"]:
            if r.get("error"):
                out.append(f"| {r['case']} | {r['mode']} | {r['dtype']} | {r['layout']} | "
                           f"ERROR | {r['error'][:100]} | no |")
            else:
                out.append(f"| {r['case']} | {r['mode']} | {r['dtype']} | {r['layout']} | "
                           f"{r['contestant']} | {r['rel_err_fp64']:.1e} | "
                           f"{'yes' if r['parity_ok'] else 'NO'} |")
        out.append("")
    if bench is None:
        out.append("No bench result.")
        return "\n".join(out) + "\n"
    s, e = bench["settings"], bench["env"]
    out += [f"## Which backend wins ({e['device']}, {', '.join(s['dtypes'])}, "
            f"{', '.join(s['layouts'])}, batch {', '.join(map(str, s['batches']))}; "
            f"{'complete' if s.get('complete') else 'INCOMPLETE: ' + str(s.get('stopped'))})", ""]
    out += [f"Skipped: {k}: {v}" for k, v in s.get("skipped_contestants", {}).items()]
    out += ["", "| case | mode | contestant | median ms | vs eager | vs torch.compile | "
            "peak MiB | parity | fastest resfuse |", "| --- | --- | --- | ---: | ---: | ---: | "
            "---: | :---: | :---: |"]
    groups = {}
    for r in bench["rows"]:
        groups.setdefault((r["case"], r["mode"]), []).append(r)
    for (case, mode), rows in groups.items():
        ok = [r for r in rows if r.get("median_ms") and str(r.get("contestant")).startswith("resfuse[")
              and r.get("parity_ok") is not False]
        best = min(ok, key=lambda r: r["median_ms"])["contestant"] if ok else ""
        for r in rows:
            if r.get("error"):
                out.append(f"| {case} | {mode} | ERROR | {r['error'][:100]} | | | | | |")
                continue
            f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
            out.append(f"| {case} | {mode} | {r['contestant']} | {r['median_ms']:.3f} | "
                       f"{f(r.get('speedup_vs_eager'), '.2f')} | {f(r.get('speedup_vs_compile'), '.2f')} | "
                       f"{f(None if r.get('peak_bytes') is None else r['peak_bytes'] / 2**20, '.0f')} | "
                       f"{'' if r.get('parity_ok') is None else ('ok' if r['parity_ok'] else 'FAIL')} | "
                       f"{'**' + best + '**' if r['contestant'] == best else ''} |")
    entries = report.auto_entries(bench)
    out += ["", "## `auto`'s table from this run (bench/report.py writes it into "
            "resfuse/backend/measured.py once the files are in bench/results/)", ""]
    out += [f"- {k[0]} {'training' if k[1] else 'eval'} {k[2]} {k[3]}: **{v}**"
            for k, v in sorted(entries.items())] or ["- nothing: no resfuse kernel backend "
                                                      "was measured on every stage block"]
    return "\n".join(out) + "\n"


def run_table(out: str) -> int:
    grids = glob.glob(os.path.join(out, "*-decide-grid-*.json"))
    benches = [p for p in glob.glob(os.path.join(out, "*-decide-*.json")) if p not in grids]
    bench, grid = _newest(benches), _newest(grids)
    if bench is None and grid is None:
        print(f"table: no decide results in {out}", file=sys.stderr)
        return 1
    env = (bench or grid)["env"]
    path = os.path.join(out, _stem(env, "decide-table") + ".md")
    text = render_table(bench, grid)
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"table: wrote {path}")
    return 0


def _on_sigterm(signum, frame):  # `timeout`: end like Ctrl-C, the finished cases written
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    a = parse(argv)
    _setup_env(a.dry_run)
    signal.signal(signal.SIGTERM, _on_sigterm)
    os.makedirs(a.out, exist_ok=True)
    if a.stage == "table":
        return run_table(a.out)
    plan = Plan(a)
    return run_grid(plan, a.out) if a.stage == "grid" else run_bench(plan, a.out)


if __name__ == "__main__":
    sys.exit(main())
