"""bench/decide.py and `bash bench/gpu_check.sh decide`, on the CPU: the sampled grid's
coverage, the stage timeouts' budget, the decision table from a result set. (The whole
script's dry run, `bash bench/gpu_check.sh decide --dry-run`, is a CI step of its own.)"""
import collections
import json
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))
import decide  # noqa: E402


def test_grid_sample_covers_every_pair_evenly():
    blocks = ["b1", "b2", "b3", "b4"]
    sample = decide.grid_sample(blocks, ["float32", "bfloat16"], ["channels_last", "nchw"])
    assert len(sample) == 16 and len(set(sample)) == 16
    assert sample[0] == ("b1", "train_step", "bfloat16", "channels_last")  # the bench's first
    per_block_mode = collections.Counter((b, m) for b, m, _, _ in sample)
    assert set(per_block_mode.values()) == {2} and len(per_block_mode) == 8
    per_mode_pair = collections.Counter((m, d, l) for _, m, d, l in sample)
    assert set(per_mode_pair.values()) == {2} and len(per_mode_pair) == 8
    for b in blocks:  # the two pairs of a (block, mode) differ in dtype and in layout
        for mode in decide.MODES:
            (d1, l1), (d2, l2) = [(d, l) for bb, m, d, l in sample if (bb, m) == (b, mode)]
            assert d1 != d2 and l1 != l2


def test_dry_run_plan_blocks_are_the_stage_blocks_scaled():
    plan = decide.Plan(decide.parse(["grid", "--out", "x", "--dry-run"]))
    blocks = plan.stage_blocks()
    assert [b.stage for b in blocks] == [1, 2, 3, 4]
    assert all(not b.projection and b.bottleneck for b in blocks)
    assert [(b.inplanes, b.planes) for b in blocks] == [(16, 4), (32, 8), (64, 16), (128, 32)]
    assert plan.device.type == "cpu" and plan.bench_dtype != plan.bf16


def test_stage_timeouts_fit_in_eight_minutes():
    text = open(os.path.join(ROOT, "bench", "gpu_check.sh")).read()
    limits = {k: int(v) for k, v in re.findall(r"DECIDE_(\w+)_TIMEOUT:-(\d+)", text)}
    assert set(limits) == {"BUILD", "GRID", "BENCH", "TABLE"}
    assert sum(limits.values()) <= 480 - 30  # half a minute for start-up and the device lines


def _bench_result(out):
    rows = []
    for mode in ("train_step", "eval"):
        for c, ms in (("eager", 4.0), ("torch.compile", 3.0), ("resfuse[cuda]", 2.5),
                      ("resfuse[triton]", 2.0)):
            rows.append(dict(suite="blocks", case="resnet50 layer1 bottleneck", mode=mode,
                             contestant=c, median_ms=ms, speedup_vs_eager=4.0 / ms,
                             speedup_vs_compile=3.0 / ms, peak_bytes=2**30, dtype="bfloat16",
                             layout="channels_last", batch=256,
                             parity_ok=None if c in ("eager", "torch.compile") else True))
    rows.append(dict(suite="models", case="resnet50", mode="train_step", contestant=None,
                     error="RuntimeError: out of memory"))
    env = dict(date="2026-12-02T10:00:00+00:00", device="NVIDIA H200", device_type="cuda",
               commit="abc1234")
    bench = dict(schema="resfuse-bench/2", env=env, rows=rows, settings=dict(
        suite="decide", dtypes=["bfloat16"], layouts=["channels_last"], batches=[256],
        complete=False, stopped="KeyboardInterrupt: signal 15",
        skipped_contestants={}))
    grid = dict(kind="decide-grid", env=env, settings=dict(cases=2, complete=True, batch=16,
                                                            image=224, skipped_contestants={}),
                rows=[dict(case="b", mode="eval", dtype="float32", layout="nchw",
                           contestant="resfuse[triton]", rel_err_fp64=1e-7, parity_ok=True),
                      dict(case="b", mode="eval", dtype="bfloat16", layout="nchw",
                           contestant=None, error="ValueError: x")])
    with open(os.path.join(out, "2026-12-02-h200-decide-abc1234.json"), "w") as f:
        json.dump(bench, f)
    with open(os.path.join(out, "2026-12-02-h200-decide-grid-abc1234.json"), "w") as f:
        json.dump(grid, f)


def test_table_from_a_cut_short_run(tmp_path, capsys):
    _bench_result(str(tmp_path))
    assert decide.run_table(str(tmp_path)) == 0
    (md,) = tmp_path.glob("*-decide-table-*.md")
    text = md.read_text()
    assert "INCOMPLETE: KeyboardInterrupt" in text
    assert "| resnet50 layer1 bottleneck | eval | resfuse[triton] | 2.000 | 2.00 | 1.50 | 1024 | ok | **resfuse[triton]** |" in text
    assert "| resnet50 | train_step | ERROR | RuntimeError: out of memory" in text
    assert "| b | eval | bfloat16 | nchw | ERROR | ValueError: x | no |" in text
    assert "- h200 training bfloat16 channels_last: **triton**" in text


def test_table_without_results_fails(tmp_path):
    assert decide.run_table(str(tmp_path)) == 1


def test_decide_refuses_without_gpu_unless_dry(monkeypatch):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(SystemExit, match="no GPU"):
        decide.Plan(decide.parse(["bench", "--out", "x"]))
