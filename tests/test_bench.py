"""The README's main job runs, writes a complete result file, and the report renders it."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_run_writes_results_and_report_renders(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--model", "resnet18",
         "--batch", "2", "--size", "32", "--repeats", "2", "--warmup", "0", "--out", str(out),
         # The harness on the CPU path everywhere: at batch 2 and 32x32 the last stage's BN sees
         # 2 values per channel, and on a GPU its gradients are TF32 rounding noise (the CUDA
         # backend's parity is tests/test_cuda_backend.py's).
         "--device", "cpu"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "parity:" in proc.stdout and "vs eager" in proc.stdout
    (path,) = out.glob("*.json")
    r = json.loads(path.read_text())
    assert {"env", "settings", "convert", "parity", "rows"} <= set(r)
    assert {"device", "torch", "commit", "date", "threads"} <= set(r["env"])
    assert r["convert"]["swapped"] == 8 and not r["convert"]["skipped"]
    assert r["parity"]["eval_output_rel_diff"] < 1e-4
    assert r["parity"]["train_grad_max_rel_diff"] < 1e-4
    assert {(row["mode"], row["contestant"]) for row in r["rows"]} == {
        ("eval", "eager"), ("eval", "resfuse"), ("train", "eager"), ("train", "resfuse")}
    for row in r["rows"]:
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"] and row["img_per_s"] > 0

    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- results:start -->\nold\n<!-- results:end -->\ny\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), "--results",
                           str(out), "--readme", str(readme)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert "old" not in text and "| training step | resfuse |" in text and text.endswith("y\n")
