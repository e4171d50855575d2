"""Run a function in several gloo processes on loopback, bounded in time, and collect results.

`run_workers(fn, world_size, tmp_path, *args)` spawns `world_size` fresh processes, each
joining one gloo group (a file store under `tmp_path`: no fixed port to collide on), calls
`fn(rank, world_size, *args)` and returns each rank's result (anything `torch.save` takes),
in rank order. A worker's exception comes back as the test's failure with its traceback; past
`timeout` seconds every worker is killed and the test fails. `fn` must live in an importable
module (tests/dist_workers.py), since spawned processes import it by name.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import time
import traceback

import torch
import torch.multiprocessing as mp


def _entry(fn, rank: int, world_size: int, store: str, out_dir: str, args) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)  # several processes share the machine's cores
    out = pathlib.Path(out_dir)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=120))
        torch.save(fn(rank, world_size, *args), out / f"rank{rank}.pt")
        # Every rank's collectives are done before any rank tears its group down (gloo can
        # abort a process whose peer disconnects mid-operation).
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_workers(fn, world_size: int, tmp_path, *args, timeout: float = 300.0):
    out = pathlib.Path(tmp_path) / f"dist-{fn.__name__}-{world_size}"
    out.mkdir(parents=True, exist_ok=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, str(out / "store"), str(out), args),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        # Poll: once one rank has failed the others would wait in a collective until the
        # group's timeout, so they are stopped a few seconds after the first failure.
        failed_at = None
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > 5:
                break
            time.sleep(0.05)
    finally:
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    errors = sorted(out.glob("rank*.err"))
    if errors:
        raise AssertionError("\n".join(f"--- {e.stem}:\n{e.read_text()}" for e in errors))
    if hung:
        raise AssertionError(f"ranks {hung} of {world_size} did not finish in {timeout:.0f} s")
    bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"worker exit codes (rank, code): {bad}")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def rank_slices(sizes):
    """[slice] of a concatenated batch, per rank, for per-rank batch sizes `sizes`."""
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


__all__ = ["run_workers", "rank_slices"]
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, inherited by the workers
