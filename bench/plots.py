"""PNG plots of a bench/run.py result (optional: needs matplotlib, `pip install 'resfuse[plots]'`).

- `<stem>-speedup.png`: per block (and model) and mode, each resfuse contestant's speed-up
  against eager and against torch.compile from the same run;
- `<stem>-roofline.png`: every timed row as achieved TFLOP/s against arithmetic intensity
  (FLOPs per byte of the fused schedule, bench/counts.py), under the measured copy-bandwidth
  and matmul ceilings.
"""
from __future__ import annotations

import os
from typing import List, Optional


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception:  # noqa: BLE001 - the plots are optional
        return None


def stem_of(result: dict) -> str:
    from run import device_slug
    env = result["env"]
    return "{}-{}-{}-{}".format(env["date"][:10], device_slug(env), result["settings"]["suite"],
                                env["commit"])


def _title(result: dict) -> str:
    e = result["env"]
    return f"{e['device']} · torch {e['torch']} · resfuse @ {e['commit']} · {e['date'][:10]}"


def speedup_plot(result: dict, path: str, plt) -> Optional[str]:
    rows = [r for r in result["rows"] if r.get("suite") in ("blocks", "models")
            and r.get("median_ms") and str(r.get("contestant", "")).startswith("resfuse")]
    if not rows:
        return None
    labels, groups = [], {}
    for r in rows:
        key = f"{r['case']} · {r['mode']}" + (f" · {r['dtype']} {r['layout']} b{r['batch']}"
                                             if len(result['settings']['dtypes']) *
                                             len(result['settings']['layouts']) *
                                             len(result['settings']['batches']) > 1 else "")
        if key not in groups:
            labels.append(key)
            groups[key] = {}
        groups[key][r["contestant"]] = r
    series = []
    for r in rows:
        for base in ("eager", "compile"):
            if r.get(f"speedup_vs_{base}") is not None:
                name = f"{r['contestant']} vs {'torch.compile' if base == 'compile' else 'eager'}"
                if name not in series:
                    series.append(name)
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(labels) * max(1, len(series)) + 1.8))
    height = 0.8 / max(1, len(series))
    for j, name in enumerate(series):
        contestant, base = name.split(" vs ")
        key = "speedup_vs_compile" if base == "torch.compile" else "speedup_vs_eager"
        ys = [i + j * height for i in range(len(labels))]
        vals = [(groups[l].get(contestant) or {}).get(key) or 0 for l in labels]
        ax.barh(ys, vals, height=height, label=name)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up (time of the baseline / time of resfuse; > 1 is faster)")
    ax.set_title(_title(result), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def roofline_plot(result: dict, path: str, plt) -> Optional[str]:
    rows = [r for r in result["rows"] if r.get("median_ms") and r.get("bytes") and r.get("flops")
            is not None]
    if not rows:
        return None
    ceil = result["ceilings"]
    bw = ceil["copy_gbs"] * 1e9
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"eager": "o", "torch.compile": "s", "torch.compile(max-autotune)": "D"}
    for name in dict.fromkeys(r["contestant"] for r in rows):
        pts = [(max(r["flops"], 1) / r["bytes"], max(r["flops"], 1) / (r["median_ms"] * 1e-3) / 1e12)
               for r in rows if r["contestant"] == name]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, label=name,
                   marker=markers.get(name, "^"), alpha=0.75)
    xs = [min(max(r["flops"], 1) / r["bytes"] for r in rows) / 2,
          max(max(r["flops"], 1) / r["bytes"] for r in rows) * 2]
    for dtype, peak in ceil["compute_tflops"].items():
        knee = peak * 1e12 / bw
        lo, hi = min(xs[0], knee / 4), max(xs[1], knee * 4)
        ax.plot([lo, knee, hi], [lo * bw / 1e12, peak, peak], linewidth=1,
                label=f"roof: copy {ceil['copy_gbs']:.0f} GB/s, {dtype} {peak:.1f} TFLOP/s")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (conv FLOPs / bytes of the fused schedule)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(_title(result), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(result: dict, out_dir: str, stem: Optional[str] = None) -> Optional[List[str]]:
    """The plots' paths (`<stem>-speedup.png`, `<stem>-roofline.png` in `out_dir`; the stem of
    the result's own file names by default), or None when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    stem = os.path.join(out_dir, stem or stem_of(result))
    made = [speedup_plot(result, stem + "-speedup.png", plt),
            roofline_plot(result, stem + "-roofline.png", plt)]
    return [p for p in made if p]
